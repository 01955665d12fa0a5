"""Abillify: ``POST /invoices/{invoiceReference}/resendInvoice`` (shared/api/abillify-*.txt).

Basic auth, an ``Idempotency-Key`` Abillify keeps for 24 hours, no email-info
endpoint. Errors look like ``{"code", "details": [{"error", "fields", "hint"}],
"message", "name", "type"}``; ``type`` (``ERR_INVALID_VALUE``...) is what to branch on.
"""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import httpx
from pydantic import BaseModel, ConfigDict, ValidationError

from invoice_mailer.billing._http import send
from invoice_mailer.billing._provider import ResendResult
from invoice_mailer.clock import ApiClock
from invoice_mailer.errors import Rejected
from invoice_mailer.pacing import RateBudget
from invoice_mailer.problem import Problem, parse_problem
from invoice_mailer.untrusted import Redactor

__all__ = ["AbillifyClient", "parse_abillify_error"]

IDEMPOTENCY_WINDOW_SECONDS = 24 * 3600.0


class _ResendBody(BaseModel):
    model_config = ConfigDict(strict=True)

    job: str
    result: str
    resultcode: str


class AbillifyClient:
    """Calls Abillify with HTTP Basic auth over a shared ``httpx.Client``."""

    name = "abillify"
    has_email_info = False
    idempotency_window_seconds: float | None = IDEMPOTENCY_WINDOW_SECONDS

    def __init__(
        self,
        *,
        http: httpx.Client,
        base_url: str,
        username: str,
        password: str,
        max_requests_per_second: float | None = None,
    ) -> None:
        self._http = http
        self._base_url = base_url.rstrip("/")
        token = base64.b64encode(f"{username}:{password}".encode()).decode("ascii")
        self._headers = {
            "Authorization": f"Basic {token}",
            "Accept": "application/json",
            "Content-Type": "application/json",
        }
        self._redactor = Redactor(basic=(username, password))
        self.clock = ApiClock()
        self.budget = RateBudget(max_requests_per_second)

    def __repr__(self) -> str:
        return f"AbillifyClient(base_url={self._base_url!r})"

    def resend(self, invoice: str, *, idempotency_key: str) -> ResendResult:
        """Re-send the invoice email; the 200's ``job`` identifies the send.

        A 2xx whose body cannot be read still means the request was accepted.
        A readable 2xx that says ``result`` is not OK is a rejection.
        """
        response = send(
            self._http,
            "POST",
            f"{self._base_url}/invoices/{quote(invoice, safe='')}/resendInvoice",
            headers={**self._headers, "Idempotency-Key": idempotency_key},
            json_body={},
            redactor=self._redactor,
            clock=self.clock,
            budget=self.budget,
            parse_problem_body=parse_abillify_error,
        )
        arrived = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        try:
            body = _ResendBody.model_validate_json(response.content)
        except ValidationError:
            return ResendResult(queued_at=arrived)
        if body.result != "OK" or body.resultcode != "0":
            raise Rejected(
                status=response.status_code,
                code=f"result_{body.resultcode}",
                detail=f"resendInvoice answered result {body.result!r}",
            )
        return ResendResult(queued_at=arrived, job_id=self._redactor.text(body.job, limit=64))

    def email_info(self, invoice: str) -> dict[str, Any]:
        raise NotImplementedError("Abillify has no email-info endpoint")


def parse_abillify_error(status: int, body: bytes) -> Problem:
    """Abillify's error shape as a Problem: ``type`` is the code; message and details the
    detail. Anything else falls back to the generic reading (``http_<status>``)."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return parse_problem(status, body)
    if not isinstance(doc, dict) or not isinstance(doc.get("type"), str):
        return parse_problem(status, body)
    detail = str(doc.get("message") or doc.get("name") or "no message")
    details = doc.get("details")
    if isinstance(details, list) and details and isinstance(details[0], dict):
        first = details[0]
        extra = "; ".join(str(first[k]) for k in ("error", "hint") if first.get(k))
        if extra:
            detail = f"{detail}: {extra}"
    return Problem(code=doc["type"], detail=detail)
