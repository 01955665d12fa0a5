"""The ledger in SQL, shared by both backends; each backend only runs statements.

Every write is one statement, so each is atomic on its own: the claim is a single
conditional ``UPDATE ... RETURNING`` that at most one run can win, never a read
followed by a write.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from invoice_mailer.billing import ResendResult
from invoice_mailer.events import ID_SCHEME
from invoice_mailer.health import Health, State, healthy
from invoice_mailer.ledger._base import (
    FAILED,
    OPEN,
    PUBLISHED,
    AlreadyDone,
    Busy,
    Claim,
    Claimed,
    EventKey,
    InvoiceBusy,
    LedgerError,
    Record,
)

TABLE = "invoice_mailer_ledger"
HEALTH_TABLE = "invoice_mailer_health"

# Ordered; never edit one that has shipped, add the next.
MIGRATIONS: list[tuple[int, list[str]]] = [
    (
        1,
        [
            f"""CREATE TABLE {TABLE} (
                source TEXT NOT NULL,
                event_id TEXT NOT NULL,
                invoice TEXT NOT NULL,
                provider TEXT NOT NULL,
                state TEXT NOT NULL,
                lease_owner TEXT,
                lease_expires_at DOUBLE PRECISION,
                resend TEXT,
                resend_in_flight INTEGER NOT NULL DEFAULT 0,
                resend_first_started_at DOUBLE PRECISION,
                email_info TEXT,
                email_info_error TEXT,
                email_info_done INTEGER NOT NULL DEFAULT 0,
                outcome_event_id TEXT,
                failure TEXT,
                created_at DOUBLE PRECISION NOT NULL,
                updated_at DOUBLE PRECISION NOT NULL,
                PRIMARY KEY (source, event_id)
            )""",
            f"CREATE INDEX {TABLE}_event_id ON {TABLE} (event_id)",
            f"CREATE INDEX {TABLE}_state_updated ON {TABLE} (state, updated_at)",
        ],
    ),
    (
        2,
        [
            # Times a run took the event over from a holder whose lease ran out
            # (it died mid-event): the poison-message count the broker cannot keep,
            # since every lease wait is a fresh retry message.
            f"ALTER TABLE {TABLE} ADD COLUMN takeovers INTEGER NOT NULL DEFAULT 0",
        ],
    ),
    (
        3,
        [
            # The give-up's dead letter was written: a retry of its email_failed
            # publication must not write a second one.
            f"ALTER TABLE {TABLE} ADD COLUMN dead_lettered INTEGER NOT NULL DEFAULT 0",
        ],
    ),
    (
        4,
        [
            # How the event's outgoing ids are named: 1 for every event recorded
            # before, so that their ids never change; new events get events.ID_SCHEME.
            f"ALTER TABLE {TABLE} ADD COLUMN id_scheme INTEGER NOT NULL DEFAULT 1",
            # When the latest try of the resend began: email-info may lag behind it.
            f"ALTER TABLE {TABLE} ADD COLUMN resend_last_started_at DOUBLE PRECISION",
            # 1 while this event's resend has an unknown outcome, else NULL: one per
            # invoice, so an email created after a resend began can only be its own.
            # (Events in flight before this migration hold no slot: none is broken.)
            f"ALTER TABLE {TABLE} ADD COLUMN holds_invoice INTEGER",
            f"""CREATE UNIQUE INDEX {TABLE}_one_resend_per_invoice
                ON {TABLE} (provider, invoice) WHERE holds_invoice = 1""",
            f"CREATE INDEX {TABLE}_invoice ON {TABLE} (provider, invoice)",
        ],
    ),
    (
        5,
        [
            # Shared dependency health (invoice_mailer.health): one row per dependency.
            f"""CREATE TABLE {HEALTH_TABLE} (
                dependency TEXT PRIMARY KEY,
                state TEXT NOT NULL,
                since DOUBLE PRECISION NOT NULL,
                retry_at DOUBLE PRECISION,
                failed_probes INTEGER NOT NULL DEFAULT 0,
                probe_owner TEXT,
                probe_until DOUBLE PRECISION,
                detail TEXT,
                next_slot DOUBLE PRECISION
            )""",
        ],
    ),
    (
        6,
        [
            # What an event waits for in the broker while no run holds it ("resend
            # rate_limited"), and until when: `invoice-mailer status` counts them.
            f"ALTER TABLE {TABLE} ADD COLUMN waiting TEXT",
            f"ALTER TABLE {TABLE} ADD COLUMN waiting_until DOUBLE PRECISION",
        ],
    ),
]
SCHEMA_TABLE = "invoice_mailer_schema"

_KEY = "source = :source AND event_id = :event_id"
# Every write by the lease's holder renews it: a run that makes progress keeps its event.
_RENEW = """lease_expires_at = CASE WHEN lease_owner = :owner
        THEN :expires ELSE lease_expires_at END"""
# Every write that settles a resend's outcome gives the invoice's slot back.
_SETTLED = "holds_invoice = NULL"


# One statement: insert the event, or take its lease if it is free, expired or ours
# already. A row comes back only when this run holds the lease. resend_in_flight counts
# runs that began a resend without a definite answer: a claim that begins one adds
# itself, so more than one means an earlier run's resend is uncertain (and its last try
# keeps its start: this run looks for it first). (Every write is a round trip: one, not
# two.) Beginning a resend takes the invoice's slot
# (holds_invoice); the unique index refuses it while another event of the invoice holds it.
_BEGINS = f"""(:begin = 1 AND {TABLE}.resend IS NULL AND {TABLE}.failure IS NULL)"""
_CLAIM = f"""INSERT INTO {TABLE} (source, event_id, invoice, provider, state,
        lease_owner, lease_expires_at, resend_in_flight, resend_first_started_at,
        resend_last_started_at, holds_invoice, id_scheme, created_at, updated_at)
    VALUES (:source, :event_id, :invoice, :provider, '{OPEN}',
        :owner, :expires, :begin, CASE WHEN :begin = 1 THEN :now END,
        CASE WHEN :begin = 1 THEN :now END, CASE WHEN :begin = 1 THEN 1 END,
        {ID_SCHEME}, :now, :now)
    ON CONFLICT (source, event_id) DO UPDATE SET
        takeovers = {TABLE}.takeovers + CASE
            WHEN {TABLE}.lease_owner IS NOT NULL AND {TABLE}.lease_owner <> :owner
            THEN 1 ELSE 0 END,
        resend_in_flight = {TABLE}.resend_in_flight + CASE WHEN {_BEGINS} THEN 1 ELSE 0 END,
        resend_first_started_at = CASE WHEN {_BEGINS}
            THEN COALESCE({TABLE}.resend_first_started_at, :now)
            ELSE {TABLE}.resend_first_started_at END,
        resend_last_started_at = CASE WHEN {_BEGINS} AND {TABLE}.resend_in_flight = 0
            THEN :now ELSE {TABLE}.resend_last_started_at END,
        holds_invoice = CASE WHEN {_BEGINS} THEN 1 ELSE {TABLE}.holds_invoice END,
        lease_owner = :owner, lease_expires_at = :expires, updated_at = :now,
        waiting = NULL, waiting_until = NULL
    WHERE {TABLE}.state = '{OPEN}'
      AND ({TABLE}.lease_owner IS NULL OR {TABLE}.lease_expires_at <= :now
           OR {TABLE}.lease_owner = :owner)
    RETURNING *"""


Run = Callable[[str, dict[str, Any]], list[dict[str, Any]]]
"""Runs one statement (``:name`` parameters) and returns its rows."""


class SqlLedger(ABC):
    """The ledger, as SQL with ``:name`` parameters: the one implementation of ``Ledger``.

    A backend only runs statements: ``_execute`` (each in its own transaction) and
    ``_migration`` (a transaction that holds the database's migration lock).
    """

    @abstractmethod
    def _execute(self, sql: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        """Run one statement in its own transaction; rows it returned, if any."""

    @abstractmethod
    def _migration(self) -> AbstractContextManager[Run]:
        """One transaction, serialised against every other process's migration."""

    @abstractmethod
    def close(self) -> None: ...

    def _migrate(self) -> None:
        """Bring the schema up to the last of MIGRATIONS; the one migration runner."""
        with self._migration() as run:
            run(f"CREATE TABLE IF NOT EXISTS {SCHEMA_TABLE} (version INTEGER)", {})
            rows = run(f"SELECT MAX(version) AS version FROM {SCHEMA_TABLE}", {})
            current = int(rows[0]["version"] or 0) if rows else 0
            for version, statements in MIGRATIONS:
                if version > current:
                    for statement in statements:
                        run(statement, {})
                    run(f"INSERT INTO {SCHEMA_TABLE} VALUES (:version)", {"version": version})

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
        params = {
            **_key(key),
            "invoice": invoice,
            "provider": provider,
            "owner": owner,
            "now": now,
            "expires": now + lease_seconds,
            "begin": int(begin_resend),
        }
        if reopen_failed:
            # A replay starts the count of workers lost afresh: an event given up as
            # poison is replayed once its cause is fixed (or because it was only in
            # flight beside the poison), and must not be given up again at once.
            self._execute(
                f"""UPDATE {TABLE} SET state = '{OPEN}', failure = NULL, dead_lettered = 0,
                        outcome_event_id = NULL, takeovers = 0, updated_at = :now
                    WHERE {_KEY} AND state = '{FAILED}'""",
                params,
            )
        try:
            rows = self._execute(_CLAIM, params)
        except InvoiceBusy:
            # Another event of the invoice has a resend in flight: claim without
            # beginning one; begin_resend tells the run to wait.
            begin_resend = False
            rows = self._execute(_CLAIM, {**params, "begin": 0})
        if rows:
            row = rows[0]
            began = begin_resend and row["resend"] is None and row["failure"] is None
            if began:  # the record as it was before this claim began the resend
                row = {**row, "resend_in_flight": row["resend_in_flight"] - 1}
            return Claimed(
                Record.from_row(row),
                resend_begun_at=float(row["resend_first_started_at"]) if began else None,
            )
        record = self._get(key)
        if record is None or record.final:
            return AlreadyDone(record) if record else Busy(retry_in=1.0)
        return Busy(retry_in=max(1.0, (record.lease_expires_at or now) - now))

    def begin_resend(
        self, key: EventKey, *, owner: str, now: float, lease_seconds: float
    ) -> float | None:
        rows = self._execute(
            f"""UPDATE {TABLE} SET resend_in_flight = CASE
                        WHEN resend_in_flight > 0 THEN resend_in_flight ELSE 1 END,
                    resend_first_started_at = COALESCE(resend_first_started_at, :now),
                    resend_last_started_at = :now, holds_invoice = 1,
                    lease_expires_at = CASE WHEN :expires > lease_expires_at
                        THEN :expires ELSE lease_expires_at END,
                    updated_at = :now
                WHERE {_KEY} AND lease_owner = :owner AND state = '{OPEN}'
                RETURNING resend_first_started_at""",
            {**_key(key), "owner": owner, "now": now, "expires": now + lease_seconds},
        )
        return float(rows[0]["resend_first_started_at"]) if rows else None

    def resend_not_sent(self, key: EventKey) -> None:
        self._execute(
            f"UPDATE {TABLE} SET resend_in_flight = 0, {_SETTLED} WHERE {_KEY}", _key(key)
        )

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
        return self._update(
            key,
            f"""resend = :resend, resend_in_flight = 0, {_SETTLED},
                email_info = COALESCE(:info, email_info),
                email_info_done = CASE WHEN :info IS NULL THEN email_info_done ELSE 1 END""",
            owner=owner,
            now=now,
            lease_seconds=lease_seconds,
            resend=_resend_json(result),
            info=_json(email_info),
        )

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
        return self._update(
            key,
            "email_info = :info, email_info_error = :error, email_info_done = 1",
            owner=owner,
            now=now,
            lease_seconds=lease_seconds,
            info=_json(email_info),
            error=error,
        )

    def record_failure(
        self,
        key: EventKey,
        failure: dict[str, Any],
        *,
        owner: str,
        now: float,
        lease_seconds: float,
    ) -> Record:
        return self._update(
            key,
            f"failure = :failure, {_SETTLED}",
            owner=owner,
            now=now,
            lease_seconds=lease_seconds,
            failure=json.dumps(failure),
        )

    def record_dead_lettered(
        self, key: EventKey, *, owner: str, now: float, lease_seconds: float
    ) -> Record:
        return self._update(
            key, "dead_lettered = 1", owner=owner, now=now, lease_seconds=lease_seconds
        )

    def record_published(
        self,
        key: EventKey,
        outcome_event_id: str,
        *,
        now: float,
        keep: ResendResult | None = None,
    ) -> Record:
        return self._finish(key, PUBLISHED, outcome_event_id, now=now, keep=keep)

    def record_failed(self, key: EventKey, outcome_event_id: str, *, now: float) -> Record:
        return self._finish(key, FAILED, outcome_event_id, now=now)

    def release(
        self, key: EventKey, owner: str, *, waiting: str | None = None, until: float | None = None
    ) -> None:
        self._execute(
            f"""UPDATE {TABLE} SET lease_owner = NULL, lease_expires_at = NULL,
                    waiting = :waiting, waiting_until = :until
                WHERE {_KEY} AND lease_owner = :owner""",
            {**_key(key), "owner": owner, "waiting": waiting, "until": until},
        )

    def parked(self) -> dict[str, int]:
        rows = self._execute(
            f"""SELECT waiting, COUNT(*) AS n FROM {TABLE}
                WHERE state = '{OPEN}' AND waiting IS NOT NULL AND lease_owner IS NULL
                GROUP BY waiting""",
            {},
        )
        return {r["waiting"]: int(r["n"]) for r in rows}

    def _update(
        self,
        key: EventKey,
        assignments: str,
        *,
        owner: str,
        now: float,
        lease_seconds: float,
        **values: Any,
    ) -> Record:
        """One fact about the event, whoever holds its lease now; the holder's lease renewed.

        ``assignments`` is always a module constant; values are bound.
        """
        rows = self._execute(
            f"""UPDATE {TABLE} SET {assignments}, {_RENEW}, updated_at = :now
                WHERE {_KEY} RETURNING *""",
            {**_key(key), "owner": owner, "now": now, "expires": now + lease_seconds, **values},
        )
        return _one(rows, key)

    def _finish(
        self,
        key: EventKey,
        state: str,
        outcome_event_id: str,
        *,
        now: float,
        keep: ResendResult | None = None,
    ) -> Record:
        forget = ""
        if keep is not None:  # what went out in the event is not kept here any longer
            forget = "resend = :keep, email_info = NULL,"
        rows = self._execute(
            f"""UPDATE {TABLE} SET state = :state, outcome_event_id = :outcome, {forget}
                    resend_in_flight = 0, {_SETTLED}, lease_owner = NULL,
                    lease_expires_at = NULL, updated_at = :now
                WHERE {_KEY} RETURNING *""",
            {
                **_key(key),
                "state": state,
                "outcome": outcome_event_id,
                "now": now,
                **({"keep": _resend_json(keep)} if keep is not None else {}),
            },
        )
        return _one(rows, key)

    def find(self, event_id: str) -> list[Record]:
        rows = self._execute(
            f"SELECT * FROM {TABLE} WHERE event_id = :event_id ORDER BY created_at",
            {"event_id": event_id},
        )
        return [Record.from_row(r) for r in rows]

    def resends_of_invoice(self, key: EventKey, invoice: str, provider: str) -> list[ResendResult]:
        rows = self._execute(
            f"""SELECT resend FROM {TABLE}
                WHERE provider = :provider AND invoice = :invoice AND resend IS NOT NULL
                  AND NOT ({_KEY})""",
            {**_key(key), "invoice": invoice, "provider": provider},
        )
        return [ResendResult.from_dict(json.loads(r["resend"])) for r in rows]

    def prune(self, *, older_than: float) -> int:
        rows = self._execute(
            f"""DELETE FROM {TABLE}
                WHERE state IN ('{PUBLISHED}', '{FAILED}') AND updated_at < :older_than
                RETURNING event_id""",
            {"older_than": older_than},
        )
        return len(rows)

    def counts(self) -> dict[str, int]:
        rows = self._execute(f"SELECT state, COUNT(*) AS n FROM {TABLE} GROUP BY state", {})
        return {r["state"]: int(r["n"]) for r in rows}

    # -- shared dependency health (invoice_mailer.health.HealthStore) -------------------

    def health(self, dependency: str, now: float) -> Health:
        rows = self._execute(
            f"SELECT * FROM {HEALTH_TABLE} WHERE dependency = :dependency",
            {"dependency": dependency},
        )
        return _health(rows[0]) if rows else healthy(dependency, now)

    def put(self, health: Health, *, expect: State | None = None) -> bool:
        params = {
            "dependency": health.dependency,
            "state": str(health.state),
            "since": health.since,
            "retry_at": health.retry_at,
            "failed_probes": health.failed_probes,
            "probe_owner": health.probe_owner,
            "probe_until": health.probe_until,
            "detail": health.detail,
            "expect": None if expect is None else str(expect),
        }
        rows = self._execute(
            f"""INSERT INTO {HEALTH_TABLE} (dependency, state, since, retry_at, failed_probes,
                    probe_owner, probe_until, detail)
                VALUES (:dependency, :state, :since, :retry_at, :failed_probes,
                    :probe_owner, :probe_until, :detail)
                ON CONFLICT (dependency) DO UPDATE SET state = :state, since = :since,
                    retry_at = :retry_at, failed_probes = :failed_probes,
                    probe_owner = :probe_owner, probe_until = :probe_until, detail = :detail
                WHERE CAST(:expect AS TEXT) IS NULL OR {HEALTH_TABLE}.state = :expect
                RETURNING dependency""",
            params,
        )
        return bool(rows)

    def take_probe(self, dependency: str, owner: str, now: float, lease: float) -> bool:
        rows = self._execute(
            f"""UPDATE {HEALTH_TABLE} SET state = 'probing', probe_owner = :owner,
                    probe_until = :until
                WHERE dependency = :dependency
                  AND ((state = 'open' AND (retry_at IS NULL OR retry_at <= :now))
                       OR (state = 'probing' AND (probe_until IS NULL OR probe_until <= :now)))
                RETURNING dependency""",
            {"dependency": dependency, "owner": owner, "now": now, "until": now + lease},
        )
        return bool(rows)

    def reserve(self, dependency: str, not_before: float, interval: float) -> float:
        rows = self._execute(
            f"""INSERT INTO {HEALTH_TABLE} (dependency, state, since, next_slot)
                VALUES (:dependency, 'healthy', :not_before, :not_before + :interval)
                ON CONFLICT (dependency) DO UPDATE SET next_slot = CASE
                        WHEN {HEALTH_TABLE}.next_slot IS NOT NULL
                             AND {HEALTH_TABLE}.next_slot > :not_before
                        THEN {HEALTH_TABLE}.next_slot ELSE :not_before END + :interval
                RETURNING next_slot""",
            {"dependency": dependency, "not_before": not_before, "interval": interval},
        )
        return float(rows[0]["next_slot"]) - interval

    def _get(self, key: EventKey) -> Record | None:
        rows = self._execute(f"SELECT * FROM {TABLE} WHERE {_KEY}", _key(key))
        return Record.from_row(rows[0]) if rows else None


def _health(row: dict[str, Any]) -> Health:
    return Health(
        dependency=row["dependency"],
        state=State(row["state"]),
        since=float(row["since"]),
        retry_at=row["retry_at"],
        failed_probes=int(row["failed_probes"] or 0),
        probe_owner=row["probe_owner"],
        probe_until=row["probe_until"],
        detail=row["detail"],
    )


def _resend_json(result: ResendResult | None) -> str | None:
    return json.dumps(result.to_dict()) if result is not None else None


def _json(value: dict[str, Any] | None) -> str | None:
    return json.dumps(value) if value is not None else None


def _one(rows: list[dict[str, Any]], key: EventKey) -> Record:
    if not rows:  # every write follows a claim, which inserted the row
        raise LedgerError(f"no ledger record for {key!r}")
    return Record.from_row(rows[0])


def _key(key: EventKey) -> dict[str, Any]:
    return {"source": key[0], "event_id": key[1]}
