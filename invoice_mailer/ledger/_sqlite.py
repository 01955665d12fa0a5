"""SQLite backend: one file, WAL, safe for the worker processes of one host."""

from __future__ import annotations

import contextlib
import queue
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from invoice_mailer.ledger._base import InvoiceBusy, LedgerError
from invoice_mailer.ledger._sql import Run, SqlLedger
from invoice_mailer.patching import patched

__all__ = ["SqliteLedger"]

# How long a caller waits for its statement: beyond SQLite's busy timeout.
WAIT_SECONDS = 90.0
_BUSY_TIMEOUT_SECONDS = 30.0


class _Statement:
    """One statement handed to the writer, and a one-shot latch for its answer."""

    __slots__ = ("_done", "error", "params", "rows", "sql")

    def __init__(self, sql: str, params: tuple[Any, ...]) -> None:
        self.sql = sql
        self.params = params
        self.rows: list[dict[str, Any]] = []
        self.error: sqlite3.Error | None = None
        self._done = threading.Lock()
        self._done.acquire()  # released once answered: the cheapest latch there is

    def answer(self, rows: list[dict[str, Any]], error: sqlite3.Error | None) -> None:
        self.rows, self.error = rows, error
        self._done.release()

    def wait(self) -> list[dict[str, Any]]:
        if not self._done.acquire(timeout=WAIT_SECONDS):
            raise LedgerError(f"SQLite ledger: no answer within {WAIT_SECONDS:.0f}s")
        return _outcome(self.rows, self.error)


def _outcome(rows: list[dict[str, Any]], error: sqlite3.Error | None) -> list[dict[str, Any]]:
    if isinstance(error, sqlite3.IntegrityError):
        # The only constraint a statement can break is one resend per invoice.
        raise InvoiceBusy(str(error))
    if error is not None:
        raise LedgerError(f"SQLite ledger: {error}") from error
    return rows


def _run(
    conn: sqlite3.Connection, sql: str, params: tuple[Any, ...] | dict[str, Any]
) -> list[dict[str, Any]]:
    return [dict(row) for row in conn.execute(sql, params).fetchall()]


class SqliteLedger(SqlLedger):
    """One connection per process, owned by a writer thread; statements autocommit.

    Callers queue a statement and wait on a latch for its answer. Why not a lock
    around a shared connection: a thread that wins the lock must then win the GIL
    back before it can use the connection, and again after the SQLite call, and
    the lock is held all that time; under ``python -m bench`` threads waited 11 ms
    per statement for a lock held 0.5 ms. Why not a connection per thread: they
    queue in SQLite's busy handler, which sleeps 1, 2, 5, 10 ms... between probes.
    Why not several statements per commit: the transaction holds SQLite's write
    lock while the writer waits for the GIL between statements, and the writers
    of other processes sleep in the busy handler meanwhile (two processes on one
    file ran no faster than one). In autocommit the write lock is held only
    inside SQLite, for microseconds. (These were measured on the threads pool; on
    gevent's the writer is a greenlet, and the ledger was 13% of a worker's CPU.)

    Statements reach SQLite with positional parameters (``?``), compiled from the
    ``:name`` ones (``_statements.py``) and bound in the caller's thread. CPython's
    sqlite3 gives up the GIL to look each named parameter up, and must win it back
    each time: with one other thread busy, an insert of 8 named parameters took
    1.2 ms, positional 0.1 ms.

    Among greenlets (``inline``, the default under gevent's patching) none of that
    applies: a statement runs in its caller, under a lock no greenlet waits on for
    long, since an SQLite call never yields; the hop to a writer greenlet and back
    cost two switches through the hub per statement. With no other thread to win
    the GIL back from, SQLite binds the ``:name`` parameters itself, and the
    compiler (SQLAlchemy, 12 MB of a worker's memory) is never imported.
    """

    def __init__(self, path: str, *, inline: bool | None = None) -> None:
        self._path = path
        if path != ":memory:":
            try:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise LedgerError(f"cannot open SQLite ledger {path!r}: {exc}") from exc
        self._conn = self._connect()
        self._migrate()
        self._inline_lock = threading.Lock()
        self._queue: queue.SimpleQueue[_Statement | None] = queue.SimpleQueue()
        self._closing = threading.Lock()
        self._closed = False
        self._writer: threading.Thread | None = None  # None: statements run inline
        if not (patched("threading") if inline is None else inline):
            self._writer = threading.Thread(
                target=self._write_loop, name="ledger-writer", daemon=True
            )
            self._writer.start()

    def _connect(self) -> sqlite3.Connection:
        try:
            # Autocommit (only the migration opens a transaction); the busy timeout
            # makes writers of other processes queue instead of failing at once.
            conn = sqlite3.connect(
                self._path,
                timeout=_BUSY_TIMEOUT_SECONDS,
                isolation_level=None,
                check_same_thread=False,  # opened here, used by the writer thread only
            )
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL survives kill -9
        except sqlite3.Error as exc:
            raise LedgerError(f"cannot open SQLite ledger {self._path!r}: {exc}") from exc
        return conn

    def _execute(self, sql: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        if self._closed:
            raise LedgerError("SQLite ledger: closed")
        if self._writer is None:
            with self._inline_lock:
                if self._closed:
                    raise LedgerError("SQLite ledger: closed")
                try:
                    rows = _run(self._conn, sql, params)
                except sqlite3.Error as exc:
                    return _outcome([], exc)
            return rows
        from invoice_mailer.ledger._statements import for_sqlite  # threads only

        sql, names = for_sqlite(sql)
        statement = _Statement(sql, tuple(params[name] for name in names))
        self._queue.put(statement)
        return statement.wait()

    # -- the writer thread -------------------------------------------------------------------

    def _write_loop(self) -> None:
        while (statement := self._queue.get()) is not None:
            try:
                rows = _run(self._conn, statement.sql, statement.params)
            except sqlite3.Error as exc:
                statement.answer([], exc)
            else:
                statement.answer(rows, None)
        # Queued after close() began: answered, not left waiting.
        while True:
            try:
                late = self._queue.get_nowait()
            except queue.Empty:
                return
            if late is not None:
                late.answer([], sqlite3.OperationalError("the ledger is closed"))

    # -- schema and shutdown -----------------------------------------------------------------

    @contextlib.contextmanager
    def _migration(self) -> Iterator[Run]:
        # On the connection before the writer owns it; BEGIN IMMEDIATE takes SQLite's
        # write lock: one migrator at a time, across processes.
        conn = self._conn

        def run(sql: str, params: dict[str, Any]) -> list[dict[str, Any]]:
            return _run(conn, sql, params)  # no other thread yet: SQLite binds the names

        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield run
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise LedgerError(f"cannot migrate SQLite ledger {self._path!r}: {exc}") from exc

    def close(self) -> None:
        """Answer what is queued, stop the writer, close the file."""
        with self._closing:
            if self._closed:
                return
            self._closed = True
        if self._writer is not None:
            self._queue.put(None)
            self._writer.join()
        with self._inline_lock:
            self._conn.close()
