"""PostgreSQL backend: for workers on several hosts."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from invoice_mailer.ledger._base import LedgerError
from invoice_mailer.ledger._sql import MIGRATIONS, SCHEMA_TABLE, SqlLedger, pyformat

__all__ = ["PostgresLedger"]

# Any fixed number: serialises migrations of every process sharing the database.
_MIGRATION_LOCK = 0x1A7_0_1CE


class PostgresLedger(SqlLedger):
    """A small connection pool per process, autocommit statements."""

    def __init__(self, url: str, *, pool_size: int = 10) -> None:
        try:
            self._pool = ConnectionPool(
                url,
                min_size=1,
                max_size=pool_size,
                kwargs={"autocommit": True},
                open=True,
                timeout=30,
            )
            self._pool.wait(timeout=30)
        except (psycopg.Error, TimeoutError) as exc:
            raise LedgerError(f"cannot connect to the PostgreSQL ledger: {exc}") from None
        self._migrate()

    def _execute(self, sql: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        try:
            with self._pool.connection() as conn, conn.cursor(row_factory=dict_row) as cursor:
                cursor.execute(pyformat(sql), params)
                return list(cursor.fetchall()) if cursor.description else []
        except psycopg.Error as exc:
            raise LedgerError(f"PostgreSQL ledger: {exc}") from exc

    def _migrate(self) -> None:
        try:
            with self._pool.connection() as conn, conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
                conn.execute(f"CREATE TABLE IF NOT EXISTS {SCHEMA_TABLE} (version INTEGER)")
                row = conn.execute(f"SELECT MAX(version) FROM {SCHEMA_TABLE}").fetchone()
                current = int(row[0] or 0) if row else 0
                for version, statements in MIGRATIONS:
                    if version > current:
                        for statement in statements:
                            conn.execute(statement)
                        conn.execute(f"INSERT INTO {SCHEMA_TABLE} VALUES (%s)", (version,))
        except psycopg.Error as exc:
            raise LedgerError(f"cannot migrate the PostgreSQL ledger: {exc}") from exc

    def close(self) -> None:
        self._pool.close()
