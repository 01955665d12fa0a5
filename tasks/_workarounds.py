"""Workarounds of Celery's behaviour, each with the upstream code it works around.

Each has a test in ``tests/unit/test_upstream.py`` that fails once upstream changes
the behaviour, so the workaround can be dropped rather than carried forever. (The
httpx and httpcore ones are in ``invoice_mailer/billing/_http.py``, the kombu ones in
``broker/_publisher.py``: each beside the one module that adapts that library.)
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

from celery import bootsteps
from celery.exceptions import Retry
from celery.worker import loops
from celery.worker.consumer import Consumer as CeleryConsumer
from celery.worker.consumer import delayed_delivery
from kombu.utils.functional import retry_over_time
from kombu.utils.url import maybe_sanitize_url

__all__ = [
    "BufferedTaskEvents",
    "Consumer",
    "LiveNodeDelayedDelivery",
    "ReadableRetry",
    "glance_at_events_connection",
]

log = logging.getLogger("invoice_mailer.startup")

CELERY_DELAYED_DELIVERY = "celery.worker.consumer.delayed_delivery:DelayedDelivery"
CELERY_EVENTS = "celery.worker.consumer.events:Events"

# How long a task event may wait in the buffer of a green worker before it is sent.
EVENT_FLUSH_SECONDS = 0.1


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


class BufferedTaskEvents(bootsteps.StartStopStep):  # type: ignore[misc]
    """Task events batched on a green pool too, as Celery batches them on its event loop.

    ``Events.start`` (5.7.0) buffers the ``task`` group, sent as one ``task.multi``
    message that Flower's receiver unpacks, only when the worker has an event loop
    ("XXX This excludes eventlet/gevent, which should actually buffer."); a gevent
    worker published each of a task's three events as a message of its own, 12% of
    its CPU (py-spy under ``python -m bench``). This step, after Celery's (it runs
    again on every reconnect, with a new dispatcher), has a green worker buffer them
    too: sent when 24 are waiting (Celery's ``buffer_limit``), every
    ``EVENT_FLUSH_SECONDS``, and on shutdown.
    """

    requires = (CELERY_EVENTS,)

    def start(self, c: Any) -> None:
        dispatcher = c.event_dispatcher
        if c.hub or dispatcher is None:
            return  # with an event loop Celery buffers and flushes itself
        dispatcher.buffer_group = frozenset({"task"})
        self._cancel_flush()
        self._flush = c.timer.call_repeatedly(EVENT_FLUSH_SECONDS, self._flush_from, (c,))

    @staticmethod
    def _flush_from(c: Any) -> None:
        dispatcher = c.event_dispatcher
        if dispatcher is not None:
            try:
                dispatcher.flush()
            except Exception:  # best effort, as Celery's: the next tick tries again
                log.debug("could not flush task events", exc_info=True)

    def _cancel_flush(self) -> None:
        entry = getattr(self, "_flush", None)
        if entry is not None:
            entry.cancel()
            self._flush = None

    def shutdown(self, c: Any) -> None:
        self._cancel_flush()
        self._flush_from(c)


def glance_at_events_connection(connection: Any, timeout: float = 0.0) -> None:
    """Celery's ``_quick_drain``, without the wait: what a green pool's loop runs.

    ``celery.worker.loops.synloop`` (5.7.0), the consumer loop of the gevent pool,
    drains the task-event connection after every frame it reads, with
    ``_quick_drain(connection, timeout=0.1)``, so that the broker's heartbeats on it
    are read. Nothing else ever arrives there: each turn of the loop waited the whole
    0.1 s, and the worker took one message per turn, 10 events a second, whatever
    its concurrency (``python -m bench`` with ``--pool gevent``: 9 events/s, one
    task running at a time). A zero timeout reads what has arrived and returns:
    py-amqp turns the would-block into ``socket.timeout``, which ``_quick_drain``
    swallows. The loop came with AMQP heartbeats for green pools (celery/celery#3649,
    celery/celery#1511); the wait is not reported upstream that we found.
    """
    _celery_quick_drain(connection, timeout=0.0)


_celery_quick_drain = loops._quick_drain


class Consumer(CeleryConsumer):  # type: ignore[misc]
    """Celery's worker consumer, with its monitoring events published without confirms.

    ``Consumer.connection_for_write`` (5.7.0) opens the connection for task events
    (what Flower reads) with the app's broker transport options, so our
    ``confirm_publish`` made every task event wait for a broker round trip, three per
    task, flushed from the event loop. Those events are best effort by design (Celery
    buffers and drops them while the broker is away); the publishes that carry work
    (tasks, retries, outgoing events, dead letters) keep their confirms. The method
    is used by the Events bootstep alone. Its blueprint runs ``LiveNodeDelayedDelivery``
    in place of Celery's delayed-delivery step, and ``BufferedTaskEvents`` after its
    events step. Without an event loop (a green pool) it runs Celery's loop with
    ``glance_at_events_connection``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._link: Any = None  # the AMQP connection the consumers were set up on
        if self.loop is loops.synloop:
            # A module global, read by synloop on every turn: process-wide, as the
            # worker (one per process) is.
            loops._quick_drain = self._glance_at_events

    def connect(self) -> Any:
        conn = super().connect()
        self._link = conn.connection
        return conn

    def check_link(self) -> None:
        """Raise if the consuming connection is gone or was replaced under the loop.

        On a green pool a task acks from its own greenlet (``call_soon_ack``); when
        that ack finds the connection broken, py-amqp collects it, and kombu's
        ``Connection.drain_events`` then quietly connects anew (its ``connection``
        property reconnects, to the next URL of a failover list) and the loop goes on
        draining a connection with no consumer on it: no error, so Celery never
        restarts its consumer (seen: a worker whose node stopped consumed nothing
        more, for good). Raising here, on the loop, is the connection loss Celery
        handles: its consumer restarts, with every step, on the new connection.
        """
        link, current = self._link, getattr(self.connection, "_connection", None)
        if link is not None and (current is not link or not link.connected):
            raise ConnectionResetError("the consuming connection was lost under the loop")

    def _glance_at_events(self, connection: Any, timeout: float = 0.0) -> None:
        """The glance, unless a publisher holds the dispatcher: under gevent the worker
        heartbeat or a task may be waiting on this connection for an answer (an
        exchange's declaration after a reconnect), which the loop's read would take
        from it, leaving it to wait, the dispatcher locked, for a frame that never
        comes. Seen in a greenlet dump of a worker whose broker had closed its
        connections: the heartbeat waiting so, every task waiting to send its events,
        the loop waiting for a free slot of the pool."""
        self.check_link()
        mutex = getattr(self.event_dispatcher, "mutex", None)
        if mutex is None or not mutex.acquire(blocking=False):
            return
        try:
            glance_at_events_connection(connection)
        finally:
            mutex.release()

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
        ] + ["tasks._workarounds:BufferedTaskEvents"]


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
