"""The raw-event consumer: ``invoice.reissued`` from RabbitMQ into the pipeline.

It runs on the worker's event loop (a Celery consumer bootstep), so it does no
HTTP and nothing slow: it validates the event and hands its message to the
task's own strategy (``tasks.pipeline.run_first_attempt``), so the first attempt
is a Celery task execution like every retry, and its Request settles the message
when the attempt is over. Events that can never be processed are dead-lettered with their reason,
and an ``invoice.email_failed`` is published; the worker goes on with the next
one. Nothing raised here may escape: an exception from a callback stops the worker.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

from celery import bootsteps
from celery.concurrency.gevent import TaskPool as GeventPool
from celery.concurrency.thread import TaskPool as ThreadPool
from kombu import Consumer
from kombu.message import Message

from broker import TopologyMismatch, raw_body
from invoice_mailer.errors import InvalidEvent, PublishError
from invoice_mailer.events import parse_reissued
from invoice_mailer.intake import reject
from invoice_mailer.job import Job
from invoice_mailer.observe import StepRecord
from invoice_mailer.patching import patched
from invoice_mailer.publishing import REPLAY_HEADER
from settings import SettingsError, exit_config
from tasks import InvoiceMailerCelery
from tasks.pipeline import run_first_attempt

__all__ = ["PREFETCH_PER_THREAD", "ReissuedEventConsumer", "WrongPool"]

log = logging.getLogger("invoice_mailer.consumer")

# Unacked raw events one worker holds per thread of its pool: one running and one
# queued for each thread; small enough that a backlog stays in the broker (and
# with other workers).
PREFETCH_PER_THREAD = 2


class WrongPool(RuntimeError):
    """The worker runs a pool the pipeline cannot share (it needs gevent or threads)."""


def check_pool(pool: Any) -> None:
    """The pools the pipeline runs on: gevent (the default) and threads.

    prefork would pickle the work into child processes (the HTTP client, ledger and
    publisher are per process); solo would run it on the event loop. gevent works
    only patched, and Celery patches only for ``--pool gevent`` on the command line
    (``celery.__main__.maybe_patch_concurrency``, before anything is imported): the
    same pool named in the configuration alone would run every socket call blocking
    the whole process.
    """
    if isinstance(pool, GeventPool):
        if not patched("socket"):
            raise WrongPool(
                "the gevent pool needs gevent's patching: give --pool gevent on the command line"
            )
    elif not isinstance(pool, ThreadPool):
        raise WrongPool("invoice-mailer runs on the gevent or threads pool: use --pool gevent")


class ReissuedEventConsumer(bootsteps.ConsumerStep):  # type: ignore[misc]
    """Consumes the durable ``invoice-mailer.reissued`` queue inside the worker."""

    # The task strategies must exist before the first raw event is handed to one, and
    # the delay queues before its first retry. Last of the consumer's steps: an event
    # taken before the others start waits for them (the delay queues' declaration,
    # 28 exchanges and queues, took 250 ms).
    requires = (
        "celery.worker.consumer.connection:Connection",
        "celery.worker.consumer.tasks:Tasks",
        "tasks._startup:DelayedDeliveryCheck",
        "tasks._workarounds:BufferedTaskEvents",
        "celery.worker.consumer.control:Control",
        "celery.worker.consumer.heart:Heart",
    )

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.app: InvoiceMailerCelery = parent.app
        self._consumer: Any = None  # celery.worker.consumer.Consumer, set in start()
        self._prefetch = PREFETCH_PER_THREAD
        self._paused = False
        self._probe_window = False  # taking events only so that one can probe an outage
        self._watch: Any = None

    def start(self, c: Any) -> None:
        check_pool(c.pool)
        self._consumer = c
        self._prefetch = PREFETCH_PER_THREAD * c.pool.limit
        try:
            self.app.settings.topology().declare(c.connection)
        except TopologyMismatch as exc:
            exit_config(SettingsError(str(exc)))
        runtime = self.app.runtime
        runtime.warm()  # before the first event can arrive
        runtime.watch_health(first_turn_wait=2.0)  # and the fleet's health known
        if runtime.paused_because:
            # Celery's ConsumerStep.start but for its consume(): declared, not taking
            # events, which would only wait in the broker again. After a reconnect too:
            # the pause outlives the connection.
            self.consumers = self.get_consumers(c.connection.channel())
            self._paused = True
            log.warning("intake paused: %s", "; ".join(runtime.paused_because))
        else:
            super().start(c)
            self._paused = False
        runtime.ready = True
        # The timer runs its ticks in a greenlet of their own under gevent: the channel
        # is touched only from the consumer's loop (call_soon), never beside it, where
        # a cancel's wait for its answer would read the loop's deliveries.
        self._watch = c.timer.call_repeatedly(1.0, c.call_soon, (self._follow_health,))

    def _follow_health(self) -> None:
        """On the consumer's loop: stop taking raw events while a dependency is
        unhealthy for the fleet (they wait in the broker, not in this worker), resume
        after. While an outage's probe is due intake takes events again, so that one
        can be the probe (``Dependencies.unhealthy``): those windows, one per probe,
        are logged at INFO; the outage's pause and its end, at WARNING."""
        held, sick = self.app.runtime.paused_because, self.app.runtime.unhealthy_because
        try:
            if held and not self._paused:
                for consumer in self.consumers or ():
                    consumer.cancel()
                self._paused = True
                level = logging.INFO if self._probe_window else logging.WARNING
                log.log(level, "intake paused: %s", "; ".join(held))
            elif not held and self._paused:
                for consumer in self.consumers or ():
                    consumer.consume()
                self._paused = False
                self._probe_window = bool(sick)
                if self._probe_window:
                    log.info("intake open while a probe is due: %s", "; ".join(sick))
                else:
                    log.warning("intake resumed")
            elif not held and self._probe_window and not sick:
                self._probe_window = False
                log.warning("intake resumed")
        except Exception:  # a channel gone mid-reconnect: the next tick tries again
            log.warning("could not pause or resume intake", exc_info=True)

    def stop(self, c: Any) -> None:
        self.app.runtime.ready = False
        watch = getattr(self, "_watch", None)
        if watch is not None:
            watch.cancel()
        super().stop(c)

    def shutdown(self, c: Any) -> None:
        self.app.runtime.ready = False
        super().shutdown(c)

    def get_consumers(self, channel: Any) -> list[Consumer]:
        # Runs again on every reconnect, with a new channel: keep no channel state.
        return [
            Consumer(
                channel,
                queues=[self.app.settings.topology().reissued()],
                on_message=self.on_message,  # raw messages: we decode the body ourselves
                prefetch_count=self._prefetch,
                accept=[],
            )
        ]

    def on_message(self, message: Message) -> None:
        try:
            self._handle(message)
        except PublishError:
            # The broker would not take the dead letter: give the event back to it.
            log.warning("could not dead-letter an invalid event; requeueing it", exc_info=True)
            settle_quietly(message.requeue)
        except Exception:
            # A bug, not bad input: the raw queue dead-letters it (x-death says why).
            log.exception("unexpected error handling an event; rejecting it")
            settle_quietly(functools.partial(message.reject, requeue=False))

    def _handle(self, message: Message) -> None:
        body = raw_body(message)
        content_type = message.content_type
        settings = self.app.settings
        try:
            event = parse_reissued(body, content_type, provider=settings.billing_provider)
        except InvalidEvent as invalid:
            self._reject_invalid(body, content_type, message.content_encoding, invalid)
            message.ack()
            return
        replay = REPLAY_HEADER in (message.headers or {})
        job = Job.new(event, body=body.decode("utf-8"), content_type=content_type, replay=replay)
        self._observe(event.event_id, event.invoice, "receive", "accepted")
        run_first_attempt(self._consumer, message, job)

    def _reject_invalid(
        self,
        body: bytes,
        content_type: str | None,
        content_encoding: str | None,
        invalid: InvalidEvent,
    ) -> None:
        rejected = reject(
            self.app.runtime.publisher,
            body,
            invalid,
            provider=self.app.settings.billing_provider,
            content_type=content_type,
            content_encoding=content_encoding,
        )
        self._observe(
            rejected.event_id, None, "validate", "invalid", code=invalid.code, detail=invalid.detail
        )

    def _observe(
        self,
        event_id: str | None,
        invoice: str | None,
        step: str,
        outcome: str,
        **fields: Any,
    ) -> None:
        self.app.runtime.observer.on_step(
            StepRecord(
                event_id=event_id,
                invoice=invoice,
                provider=self.app.settings.billing_provider,
                step=step,
                outcome=outcome,
                **fields,
            )
        )


def settle_quietly(action: Callable[[], object]) -> None:
    """Ack, requeue or reject; on a channel already gone the broker redelivers (celery#4671)."""
    try:
        action()
    except Exception:
        log.warning("could not settle the message; the broker will redeliver it", exc_info=True)
