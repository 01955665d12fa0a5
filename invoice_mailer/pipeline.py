"""One ``invoice.reissued`` through its steps: resend, email-info, publish.

``Pipeline.run`` does as much as it can now and returns an outcome; it never
sleeps. A step to try later comes back as ``RetryLater`` with the job's new
state, which the task adapter hands to the broker to hold. Because that state
records what is done, a retry of email-info never repeats resend.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from invoice_mailer.billing import BillingProvider, ResendResult
from invoice_mailer.errors import BillingError, PublishError
from invoice_mailer.events import (
    EMAIL_FAILED,
    EMAIL_QUEUED,
    Reissued,
    cloud_event,
    outgoing_event_id,
)
from invoice_mailer.policy import (
    GiveUp,
    Retry,
    RetryPolicy,
    StepHistory,
    decide,
    server_error_delay,
    whole_seconds,
)
from invoice_mailer.publisher import DeadLetter, EventPublisher

__all__ = ["Done", "GaveUp", "Job", "Pipeline", "RetryLater", "idempotency_key"]

log = logging.getLogger("invoice_mailer.pipeline")

RESEND = "resend"
EMAIL_INFO = "email_info"
PUBLISH = "publish"


def idempotency_key(event: Reissued, step: str) -> str:
    """The same for every try of one step of one event, and for no other."""
    return outgoing_event_id(f"idempotency:{step}", event.source, event.event_id)


@dataclass(frozen=True, slots=True)
class Job:
    """Everything a try needs: the event, its original body, and what is done."""

    event: Reissued
    body: str
    content_type: str | None
    resend: ResendResult | None = None
    email_info: dict[str, Any] | None = None
    email_info_error: str | None = None
    email_info_done: bool = False
    failure: dict[str, Any] | None = None
    """Set once the job gave up: what remains is to publish that, whatever happens."""
    history: dict[str, StepHistory] = field(default_factory=dict)

    def step_history(self, step: str) -> StepHistory:
        return self.history.get(step, StepHistory())

    def to_dict(self) -> dict[str, Any]:
        return {
            "event": {
                "id": self.event.event_id,
                "source": self.event.source,
                "invoice": self.event.invoice,
            },
            "body": self.body,
            "content_type": self.content_type,
            "resend": self.resend.to_dict() if self.resend else None,
            "email_info": self.email_info,
            "email_info_error": self.email_info_error,
            "email_info_done": self.email_info_done,
            "failure": self.failure,
            "history": {step: h.to_dict() for step, h in self.history.items()},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Job:
        event = data["event"]
        return cls(
            event=Reissued(event_id=event["id"], source=event["source"], invoice=event["invoice"]),
            body=data["body"],
            content_type=data.get("content_type"),
            resend=ResendResult.from_dict(data["resend"]) if data.get("resend") else None,
            email_info=data.get("email_info"),
            email_info_error=data.get("email_info_error"),
            email_info_done=bool(data.get("email_info_done")),
            failure=data.get("failure"),
            history={s: StepHistory.from_dict(h) for s, h in data.get("history", {}).items()},
        )


@dataclass(frozen=True, slots=True)
class Done:
    """``invoice.email_queued`` was published."""

    event: dict[str, Any]


@dataclass(frozen=True, slots=True)
class GaveUp:
    """``invoice.email_failed`` was published and the event dead-lettered."""

    event: dict[str, Any]


@dataclass(frozen=True, slots=True)
class RetryLater:
    """Run ``job`` again in ``delay_seconds``; the broker holds it meanwhile."""

    job: Job
    delay_seconds: int
    step: str
    kind: str


Outcome = Done | GaveUp | RetryLater


class Pipeline:
    """Runs jobs against one provider and publisher. Safe to share between threads."""

    def __init__(
        self,
        *,
        provider: BillingProvider,
        publisher: EventPublisher,
        policy: RetryPolicy,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._provider = provider
        self._publisher = publisher
        self._policy = policy
        self._rng = rng or random.Random()
        self._clock = clock

    def run(self, job: Job) -> Outcome:
        """Do every step not done yet, in order, until one must wait or all are done."""
        if job.failure is not None:
            return self._publish_failure(job)
        if job.resend is None:
            outcome = self._resend(job)
            if not isinstance(outcome, Job):
                return outcome
            job = outcome
        if self._provider.has_email_info and not job.email_info_done:
            outcome = self._email_info(job)
            if not isinstance(outcome, Job):
                return outcome
            job = outcome
        return self._publish_queued(job)

    def _resend(self, job: Job) -> Job | Outcome:
        started = self._clock()
        try:
            result = self._provider.resend(
                job.event.invoice, idempotency_key=idempotency_key(job.event, RESEND)
            )
        except BillingError as error:
            job, decision = self._decide(job, RESEND, error, started)
            if isinstance(decision, Retry):
                return RetryLater(job, decision.delay_seconds, RESEND, decision.kind)
            return self._give_up(job, RESEND, decision)
        self._log(job, RESEND, "done", started, status=200)
        return replace(job, resend=result, history=_one_more_attempt(job, RESEND))

    def _email_info(self, job: Job) -> Job | Outcome:
        started = self._clock()
        try:
            info = self._provider.email_info(job.event.invoice)
        except BillingError as error:
            job, decision = self._decide(job, EMAIL_INFO, error, started)
            if isinstance(decision, Retry):
                return RetryLater(job, decision.delay_seconds, EMAIL_INFO, decision.kind)
            # The email is queued already: say so, and say why we cannot say where.
            error_text = f"{decision.code}: {decision.detail}"
            return replace(job, email_info_done=True, email_info_error=error_text)
        self._log(job, EMAIL_INFO, "done", started, status=200)
        return replace(
            job, email_info=info, email_info_done=True, history=_one_more_attempt(job, EMAIL_INFO)
        )

    def _publish_queued(self, job: Job) -> Outcome:
        assert job.resend is not None
        data: dict[str, Any] = {
            "invoiceId": job.event.invoice,
            "provider": self._provider.name,
            "email": job.resend.email,
            "queuedAt": job.resend.queued_at,
            "jobId": job.resend.job_id,
            "emailInfo": job.email_info,
        }
        if job.email_info is None and job.email_info_error is not None:
            data["emailInfoError"] = job.email_info_error
        data["reissuedEvent"] = {"id": job.event.event_id, "source": job.event.source}
        event = cloud_event(
            EMAIL_QUEUED, cause_key=job.event.key, subject=job.event.invoice, data=data
        )
        started = self._clock()
        try:
            self._publisher.publish_event(event, EMAIL_QUEUED)
        except PublishError as exc:
            return self._retry_publish(job, exc, started)
        self._log(job, PUBLISH, "published", started)
        return Done(event)

    def _decide(
        self, job: Job, step: str, error: BillingError, started: float
    ) -> tuple[Job, Retry | GiveUp]:
        """Apply the retry policy to a failed step; the job's history records the try."""
        elsewhere = sum(h.rate_limited_seconds for s, h in job.history.items() if s != step)
        decision = decide(
            error, job.step_history(step), self._policy, self._rng, rate_limited_elsewhere=elsewhere
        )
        if isinstance(decision, Retry):
            outcome, wait = decision.kind, decision.delay_seconds
        else:
            outcome, wait = "gave_up", None
        self._log(job, step, outcome, started, status=error.status, code=error.code, wait=wait)
        return replace(job, history={**job.history, step: decision.history}), decision

    def _give_up(self, job: Job, step: str, decision: GiveUp) -> Outcome:
        failure = {
            "step": step,
            "status": decision.status,
            "code": decision.code,
            "detail": decision.detail,
        }
        return self._publish_failure(replace(job, failure=failure))

    def _publish_failure(self, job: Job) -> Outcome:
        """Dead-letter the event, then publish ``invoice.email_failed``.

        In this order a crash in between leaves a dead letter without its event
        (re-published on the retry) rather than an event whose dead letter is lost.
        """
        assert job.failure is not None
        started = self._clock()
        attempts = job.step_history(job.failure["step"]).attempts
        event = failed_event(
            invoice=job.event.invoice,
            provider=self._provider.name,
            cause_key=job.event.key,
            reissued_event={"id": job.event.event_id, "source": job.event.source},
            attempts=attempts,
            reason=job.failure,
        )
        letter = DeadLetter(
            body=job.body.encode("utf-8"),
            content_type=job.content_type,
            code=job.failure["code"],
            detail=job.failure["detail"],
            attempts=attempts,
        )
        try:
            self._publisher.dead_letter(letter)
            self._publisher.publish_event(event, EMAIL_FAILED)
        except PublishError as exc:
            return self._retry_publish(job, exc, started)
        self._log(job, PUBLISH, "published_failure", started, code=job.failure["code"])
        return GaveUp(event)

    def _retry_publish(self, job: Job, exc: PublishError, started: float) -> RetryLater:
        """A publish the broker refused is retried without limit: the event must not be lost."""
        history = job.step_history(PUBLISH)
        history = replace(history, attempts=history.attempts + 1)
        delay = whole_seconds(server_error_delay(history.attempts, self._policy, self._rng))
        self._log(job, PUBLISH, "publish_failed", started, code=str(exc)[:200], wait=delay)
        job = replace(job, history={**job.history, PUBLISH: history})
        return RetryLater(job, delay, PUBLISH, "publish")

    def _log(
        self,
        job: Job,
        step: str,
        outcome: str,
        started: float,
        *,
        status: int | None = None,
        code: str | None = None,
        wait: int | None = None,
    ) -> None:
        log.info(
            "step %s %s",
            step,
            outcome,
            extra={
                "event_id": job.event.event_id,
                "invoice": job.event.invoice,
                "step": step,
                "attempt": job.step_history(step).attempts + 1,
                "outcome": outcome,
                "status": status,
                "code": code,
                "duration_ms": round((self._clock() - started) * 1000, 1),
                "wait_seconds": wait,
            },
        )


def _one_more_attempt(job: Job, step: str) -> dict[str, StepHistory]:
    history = job.step_history(step)
    return {**job.history, step: replace(history, attempts=history.attempts + 1)}


def failed_event(
    *,
    invoice: str | None,
    provider: str,
    cause_key: tuple[str, str],
    reissued_event: dict[str, str | None],
    attempts: int,
    reason: dict[str, Any],
) -> dict[str, Any]:
    """An ``invoice.email_failed`` CloudEvent."""
    return cloud_event(
        EMAIL_FAILED,
        cause_key=cause_key,
        subject=invoice,
        data={
            "invoiceId": invoice,
            "provider": provider,
            "reissuedEvent": reissued_event,
            "attempts": attempts,
            "reason": reason,
        },
    )
