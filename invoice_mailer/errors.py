"""The errors invoice-mailer raises, and that callers branch on by type.

::

    InvoiceMailerError
     ├── InvalidEvent          the event can never be processed: dead-letter it
     ├── BillingError          a billing API call did not succeed
     │    ├── RateLimited      429: wait ``retry_after`` seconds, then try again
     │    ├── TransientError   5xx, timeout, dropped connection: back off, try again
     │    └── Rejected         other 4xx: trying again cannot help
     ├── PublishError          the bus did not take an event; ``reason`` says why
     └── LedgerError           the ledger's database could not be used: wait, never give up

Every error carries its context as attributes (``status``, ``code``,
``detail``...), so no caller ever parses a message. No error's text contains a
credential: clients build them from the response, never from the request.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = [
    "BillingError",
    "InvalidEvent",
    "InvoiceMailerError",
    "LedgerError",
    "PublishError",
    "PublishFailure",
    "RateLimited",
    "Rejected",
    "TransientError",
]


class InvoiceMailerError(Exception):
    """Base of every error this package raises on purpose."""


class InvalidEvent(InvoiceMailerError):
    """An incoming event that must never reach a billing API.

    ``code`` is stable and machine-readable (``not_json``, ``invalid_invoice_id``...);
    ``detail`` is for humans.
    """

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


class BillingError(InvoiceMailerError):
    """A billing API call that did not succeed.

    ``status`` is the HTTP status (None when no response arrived), ``code`` the
    problem document's ``code`` (or the service's own, e.g. ``timeout``), and
    ``retry_after`` the wait the server asked for, in seconds, if it asked.
    """

    def __init__(
        self,
        *,
        status: int | None,
        code: str,
        detail: str,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{status or 'no response'} {code}: {detail}")
        self.status = status
        self.code = code
        self.detail = detail
        self.retry_after = retry_after


class RateLimited(BillingError):
    """429: the server asked us to wait."""


class TransientError(BillingError):
    """5xx, timeout or connection error: the same request may succeed later.

    ``request_sent`` is True when the request may have taken effect without an
    answer (a read timeout, a connection dropped mid-response): the effect is
    then unknown, not absent. An answered 5xx is taken at its word: not sent.
    """

    def __init__(
        self,
        *,
        status: int | None,
        code: str,
        detail: str,
        retry_after: float | None = None,
        request_sent: bool = True,
    ) -> None:
        super().__init__(status=status, code=code, detail=detail, retry_after=retry_after)
        self.request_sent = request_sent


class Rejected(BillingError):
    """A 4xx other than 429 (or a response we cannot use): retrying cannot help."""


class PublishFailure(StrEnum):
    """Why the bus did not take an event."""

    NACKED = "nacked"
    """The broker refused it (a memory or disk alarm, a queue limit)."""
    UNROUTABLE = "unroutable"
    """Confirmed, but no queue is bound to its routing key: nobody would get it."""
    BLOCKED = "blocked"
    """The broker blocks publishing (memory or disk alarm); what was written goes out
    when the alarm clears."""
    UNREACHABLE = "unreachable"
    """No connection, or it broke before the confirm."""
    CLOSED = "closed"
    """The publisher is shut down (the process is stopping)."""


class PublishError(InvoiceMailerError):
    """The bus did not take an event; ``reason`` says why, ``detail`` for humans.
    ``held``: the broker has the message and may still take it (a blocked broker)."""

    def __init__(self, reason: PublishFailure, detail: str, *, held: bool = False) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.held = held


class LedgerError(InvoiceMailerError):
    """The ledger's database could not be used (down, full, locked for too long)."""
