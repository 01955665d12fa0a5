"""What the pipeline needs of a billing provider, and nothing more."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from invoice_mailer.clock import ApiClock
from invoice_mailer.pacing import RateBudget

__all__ = ["BillingProvider", "ResendResult"]


@dataclass(frozen=True, slots=True)
class ResendResult:
    """What a successful resend told us."""

    queued_at: str
    email: str | None = None
    job_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"queuedAt": self.queued_at, "email": self.email, "jobId": self.job_id}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ResendResult:
        return cls(queued_at=data["queuedAt"], email=data.get("email"), job_id=data.get("jobId"))


class BillingProvider(Protocol):
    """A billing API that can resend an invoice email.

    Methods raise only ``BillingError`` subclasses. ``has_email_info`` says
    whether ``email_info`` exists; the pipeline skips that step otherwise.
    ``idempotency_window_seconds`` is how long the API remembers an
    ``Idempotency-Key`` (None: not promised). ``clock`` is the API's clock as its
    answers tell it, ``budget`` its request budget (``X-RateLimit-*`` or configured).
    """

    name: str
    has_email_info: bool
    idempotency_window_seconds: float | None
    clock: ApiClock
    budget: RateBudget

    def resend(self, invoice: str, *, idempotency_key: str) -> ResendResult: ...

    def email_info(self, invoice: str) -> dict[str, Any]: ...
