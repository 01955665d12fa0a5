"""The pipeline as Celery work: one task, and every attempt of it a Celery task execution.

A new event's first attempt is its raw message, handed to the task's own strategy
as a protocol-2 task message (``run_first_attempt``), the way Celery's consumer
hands over its own messages (``celery/worker/consumer/consumer.py``,
``on_task_received``). Celery's ``Request`` then runs it in the pool, sends its
task events, lists it for ``inspect active``, honours ``revoke``, fires the task
signals that Sentry's and OpenTelemetry's Celery integrations hook into, and
settles the raw message with its ack or reject: no second broker hop, no second
runtime. A retry is ``Task.retry``: a task message on the task queue, parked in
RabbitMQ by native delayed delivery until due, under the same task id.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from celery import Task
from celery.exceptions import Reject
from kombu.message import Message
from kombu.serialization import dumps
from pydantic import ValidationError
from vine import promise

from invoice_mailer.events import outgoing_event_id
from invoice_mailer.job import EventRef, Job
from invoice_mailer.ledger import LedgerError
from invoice_mailer.pipeline import Done, Duplicate, GaveUp, RetryLater
from tasks._queues import TASK_QUEUE
from tasks._workarounds import ReadableRetry

if TYPE_CHECKING:
    from tasks._app import InvoiceMailerCelery

__all__ = [
    "TASK_NAME",
    "EventGaveUp",
    "Waiting",
    "job_repr",
    "register",
    "run_first_attempt",
    "task_id_for",
]

log = logging.getLogger("invoice_mailer.task")

# Reads as what it does in Flower and in logs.
TASK_NAME = "invoice_mailer.resend_invoice_email"


class EventGaveUp(Exception):
    """The task's failure when an event is given up: Flower shows it with its reason.

    Expected (the task's ``throws``): Celery logs it without a traceback and Sentry's
    Celery integration does not report it; the API's answer was already handled. Its
    one argument is its message, so that Celery can pickle it for the task events.
    """

    @classmethod
    def of(cls, reason: dict[str, Any]) -> EventGaveUp:
        """From ``invoice.email_failed``'s ``reason``: "resend 404 not_found: detail"."""
        answer = " ".join(str(p) for p in (reason["status"], reason["code"]) if p is not None)
        return cls(f"{reason['step']} {answer}: {reason['detail']}")


class Waiting(Exception):
    """The ``exc`` of a retry: Flower shows "resend 429 rate_limited, retry in 6 s"."""


def job_repr(job: Job) -> str:
    """What Flower and task events show of a job: ids, never addresses."""
    return repr({"event": job.event.event_id, "invoice": job.event.invoice})


def task_id_for(event: EventRef) -> str:
    """The task id of an event: the same on every delivery, so Flower shows one task."""
    return outgoing_event_id(TASK_NAME, event.source, event.event_id)


def summary(outcome: Done | Duplicate) -> dict[str, Any]:
    """The task's result, as Flower shows it."""
    if isinstance(outcome, Duplicate):
        return {"outcome": "duplicate", "event": outcome.record.outcome_event_id}
    return {"outcome": "email_queued", "event": outcome.event["id"]}


def register(app: InvoiceMailerCelery) -> None:
    # max_retries=None on the task, not on retry(): there None means "the task's default".
    # acks_on_failure: a failure is an event given up (its dead letter is written) or a
    # task that could not even be read; bugs are rejected (Reject) into the dead-letter
    # queue explicitly below.
    @app.task(
        bind=True,
        name=TASK_NAME,
        acks_late=True,
        reject_on_worker_lost=True,
        acks_on_failure=True,
        max_retries=None,
        throws=(EventGaveUp,),
    )
    def resend_invoice_email(self: Task, job: dict[str, Any]) -> dict[str, Any]:
        """Resend one invoice email, read where it went, publish the outcome."""
        try:
            parsed = Job.model_validate(job)
        except ValidationError as exc:
            # Not a message this service wrote: the broker's dead-letter queue keeps it.
            log.error("unreadable task message: %s", exc.errors(include_input=False))
            raise Reject(f"unreadable job: {exc.error_count()} errors", requeue=False) from None
        try:
            outcome = _run(app, parsed)
        except Exception as exc:
            # A bug, not an API answer: log it (Sentry reports error logs) and let the
            # queue dead-letter the message (x-death says why).
            log.exception("unexpected error running an event; rejecting it")
            raise Reject(repr(exc), requeue=False) from exc
        if isinstance(outcome, RetryLater):
            try:
                retry = self.retry(
                    kwargs={"job": outcome.job.wire()},
                    countdown=outcome.delay_seconds,
                    exc=Waiting(outcome.describe()),
                    kwargsrepr=job_repr(outcome.job),
                    throw=False,
                )
            except Reject as exc:
                # Celery could not publish the retry and rejects without requeue; the
                # event must not be dead-lettered for the broker's trouble: requeue it.
                log.warning("could not park a retry; the broker keeps the event: %s", exc)
                raise Reject(exc.reason, requeue=True) from exc
            raise ReadableRetry.of(retry)
        if isinstance(outcome, GaveUp):
            raise EventGaveUp.of(outcome.reason)
        return summary(outcome)


def _run(app: InvoiceMailerCelery, job: Job) -> Done | GaveUp | Duplicate | RetryLater:
    try:
        pipeline = app.runtime.pipeline
    except LedgerError as exc:  # the ledger cannot be opened (yet): wait, never fail
        return app.runtime.wait_for_ledger(job, exc)
    return pipeline.run(job)


def run_first_attempt(consumer: Any, raw: Message, job: Job) -> None:
    """Run the task for a raw event's message, as Celery runs its own task messages.

    ``consumer`` is the worker's ``celery.worker.consumer.Consumer``. The task
    message is a view of the raw delivery (same channel and delivery tag), so the
    Request's ack or reject settles the raw message; its routing names the task
    queue, where ``Task.retry`` sends a retry.
    """
    app = consumer.app
    task_id = task_id_for(job.event)
    message = app.amqp.as_task_v2(
        task_id,
        TASK_NAME,
        args=(),
        kwargs={"job": job.wire()},
        argsrepr="()",
        kwargsrepr=job_repr(job),
        root_id=task_id,
    )
    content_type, content_encoding, body = dumps(message.body, serializer="json")
    view = Message(
        body=body,
        delivery_tag=raw.delivery_tag,
        content_type=content_type,
        content_encoding=content_encoding,
        delivery_info={**raw.delivery_info, "exchange": TASK_QUEUE, "routing_key": TASK_QUEUE},
        properties={**message.properties, "delivery_mode": 2},
        headers=message.headers,
        channel=raw.channel,
    )
    strategy = consumer.strategies[TASK_NAME]
    strategy(
        view,
        None,
        promise(consumer.call_soon_ack, (view.ack_log_error,)),
        promise(consumer.call_soon_ack, (view.reject_log_error,)),
        consumer.on_task_message,
    )
