"""Following pipeline tasks through Celery's own event stream (what Flower reads).

``wait_settled(n)`` returns once ``n`` deliveries of raw events were taken up by
a worker (a first attempt announces itself as a received task with no retries)
and every task's latest event is final (succeeded or failed) with no retry of it
still parked: nothing then runs or waits in the broker. An event's task id is
derived from the event and a retry keeps it; two deliveries of one event run at
once share it, so a retry sent (``task-sent``) counts as parked until a worker
receives it.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any

from celery import Celery

FINAL = {"task-succeeded", "task-failed", "task-rejected", "task-revoked"}


class TaskWatcher:
    def __init__(self, broker_url: str) -> None:
        self._app = Celery(broker=broker_url, set_as_current=False)
        self._lock = threading.Lock()
        self.latest: dict[str, str] = {}
        self.results: list[Any] = []
        """Every task-succeeded's result, in arrival order (one task may finish twice:
        a duplicate delivery of its event runs under the same id)."""
        self.taken_up = 0
        self.retried: Counter[str] = Counter()
        """task-retried events per task id."""
        self.exceptions: dict[str, list[str]] = {}
        """What each task-retried and task-failed said, per task id, in arrival order."""
        self._parked: Counter[str] = Counter()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise AssertionError("could not subscribe to Celery events")

    def _on_event(self, event: dict[str, Any]) -> None:
        kind, uuid = event.get("type", ""), event.get("uuid")
        if not kind.startswith("task-") or uuid is None:
            return
        with self._lock:
            if kind == "task-received" and not event.get("retries"):
                self.taken_up += 1
            elif kind == "task-received":
                self._parked[uuid] -= 1
            elif kind == "task-sent":
                self._parked[uuid] += 1
            if kind == "task-succeeded":
                self.results.append(event.get("result"))
            if kind == "task-retried":
                self.retried[uuid] += 1
            if kind in ("task-retried", "task-failed"):
                self.exceptions.setdefault(uuid, []).append(str(event.get("exception")))
            # Events of one task can arrive out of order across connections; a final
            # state is only undone by a later receipt (a retry comes back as received).
            previous = self.latest.get(uuid)
            if previous in FINAL and kind in ("task-sent", "task-started"):
                return
            self.latest[uuid] = kind

    def _run(self) -> None:
        with self._app.connection() as conn:
            receiver = self._app.events.Receiver(conn, handlers={"*": self._on_event})
            ready = receiver.on_consume_ready

            def on_consume_ready(*args: Any, **kwargs: Any) -> None:
                ready(*args, **kwargs)
                self._ready.set()  # our queue is bound: no event from now on is missed

            receiver.on_consume_ready = on_consume_ready
            self._receiver = receiver
            receiver.capture(limit=None, timeout=None, wakeup=False)

    def pending(self) -> list[str]:
        with self._lock:
            return [
                uuid
                for uuid, kind in self.latest.items()
                if kind not in FINAL or self._parked[uuid] > 0
            ]

    def wait_settled(self, taken_up: int, *, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                seen = self.taken_up
            pending = self.pending()
            if seen >= taken_up and not pending:
                return
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"tasks not settled after {timeout}s: {seen}/{taken_up} taken up, "
                    f"pending {pending[:5]}"
                )
            time.sleep(0.05)

    def close(self) -> None:
        self._receiver.should_stop = True
        self._thread.join(5)
        self._app.close()
