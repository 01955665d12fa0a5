"""Workarounds of Celery's behaviour, each with the upstream code it works around.

Each has a test in ``tests/unit/test_upstream.py`` that fails once upstream changes
the behaviour, so the workaround can be dropped rather than carried forever. (The
httpx and httpcore ones are in ``invoice_mailer/billing/_http.py``, the kombu ones in
``broker/_publisher.py``: each beside the one module that adapts that library.)
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

from celery.exceptions import Retry
from celery.worker.consumer import Consumer as CeleryConsumer
from celery.worker.consumer import delayed_delivery
from kombu.utils.functional import retry_over_time
from kombu.utils.url import maybe_sanitize_url

__all__ = ["Consumer", "LiveNodeDelayedDelivery", "ReadableRetry"]

log = logging.getLogger("invoice_mailer.startup")

CELERY_DELAYED_DELIVERY = "celery.worker.consumer.delayed_delivery:DelayedDelivery"


class LiveNodeDelayedDelivery(delayed_delivery.DelayedDelivery):  # type: ignore[misc]
    """Celery's delayed-delivery step, declaring over the node the consumer is on.

    ``DelayedDelivery.start`` (5.7.0) declares the delay exchanges and queues on every
    URL of ``broker_url``, each with retries, one after the other. The URLs of a
    failover list are nodes of one cluster, where declaring once is enough; a stopped
    node in the list cost the consumer about 17 s at every (re)start, and a cut-off
    one (no answer at all) about a minute, during which the consumer's own, live
    connection sent no heartbeat, was closed by the broker, and the consumer did not
    come back. This step declares on the node the consumer has just connected to,
    with Celery's own declaration and retries. (Separate brokers in ``broker_url``,
    the case Celery's loop is for, are not a setup this service supports: its ledger
    and topology assume one broker, clustered or not.)
    """

    def start(self, c: Any) -> None:
        self._validate_configuration(c.app)
        url = c.connection.as_uri(include_password=True)
        try:
            retry_over_time(
                self._setup_delayed_delivery,
                args=(c, url),
                catch=delayed_delivery.RETRIED_EXCEPTIONS,
                errback=self._on_retry,
                interval_start=delayed_delivery.RETRY_INTERVAL,
                max_retries=delayed_delivery.MAX_RETRIES,
            )
        except Exception as exc:
            log.warning("could not set up delayed delivery on %s: %s", maybe_sanitize_url(url), exc)


class Consumer(CeleryConsumer):  # type: ignore[misc]
    """Celery's worker consumer, with its monitoring events published without confirms.

    ``Consumer.connection_for_write`` (5.7.0) opens the connection for task events
    (what Flower reads) with the app's broker transport options, so our
    ``confirm_publish`` made every task event wait for a broker round trip, three per
    task, flushed from the event loop. Those events are best effort by design (Celery
    buffers and drops them while the broker is away); the publishes that carry work
    (tasks, retries, outgoing events, dead letters) keep their confirms. The method
    is used by the Events bootstep alone. Its blueprint runs ``LiveNodeDelayedDelivery``
    in place of Celery's delayed-delivery step.
    """

    def connection_for_write(self, url: str | None = None, heartbeat: float | None = None) -> Any:
        return self.ensure_connected(
            self.app.connection_for_write(
                url=url, heartbeat=heartbeat, transport_options={"confirm_publish": False}
            )
        )

    class Blueprint(CeleryConsumer.Blueprint):  # type: ignore[misc]
        default_steps: ClassVar[list[str]] = [
            "tasks._workarounds:LiveNodeDelayedDelivery"
            if step == CELERY_DELAYED_DELIVERY
            else step
            for step in CeleryConsumer.Blueprint.default_steps
        ]


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
