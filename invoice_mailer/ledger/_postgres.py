"""PostgreSQL backend: for workers on several hosts."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from invoice_mailer.ledger._base import InvoiceBusy, LedgerError
from invoice_mailer.ledger._sql import Run, SqlLedger
from invoice_mailer.ledger._statements import for_psycopg

__all__ = ["PostgresLedger"]

# Any fixed number: serialises migrations of every process sharing the database.
_MIGRATION_LOCK = 0x1A7_0_1CE
CONNECT_TIMEOUT_SECONDS = 5
WAIT_SECONDS = 10.0
# A statement on a link that went silent fails within about 4 s instead of waiting
# for TCP to give up (minutes): what it sent unacknowledged for 4 s
# (tcp_user_timeout), or no reply and no keepalive answered for 2 + 2 x 1 s. The
# run then waits in the broker; a reply that arrives late anyway is met by the
# pipeline's lease check (Pipeline._lease_uncertain) before any POST.
_NETWORK_BOUNDS = {
    "tcp_user_timeout": 4000,  # milliseconds
    "keepalives": 1,
    "keepalives_idle": 2,
    "keepalives_interval": 1,
    "keepalives_count": 2,
}


class PostgresLedger(SqlLedger):
    """A small connection pool per process, autocommit statements."""

    def __init__(self, url: str, *, pool_size: int = 10) -> None:
        # Bounded waits: a statement, or the first connection, gives up well inside a
        # run's lease, and the run then waits in the broker instead of a thread.
        self._pool = ConnectionPool(
            url,
            min_size=1,
            max_size=pool_size,
            kwargs={
                "autocommit": True,
                "connect_timeout": CONNECT_TIMEOUT_SECONDS,
                **_NETWORK_BOUNDS,
            },
            open=False,
            timeout=WAIT_SECONDS,
        )
        try:
            self._pool.open(wait=True, timeout=WAIT_SECONDS)
            self._migrate()
        except (psycopg.Error, LedgerError) as exc:
            self._pool.close()  # its workers would go on reconnecting in the background
            if isinstance(exc, LedgerError):
                raise
            raise LedgerError(f"cannot connect to the PostgreSQL ledger: {exc}") from None

    def _execute(self, sql: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        try:
            with self._pool.connection() as conn, conn.cursor(row_factory=dict_row) as cursor:
                cursor.execute(for_psycopg(sql), params)
                return list(cursor.fetchall()) if cursor.description else []
        except psycopg.errors.UniqueViolation as exc:
            # The only constraint a statement can break is one resend per invoice.
            raise InvoiceBusy(str(exc)) from None
        except psycopg.Error as exc:  # PoolTimeout included
            raise LedgerError(f"PostgreSQL ledger: {exc}") from exc

    @contextlib.contextmanager
    def _migration(self) -> Iterator[Run]:
        # One transaction holding an advisory lock: one migrator at a time, across hosts.
        try:
            with self._pool.connection() as conn, conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
                cursor = conn.cursor(row_factory=dict_row)

                def run(sql: str, params: dict[str, Any]) -> list[dict[str, Any]]:
                    cursor.execute(for_psycopg(sql), params)
                    return list(cursor.fetchall()) if cursor.description else []

                yield run
        except psycopg.Error as exc:
            raise LedgerError(f"cannot migrate the PostgreSQL ledger: {exc}") from exc

    def close(self) -> None:
        self._pool.close()
