"""SQLite backend: one file, WAL, safe for the worker processes of one host."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Any

from invoice_mailer.ledger._base import LedgerError
from invoice_mailer.ledger._sql import MIGRATIONS, SCHEMA_TABLE, SqlLedger

__all__ = ["SqliteLedger"]


class SqliteLedger(SqlLedger):
    """One connection per process, one statement at a time, autocommit.

    SQLite lets one writer in at a time whatever we do. Threads queued on our lock
    are let in the moment it is free; threads queued in SQLite's busy handler sleep
    (1, 2, 5, 10 ms...) and try again: with 32 threads on their own connections that
    was thousands of sleeps and lock probes a second (strace under ``python -m bench``).
    Other processes on the same file still wait in the busy handler.
    """

    def __init__(self, path: str) -> None:
        self._path = path
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._migrate()

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            try:
                # Autocommit: each statement is its own transaction. busy timeout:
                # writers from other processes queue instead of failing at once.
                conn = sqlite3.connect(
                    self._path,
                    timeout=30,
                    isolation_level=None,
                    check_same_thread=False,  # shared by the threads, one at a time
                )
                conn.row_factory = sqlite3.Row
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL survives kill -9
            except sqlite3.Error as exc:
                raise LedgerError(f"cannot open SQLite ledger {self._path!r}: {exc}") from exc
            self._conn = conn
        return self._conn

    def _execute(self, sql: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        try:
            with self._lock:
                cursor = self._connection().execute(sql, params)
                return [dict(row) for row in cursor.fetchall()]
        except sqlite3.Error as exc:
            raise LedgerError(f"SQLite ledger: {exc}") from exc

    def _migrate(self) -> None:
        conn = self._connection()
        try:
            conn.execute("BEGIN IMMEDIATE")  # one migrator at a time, across processes
            try:
                conn.execute(f"CREATE TABLE IF NOT EXISTS {SCHEMA_TABLE} (version INTEGER)")
                row = conn.execute(f"SELECT MAX(version) FROM {SCHEMA_TABLE}").fetchone()
                current = row[0] or 0
                for version, statements in MIGRATIONS:
                    if version > current:
                        for statement in statements:
                            conn.execute(statement)
                        conn.execute(f"INSERT INTO {SCHEMA_TABLE} VALUES (?)", (version,))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise LedgerError(f"cannot migrate SQLite ledger {self._path!r}: {exc}") from exc

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
