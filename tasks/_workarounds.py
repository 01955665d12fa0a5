"""Workarounds of Celery's behaviour, each with the upstream code it works around.

Each has a test in ``tests/unit/test_upstream.py`` that fails once upstream changes
the behaviour, so the workaround can be dropped rather than carried forever. (The
httpx and httpcore ones are in ``invoice_mailer/billing/_http.py``, the kombu ones in
``broker/_publisher.py``: each beside the one module that adapts that library.)
"""

from __future__ import annotations

from typing import Any

from celery.exceptions import Retry
from celery.worker.consumer import Consumer as CeleryConsumer

__all__ = ["Consumer", "ReadableRetry"]


class Consumer(CeleryConsumer):  # type: ignore[misc]
    """Celery's worker consumer, with its monitoring events published without confirms.

    ``Consumer.connection_for_write`` (5.7.0) opens the connection for task events
    (what Flower reads) with the app's broker transport options, so our
    ``confirm_publish`` made every task event wait for a broker round trip, three per
    task, flushed from the event loop. Those events are best effort by design (Celery
    buffers and drops them while the broker is away); the publishes that carry work
    (tasks, retries, outgoing events, dead letters) keep their confirms. The method
    is used by the Events bootstep alone.
    """

    def connection_for_write(self, url: str | None = None, heartbeat: float | None = None) -> Any:
        return self.ensure_connected(
            self.app.connection_for_write(
                url=url, heartbeat=heartbeat, transport_options={"confirm_publish": False}
            )
        )


class ReadableRetry(Retry):  # type: ignore[misc]
    """A ``Retry`` whose repr is its cause: what Flower shows for ``task-retried``.

    ``celery.worker.request.Request.on_retry`` (5.7.0) sends
    ``safe_repr(exc_info.exception.exc)``, but ``celery.app.trace.handle_retry`` built
    ``exc_info`` with ``billiard.einfo.ExceptionInfo``, which wraps the exception in an
    ``ExceptionWithTraceback``: ``.exception.exc`` is then the ``Retry`` itself, and
    Flower shows ``Retry(Retry(...), Waiting('...'), 6)`` instead of the cause.
    """

    @classmethod
    def of(cls, retry: Retry) -> ReadableRetry:
        return cls(retry.message, retry.exc, retry.when, is_eager=retry.is_eager, sig=retry.sig)

    def __repr__(self) -> str:
        return repr(self.exc)
