"""The idempotency ledger's interface: what one event has done so far, and who is on it.

Keyed by the event's ``(source, id)``. A run *claims* the event with a lease before
doing anything; a second run (a duplicate publish, a redelivery) finds the event
done, or busy, or free to take over once the lease expired. The ledger is the one
record of what happened to an event: every effect is written the moment it is
known, before anything that can block (a resend's answer before email-info is
asked, email-info's answer before publishing, a give-up's dead letter before its
``invoice.email_failed``), and each write by the lease's holder renews the lease.
A resend is marked in flight (by the claim) before it is sent; a run that dies
before its answer is recorded leaves it in flight, and the next run finds it in
email-info (or sends it again under the same idempotency key) rather than
repeating it blind. One invoice has at most one resend in flight, whatever the
number of its events, processes and hosts: a unique index says so, and a run
that would begin a second gets ``InvoiceBusy`` and waits in the broker. So an
email that email-info lists as created after a resend began is that resend's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Protocol

from invoice_mailer.billing import ResendResult
from invoice_mailer.errors import LedgerError
from invoice_mailer.health import HealthStore

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
]

EventKey = tuple[str, str]
"""``(source, id)`` of an incoming event."""

OPEN, PUBLISHED, FAILED = "open", "published", "failed"


class InvoiceBusy(Exception):
    """Another event of the same invoice has a resend whose outcome is unknown."""


@dataclass(frozen=True, slots=True)
class Record:
    """One event's row."""

    source: str
    event_id: str
    invoice: str
    provider: str
    state: str
    """``open`` (in progress), ``published`` or ``failed`` (final)."""
    lease_owner: str | None
    lease_expires_at: float | None
    resend: ResendResult | None
    resend_in_flight: bool
    """A resend was sent and no definite answer recorded: its effect is unknown."""
    resend_first_started_at: float | None
    email_info: dict[str, Any] | None
    email_info_error: str | None
    email_info_done: bool
    outcome_event_id: str | None
    failure: dict[str, Any] | None
    created_at: float
    updated_at: float
    takeovers: int = 0
    """Runs that took the event over after its holder's lease ran out (holder died)."""
    dead_lettered: bool = False
    """The give-up in ``failure`` has its dead letter: only its event remains to publish."""
    id_scheme: int = 1
    """How this event's outgoing ids are named (``events.outgoing_event_id``)."""
    resend_last_started_at: float | None = None
    """When the latest try of the resend began (None before 0.3 recorded it)."""

    @property
    def final(self) -> bool:
        return self.state in (PUBLISHED, FAILED)

    def to_dict(self) -> dict[str, Any]:
        data = {name: getattr(self, name) for name in self.__slots__}
        data["resend"] = self.resend.to_dict() if self.resend else None
        return data

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Record:
        return cls(
            source=row["source"],
            event_id=row["event_id"],
            invoice=row["invoice"],
            provider=row["provider"],
            state=row["state"],
            lease_owner=row["lease_owner"],
            lease_expires_at=row["lease_expires_at"],
            resend=ResendResult.from_dict(json.loads(row["resend"])) if row["resend"] else None,
            resend_in_flight=bool(row["resend_in_flight"]),
            resend_first_started_at=row["resend_first_started_at"],
            email_info=json.loads(row["email_info"]) if row["email_info"] else None,
            email_info_error=row["email_info_error"],
            email_info_done=bool(row["email_info_done"]),
            outcome_event_id=row["outcome_event_id"],
            failure=json.loads(row["failure"]) if row["failure"] else None,
            created_at=row["created_at"],
            updated_at=row["updated_at"],
            takeovers=int(row.get("takeovers") or 0),
            dead_lettered=bool(row.get("dead_lettered")),
            id_scheme=int(row.get("id_scheme") or 1),
            resend_last_started_at=row.get("resend_last_started_at"),
        )


@dataclass(frozen=True, slots=True)
class Claimed:
    """This run holds the event's lease; ``record`` says what was done before it.

    ``resend_begun_at`` is set when the claim also marked the resend as in flight
    (``begin_resend=True`` and no resend recorded): when the event's first resend
    began. ``record.resend_in_flight`` still tells of an earlier run's resend.
    """

    record: Record
    resend_begun_at: float | None = None


@dataclass(frozen=True, slots=True)
class AlreadyDone:
    """The event reached a final state before: a duplicate, to be skipped."""

    record: Record


