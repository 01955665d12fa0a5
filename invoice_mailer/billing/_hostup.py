"""HostUp API v2: resend-email and email-info (shared/api/hostup-*.md)."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import httpx
from pydantic import BaseModel, ConfigDict, ValidationError

from invoice_mailer.billing._http import send
from invoice_mailer.billing._provider import ResendResult
from invoice_mailer.clock import MILLISECOND, ApiClock, parse_iso
from invoice_mailer.errors import Rejected
from invoice_mailer.pacing import RateBudget
from invoice_mailer.untrusted import Redactor

__all__ = ["HostUpClient"]


class _ResendBody(BaseModel):
    model_config = ConfigDict(strict=True)

    queuedAt: str
    email: str


class _EmailInfoBody(BaseModel):
    model_config = ConfigDict(strict=True)

    emails: list[dict[str, Any]]
    currentTargets: dict[str, Any] | None = None


class HostUpClient:
    """Calls HostUp with a Bearer API key over a shared ``httpx.Client``."""

    name = "hostup"
    has_email_info = True
    idempotency_window_seconds: float | None = None  # not documented; email-info decides

    def __init__(
        self,
        *,
        http: httpx.Client,
        base_url: str,
        api_key: str,
        max_requests_per_second: float | None = None,
    ) -> None:
        self._http = http
        self._base_url = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {api_key}", "Accept": "application/json"}
        self._redactor = Redactor([api_key])
        self.clock = ApiClock()
        self.budget = RateBudget(max_requests_per_second)

    def __repr__(self) -> str:
        return f"HostUpClient(base_url={self._base_url!r})"

    def resend(self, invoice: str, *, idempotency_key: str) -> ResendResult:
        """Ask HostUp to queue the invoice email again; the body must stay empty.

        A 2xx means the email was queued, so an unreadable 2xx body is still a
        success (retrying would send a second email): its fields are then unknown.
        """
        sent = time.time()
        response = send(
            self._http,
            "POST",
            self._url(invoice, "actions/resend-email"),
            headers={**self._headers, "Idempotency-Key": idempotency_key},
            redactor=self._redactor,
            clock=self.clock,
            budget=self.budget,
        )
        try:
            body = _ResendBody.model_validate_json(response.content)
        except ValidationError:
            return ResendResult(queued_at=_now_iso(), email=None)
        queued = parse_iso(body.queuedAt)
        if queued is not None:  # the API's clock to the millisecond
            self.clock.observe(
                sent=sent, received=time.time(), server=queued, resolution=MILLISECOND
            )
        clean = self._redactor.text
        return ResendResult(
            queued_at=clean(body.queuedAt, limit=64), email=clean(body.email, emails=False)
        )

    def email_info(self, invoice: str) -> dict[str, Any]:
        """Where the invoice's emails went: ``emails`` and ``currentTargets``."""
        response = send(
            self._http,
            "GET",
            self._url(invoice, "email-info"),
            headers=self._headers,
            redactor=self._redactor,
            clock=self.clock,
            budget=self.budget,
        )
        try:
            body = _EmailInfoBody.model_validate_json(response.content)
        except ValidationError:
            raise Rejected(
                status=response.status_code,
                code="invalid_response",
                detail="email-info answered 2xx without an emails array",
            ) from None
        # The addresses are what the contract asks for; a secret in it is not.
        info: dict[str, Any] = self._redactor.json(
            {"emails": body.emails, "currentTargets": body.currentTargets}
        )
        return info

    def _url(self, invoice: str, action: str) -> str:
        return f"{self._base_url}/billing/invoices/{quote(invoice, safe='')}/{action}"


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
