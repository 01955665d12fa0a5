"""The pipeline task: a thin adapter from Celery to ``invoice_mailer.pipeline``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from celery import Task

from invoice_mailer.pipeline import Done, Duplicate, Job, RetryLater

if TYPE_CHECKING:
    from tasks._app import InvoiceMailerCelery

__all__ = ["TASK_NAME", "job_repr", "register"]

# Reads as what it does in Flower and in logs.
TASK_NAME = "invoice_mailer.resend_invoice_email"


def job_repr(job: Job) -> str:
    """What Flower and task events show of a job: ids, never addresses."""
    return repr({"event": job.event.event_id, "invoice": job.event.invoice})


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
        if isinstance(outcome, Duplicate):
            return {"outcome": "duplicate", "event": outcome.record.outcome_event_id}
        return {
            "outcome": "email_queued" if isinstance(outcome, Done) else "email_failed",
            "event": outcome.event["id"],
        }
