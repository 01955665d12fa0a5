"""How many messages wait in the broker, per queue: asked with passive declares."""

from __future__ import annotations

import threading
import time
from typing import Any

from kombu.connection import Connection

__all__ = ["QueueDepths", "queue_depths"]

DELAY_LEVELS = 28  # Celery's native delayed delivery: celery_delayed_0 .. celery_delayed_27


def queue_depths(
    url: str, queues: dict[str, str], *, delayed: bool = True
) -> dict[tuple[str, str], int]:
    """``{(queue, "ready"): n, ..., ("delayed", "parked"): n}`` over one short connection
    (``delayed=False``: without the parked retries' count)."""
    with Connection(url, connect_timeout=3) as conn:
        return _Reader(conn).read(queues, delayed=delayed)


class QueueDepths:
    """The same, for a scrape every few seconds: one connection and one channel kept
    between scrapes (not a connection and 31 channels each time), and the answer kept
    ``max_age`` seconds, so that several scrapers ask the broker once."""

    def __init__(self, url: str, queues: dict[str, str], *, max_age: float = 5.0) -> None:
        self._url = url
        self._queues = queues
        self._max_age = max_age
        self._lock = threading.Lock()
        self._conn: Connection | None = None
        self._reader: _Reader | None = None
        self._cached: tuple[float, dict[tuple[str, str], int]] | None = None

    def read(self) -> dict[tuple[str, str], int]:
        with self._lock:
            now = time.monotonic()
            if self._cached is not None and now - self._cached[0] < self._max_age:
                return self._cached[1]
            fresh = self._reader is None
            try:
                counts = self._connected().read(self._queues)
            except Exception:
                self.close()
                if fresh:
                    raise
                counts = self._connected().read(self._queues)  # the kept one went stale
            self._cached = (now, counts)
            return counts

    def _connected(self) -> _Reader:
        if self._reader is None:
            self._conn = Connection(self._url, connect_timeout=3)
            self._reader = _Reader(self._conn)
        return self._reader

    def close(self) -> None:
        if self._conn is not None:
            self._conn.collect()
        self._conn = self._reader = None


class _Reader:
    """Passive declares on one channel; a failed one (the queue is missing) closes it,
    so only then is a new channel opened."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._channel: Any = None

    def read(self, queues: dict[str, str], *, delayed: bool = True) -> dict[tuple[str, str], int]:
        counts = {(label, "ready"): self._count(name) for label, name in queues.items()}
        if delayed:
            levels = (self._count(f"celery_delayed_{level}") for level in range(DELAY_LEVELS))
            counts[("delayed", "parked")] = sum(levels)
        return counts

    def _count(self, name: str) -> int:
        if self._channel is None:
            self._channel = self._conn.channel()
        try:
            return int(self._channel.queue_declare(name, passive=True).message_count)
        except self._conn.channel_errors:
            self._channel = None  # the broker closed it
            return 0
