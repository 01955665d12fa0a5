"""The idempotency ledger: one event, one email, whatever the broker redelivers.

``open_ledger(url)`` picks the backend from ``LEDGER_URL``: ``sqlite:///path``
(default; the worker processes of one host) or ``postgresql://...`` (several hosts).
The schema is created and migrated on open.
"""

from __future__ import annotations

from invoice_mailer.ledger._base import (
    AlreadyDone,
    Busy,
    Claim,
    Claimed,
    EventKey,
    InvoiceBusy,
    Ledger,
    LedgerError,
    Record,
)

__all__ = [
    "AlreadyDone",
    "Busy",
    "Claim",
    "Claimed",
    "EventKey",
    "InvoiceBusy",
    "Ledger",
    "LedgerError",
    "Record",
    "open_ledger",
]


def open_ledger(url: str) -> Ledger:
    """The ledger at ``url``, schema up to date."""
    if url.startswith("sqlite:///"):
        from invoice_mailer.ledger._sqlite import SqliteLedger

        return SqliteLedger(url.removeprefix("sqlite:///") or ":memory:")
    if url.startswith(("postgresql://", "postgres://")):
        from invoice_mailer.ledger._postgres import PostgresLedger

        return PostgresLedger(url)
    raise LedgerError(f"unsupported LEDGER_URL scheme: {url.split('://', 1)[0]}")