@dataclass(frozen=True, slots=True)
class Busy:
    """Another run holds a live lease; try again in ``retry_in`` seconds."""

    retry_in: float


Claim = Claimed | AlreadyDone | Busy


class Ledger(HealthStore, Protocol):
    """Both backends (SQLite, PostgreSQL) implement exactly this; the ledger's database
    also keeps the fleet's shared dependency health (``invoice_mailer.health``)."""

    def claim(
        self,
        key: EventKey,
        *,
        invoice: str,
        provider: str,
        owner: str,
        lease_seconds: float,
        now: float,
        reopen_failed: bool = False,
        begin_resend: bool = False,
    ) -> Claim:
        """Take the event's lease, atomically. ``reopen_failed`` lets a replay retry
        an event that had failed (a published one stays done). ``begin_resend`` also
        marks a resend as in flight, in the same write, unless one is recorded, the
        event is given up, or another event of the invoice has one in flight (then
        the claim is made without it, and ``begin_resend`` below will say so)."""
        ...

    def begin_resend(
        self, key: EventKey, *, owner: str, now: float, lease_seconds: float
    ) -> float | None:
        """Mark a resend as in flight and renew the lease, if this run still holds it
        (after time has passed since the claim).

        Returns when the event's first resend started (Unix time), or None when the
        lease is lost and the resend must not be sent. Raises ``InvoiceBusy`` while
        another event of the invoice has a resend in flight.
        """
        ...

    def resend_not_sent(self, key: EventKey) -> None:
        """The last resend got a definite answer without effect (an error response)."""
        ...

    # Each record_* below writes one fact whoever holds the lease now (a fact is a fact),
    # renews the lease if ``owner`` holds it, and returns the record as it now stands.

    def record_resend(
        self,
        key: EventKey,
        result: ResendResult,
        *,
        owner: str,
        now: float,
        lease_seconds: float,
        email_info: dict[str, Any] | None = None,
    ) -> Record:
        """The resend happened (and, when known already, where the email went)."""
        ...

    def record_email_info(
        self,
        key: EventKey,
        *,
        owner: str,
        now: float,
        lease_seconds: float,
        email_info: dict[str, Any] | None,
        error: str | None = None,
    ) -> Record:
        """email-info answered (``email_info``), or was given up (``error`` says why)."""
        ...

    def record_failure(
        self,
        key: EventKey,
        failure: dict[str, Any],
        *,
        owner: str,
        now: float,
        lease_seconds: float,
    ) -> Record:
        """The event is given up (``reason`` of ``invoice.email_failed``); not final yet."""
        ...

    def record_dead_lettered(
        self, key: EventKey, *, owner: str, now: float, lease_seconds: float
    ) -> Record:
        """The give-up's dead letter is on its queue."""
        ...

    def record_published(
        self,
        key: EventKey,
        outcome_event_id: str,
        *,
        now: float,
        keep: ResendResult | None = None,
    ) -> Record:
        """``invoice.email_queued`` went out: the event is done; the lease is given back.
        ``keep``: the resend as the record keeps it from now on, email-info's answer
        dropped (the addresses went out in the event; nothing needs them here after)."""
        ...

    def record_failed(self, key: EventKey, outcome_event_id: str, *, now: float) -> Record:
        """``invoice.email_failed`` went out: the event is done; the lease is given back."""
        ...

    def release(
        self, key: EventKey, owner: str, *, waiting: str | None = None, until: float | None = None
    ) -> None:
        """Give the lease back, if ``owner`` holds it (before a retry waits in the broker);
        ``waiting``: what for (``"resend rate_limited"``), until ``until`` (Unix time)."""
        ...

    def parked(self) -> dict[str, int]:
        """Open events waiting in the broker, counted by what they wait for."""
        ...

    def find(self, event_id: str) -> list[Record]:
        """Every record with this event id (any source)."""
        ...

    def resends_of_invoice(self, key: EventKey, invoice: str, provider: str) -> list[ResendResult]:
        """The resends that other events of this invoice recorded as done."""
        ...

    def prune(self, *, older_than: float) -> int:
        """Delete final records last updated before ``older_than`` (Unix time)."""
        ...

    def counts(self) -> dict[str, int]:
        """Records per state."""
        ...

    def close(self) -> None: ...
