"""The pipeline as Celery work: the retry task, and the first attempt of a new event.

A new event's first attempt runs straight from the raw-event consumer in the
worker's thread pool (``FirstAttempt``); only an event that must wait becomes a
task message, parked in RabbitMQ by native delayed delivery and run by the task
below. Handing every event to the task queue first cost a second broker round
trip and Celery's task machinery per event, about half of the worker's CPU
(README, "Performance"). Both paths report to Flower as the same task, under an
id derived from the event, so a retry continues the task Flower already shows.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from celery import Task
from kombu.message import Message
from kombu.utils.encoding import safe_repr

from invoice_mailer.errors import PublishError
from invoice_mailer.events import Reissued, outgoing_event_id
from invoice_mailer.metrics import IN_FLIGHT
from invoice_mailer.pipeline import Done, Duplicate, GaveUp, Job, RetryLater

if TYPE_CHECKING:
    from tasks._app import InvoiceMailerCelery

__all__ = ["TASK_NAME", "FirstAttempt", "job_repr", "register", "settle_quietly", "task_id_for"]

log = logging.getLogger("invoice_mailer.consumer")

# Reads as what it does in Flower and in logs.
TASK_NAME = "invoice_mailer.resend_invoice_email"


def job_repr(job: Job) -> str:
    """What Flower and task events show of a job: ids, never addresses."""
    return repr({"event": job.event.event_id, "invoice": job.event.invoice})


def task_id_for(event: Reissued) -> str:
    """The task id of an event: the same on every delivery, so Flower shows one task."""
    return outgoing_event_id(TASK_NAME, event.source, event.event_id)


def summary(outcome: Done | GaveUp | Duplicate) -> dict[str, Any]:
    """The task's result, as Flower shows it."""
    if isinstance(outcome, Duplicate):
        return {"outcome": "duplicate", "event": outcome.record.outcome_event_id}
    return {
        "outcome": "email_queued" if isinstance(outcome, Done) else "email_failed",
        "event": outcome.event["id"],
    }


def register(app: InvoiceMailerCelery) -> None:
    # max_retries=None on the task, not on retry(): there None means "the task's default" (3).
    @app.task(
        bind=True, name=TASK_NAME, acks_late=True, reject_on_worker_lost=True, max_retries=None
    )
    def resend_invoice_email(self: Task, job: dict[str, Any]) -> dict[str, Any]:
        """Resend one invoice email, read where it went, publish the outcome."""
        outcome = app.runtime.pipeline.run(Job.from_dict(job))
        if isinstance(outcome, RetryLater):
            raise self.retry(
                kwargs={"job": outcome.job.to_dict()},
                countdown=outcome.delay_seconds,
                kwargsrepr=job_repr(outcome.job),
            )
        return summary(outcome)


class FirstAttempt:
    """Runs a new event in the worker's thread pool, then settles its raw message.

    The raw message stays unacknowledged until the attempt is over: acked once
    the event is finished or its retry task is confirmed by the broker, requeued
    if that retry could not be published, rejected (dead-lettered) on a bug. A
    killed worker leaves it unacked, and RabbitMQ delivers it again. Acks go
    through the event loop: the channel belongs to its thread.
    """

    def __init__(self, app: InvoiceMailerCelery, consumer: Any) -> None:
        self._app = app
        self._consumer = consumer  # celery.worker.consumer.Consumer: pool, loop, events

    def submit(self, job: Job, message: Message) -> None:
        # Celery's apply_target calls the callback with the result: it must be callable.
        self._consumer.pool.apply_async(self._run, args=(job, message), callback=_ignore)

    def _run(self, job: Job, message: Message) -> None:
        task_id = task_id_for(job.event)
        settle: Callable[[], Any] = message.ack
        IN_FLIGHT.labels("task").inc()
        started = time.monotonic()
        try:
            self._emit(
                "task-received",
                uuid=task_id,
                name=TASK_NAME,
                args="()",
                kwargs=job_repr(job),
                root_id=task_id,
                parent_id=None,
                retries=0,
                eta=None,
                expires=None,
            )
            self._emit("task-started", uuid=task_id, pid=os.getpid())
            outcome = self._app.runtime.pipeline.run(job)
            if isinstance(outcome, RetryLater):
                self._park(task_id, outcome)
                self._emit(
                    "task-retried",
                    uuid=task_id,
                    exception=f"Retry in {outcome.delay_seconds}s: {outcome.step} {outcome.kind}",
                    traceback="",
                )
            else:
                self._emit(
                    "task-succeeded",
                    uuid=task_id,
                    result=safe_repr(summary(outcome)),
                    runtime=time.monotonic() - started,
                )
        except PublishError as exc:
            log.warning("could not park a retry; the broker keeps the event: %s", exc)
            settle = message.requeue
            self._emit("task-failed", uuid=task_id, exception=safe_repr(exc), traceback="")
        except Exception as exc:
            # A bug, not an API answer: the raw queue dead-letters it (x-death says why).
            log.exception("unexpected error running an event; rejecting it")
            settle = functools.partial(message.reject, requeue=False)
            self._emit("task-failed", uuid=task_id, exception=safe_repr(exc), traceback="")
        finally:
            IN_FLIGHT.labels("task").dec()
        self._consumer.call_soon(settle_quietly, settle)

    def _park(self, task_id: str, retry: RetryLater) -> None:
        """The retry as a task, held by RabbitMQ until due (confirmed before the ack)."""
        try:
            self._app.send_task(
                TASK_NAME,
                kwargs={"job": retry.job.to_dict()},
                kwargsrepr=job_repr(retry.job),
                countdown=retry.delay_seconds,
                task_id=task_id,
                retries=1,
            )
        except Exception as exc:
            raise PublishError(f"could not publish the retry task: {exc!r}") from exc

    def _emit(self, kind: str, **fields: Any) -> None:
        """A task event for Flower; best effort, as Celery's own are."""
        dispatcher = self._consumer.event_dispatcher
        if dispatcher is None:
            return
        try:
            dispatcher.send(kind, **fields)
        except Exception:
            log.debug("could not send %s", kind, exc_info=True)


def _ignore(_: object) -> None:
    pass


def settle_quietly(action: Callable[[], object]) -> None:
    """Ack, requeue or reject; on a channel already gone the broker redelivers (celery#4671)."""
    try:
        action()
    except Exception:
        log.warning("could not settle the message; the broker will redeliver it", exc_info=True)
