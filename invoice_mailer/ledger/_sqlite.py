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
    """One connection per thread (sqlite3 connections are not shared), autocommit."""

    def __init__(self, path: str) -> None:
        self._path = path
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._migrate()

    def _connection(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            try:
                # Autocommit: each statement is its own transaction. busy timeout:
                # writers from other processes queue instead of failing at once.
                conn = sqlite3.connect(
                    self._path,
                    timeout=30,
                    isolation_level=None,
                    check_same_thread=False,  # used by one thread; closed by another at exit
                )
                conn.row_factory = sqlite3.Row
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL survives kill -9
            except sqlite3.Error as exc:
                raise LedgerError(f"cannot open SQLite ledger {self._path!r}: {exc}") from exc
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        return conn

    def _execute(self, sql: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        try:
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
            for conn in self._all:
                conn.close()
            self._all.clear()
        self._local = threading.local()
