"""Celery's worker consumer, with monitoring events published without confirms.

Celery opens the connection for its monitoring events (what Flower reads) with
the broker's transport options, so ``confirm_publish`` made every task event
wait for a broker round trip, three per task, flushed from the event loop. Those
events are best-effort by design (Celery buffers and drops them while the broker
is away); the publishes that carry work (tasks, retries, outgoing events, dead
letters) keep their confirms. ``connection_for_write`` is used by the Events
bootstep alone.
"""

from __future__ import annotations

from typing import Any

from celery.worker.consumer import Consumer as CeleryConsumer

__all__ = ["Consumer"]


class Consumer(CeleryConsumer):  # type: ignore[misc]
    def connection_for_write(self, url: str | None = None, heartbeat: float | None = None) -> Any:
        return self.ensure_connected(
            self.app.connection_for_write(
                url=url, heartbeat=heartbeat, transport_options={"confirm_publish": False}
            )
        )
