"""One ``invoice.reissued`` through its steps: resend, email-info, publish.

``Pipeline.run`` first claims the event in the ledger, then does every step the
ledger does not record as done, and returns an outcome; it never sleeps. A step
to try later comes back as ``RetryLater`` with the job's new state, which the
task adapter hands to the broker to hold.

Exactly-once where it matters: a resend recorded in the ledger is never sent
again; a resend whose effect is unknown (timed out after sending, or the worker
died before its result was recorded) is first looked for in email-info; outgoing
events carry ids derived from the incoming event, so a re-publication after a
crash is recognisable. The claim marks the resend in flight and the publication
records its result: two ledger writes per event, each a wait on the writer.
"""

from __future__ import annotations

import logging
import math
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from invoice_mailer.billing import BillingProvider, ResendResult
from invoice_mailer.errors import BillingError, PublishError, TransientError
from invoice_mailer.events import (
    EMAIL_FAILED,
    EMAIL_QUEUED,
    Reissued,
    cloud_event,
    outgoing_event_id,
)
from invoice_mailer.ledger import AlreadyDone, Busy, Ledger, LedgerError, Record
from invoice_mailer.observe import LoggingObserver, Observer, StepRecord
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

__all__ = [
    "Done",
    "Duplicate",
    "GaveUp",
    "Job",
    "Pipeline",
    "RetryLater",
    "failed_event",
    "idempotency_key",
]

log = logging.getLogger("invoice_mailer.pipeline")

RESEND = "resend"
EMAIL_INFO = "email_info"
PUBLISH = "publish"
LEDGER = "ledger"

BUSY_RECHECK_SECONDS = 5.0
# Workers that died holding one event before it is taken for poison and dead-lettered.
POISON_TAKEOVERS = 3
# Stop trusting an Idempotency-Key this long before the API says it forgets it.
IDEMPOTENCY_MARGIN_SECONDS = 600.0

Checkpoint = Callable[[str, "Job"], None]
"""Called with ``claimed``, ``resent`` and ``published`` as a run passes them."""


def idempotency_key(event: Reissued, step: str) -> str:
    """The same for every try of one step of one event, and for no other."""
    return outgoing_event_id(f"idempotency:{step}", event.source, event.event_id)


@dataclass(frozen=True, slots=True)
class Job:
    """Everything a try needs: the event, its original body, and what is done.

    The ledger is the authority on effects; the job carries them between tries
    too, with the per-step retry history the ledger does not keep.
    """

    event: Reissued
    body: str
    content_type: str | None
    replay: bool = False
    """Re-published from the dead-letter queue: a failed event may run again."""
    resend: ResendResult | None = None
    resend_uncertain_since: float | None = None
    """Set when a resend was sent without a definite answer: when the first began."""
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
            "replay": self.replay,
            "resend": self.resend.to_dict() if self.resend else None,
            "resend_uncertain_since": self.resend_uncertain_since,
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
            replay=bool(data.get("replay")),
            resend=ResendResult.from_dict(data["resend"]) if data.get("resend") else None,
            resend_uncertain_since=data.get("resend_uncertain_since"),
            email_info=data.get("email_info"),
            email_info_error=data.get("email_info_error"),
            email_info_done=bool(data.get("email_info_done")),
            failure=data.get("failure"),
            history={s: StepHistory.from_dict(h) for s, h in data.get("history", {}).items()},
        )

    def with_record(self, record: Record) -> Job:
        """The job as the ledger knows it: recorded effects win over carried ones."""
        return replace(
            self,
            resend=record.resend,
            resend_uncertain_since=(
                record.resend_first_started_at
                if record.resend_in_flight and record.resend is None
                else None
            ),
            email_info=record.email_info if record.email_info_done else self.email_info,
            email_info_error=(
                record.email_info_error if record.email_info_done else self.email_info_error
            ),
            email_info_done=record.email_info_done,
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
class Duplicate:
    """The event was already finished: nothing was done."""

    record: Record


@dataclass(frozen=True, slots=True)
class RetryLater:
    """Run ``job`` again in ``delay_seconds``; the broker holds it meanwhile."""

    job: Job
    delay_seconds: int
    step: str
    kind: str


Outcome = Done | GaveUp | Duplicate | RetryLater


class Pipeline:
    """Runs jobs against one provider, ledger and publisher. Safe to share between threads."""

    def __init__(
        self,
        *,
        provider: BillingProvider,
        publisher: EventPublisher,
        ledger: Ledger,
        policy: RetryPolicy,
        lease_seconds: float,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        checkpoint: Checkpoint | None = None,
        observer: Observer | None = None,
    ) -> None:
        self._provider = provider
        self._observer: Observer = observer or LoggingObserver()
        self._publisher = publisher
        self._ledger = ledger
        self._policy = policy
        self._lease_seconds = lease_seconds
        self._rng = rng or random.Random()
        self._clock = clock
        self._now = wall_clock
        self._checkpoint = checkpoint or (lambda name, job: None)

    def run(self, job: Job) -> Outcome:
        """Claim the event, then do every step not done yet, until one must wait."""
        owner = uuid.uuid4().hex
        try:
            claim = self._ledger.claim(
                job.event.key,
                invoice=job.event.invoice,
                provider=self._provider.name,
                owner=owner,
                lease_seconds=self._lease_seconds,
                now=self._now(),
                reopen_failed=job.replay,
                begin_resend=job.failure is None,
            )
        except LedgerError as exc:
            return self._ledger_unavailable(job, exc)
        if isinstance(claim, AlreadyDone):
            self._log(job, "claim", "duplicate", self._clock())
            return Duplicate(claim.record)
        if isinstance(claim, Busy):
            # Come back when the lease ends, or sooner: the holder may finish early.
            delay = whole_seconds(min(claim.retry_in, BUSY_RECHECK_SECONDS))
            self._log(job, "claim", "busy", self._clock(), wait=delay)
            return RetryLater(job, delay, "claim", "busy")
        job = job.with_record(claim.record)
        if claim.record.takeovers >= POISON_TAKEOVERS and job.failure is None:
            return self._give_up_poison(job, owner, claim.record.takeovers)
        self._checkpoint("claimed", job)
        try:
            outcome = self._steps(job, owner, claim.resend_begun_at)
        except LedgerError as exc:
            outcome = self._ledger_unavailable(job, exc)
        if isinstance(outcome, RetryLater):
            self._release(outcome.job, owner)
        return outcome

    def _give_up_poison(self, job: Job, owner: str, takeovers: int) -> Outcome:
        """Workers keep dying on this event: stop feeding it to them.

        Before the resend: ``invoice.email_failed`` and a dead letter. After it the
        email is out, so ``invoice.email_queued`` says so, without email-info.
        """
        code, detail = "worker_lost_repeatedly", f"{takeovers} workers died handling this event"
        step = RESEND if job.resend is None else EMAIL_INFO
        self._log(job, step, "gave_up", self._clock(), code=code)
        try:
            if job.resend is not None:
                error = job.email_info_error or f"{code}: {detail}"
                outcome = self._publish_queued(
                    replace(job, email_info_done=True, email_info_error=error)
                )
            else:
                decision = GiveUp(
                    status=None, code=code, detail=detail, history=job.step_history(step)
                )
                outcome = self._give_up(job, step, decision)
        except LedgerError as exc:
            outcome = self._ledger_unavailable(job, exc)
        if isinstance(outcome, RetryLater):
            self._release(outcome.job, owner)
        return outcome

    def _steps(self, job: Job, owner: str, resend_begun_at: float | None) -> Outcome:
        if job.failure is not None:
            return self._publish_failure(job)
        if job.resend is None:
            outcome = self._resend(job, owner, resend_begun_at)
            if not isinstance(outcome, Job):
                return outcome
            job = outcome
            self._checkpoint("resent", job)
        if self._provider.has_email_info and not job.email_info_done:
            outcome = self._email_info(job)
            if not isinstance(outcome, Job):
                return outcome
            job = outcome
        return self._publish_queued(job)

    # -- resend ----------------------------------------------------------------------------

    def _resend(self, job: Job, owner: str, begun_at: float | None) -> Job | Outcome:
        """POST the resend. Its result is recorded with the publication (or the lease's
        release before a retry): a crash in between leaves it in flight, and the next
        run looks for it in email-info (or sends it again under the same key)."""
        uncertain = job.resend_uncertain_since
        if uncertain is not None and self._provider.has_email_info:
            found = self._find_uncertain_resend(job)
            if not isinstance(found, Job) or found.resend is not None:
                return found
            job, uncertain = found, None  # email-info says it did not happen
        if uncertain is not None and not job.replay and self._idempotency_key_expired(uncertain):
            return self._give_up_uncertain(job, uncertain)
        started = self._clock()
        first_started = begun_at
        if first_started is None or job.resend_uncertain_since is not None:
            # Not marked by the claim, or time has passed since (email-info was asked):
            # mark it now, if the lease is still ours.
            first_started = self._ledger.begin_resend(
                job.event.key, owner=owner, now=self._now(), lease_seconds=self._lease_seconds
            )
        if first_started is None:  # someone else took the event over: let them finish
            self._log(job, RESEND, "lease_lost", started, wait=1)
            return RetryLater(job, 1, RESEND, "lease_lost")
        try:
            result = self._provider.resend(
                job.event.invoice, idempotency_key=idempotency_key(job.event, RESEND)
            )
        except BillingError as error:
            if isinstance(error, TransientError) and error.request_sent:
                job = replace(job, resend_uncertain_since=first_started)
            elif uncertain is None:
                # A definite answer: this POST did nothing. (It says nothing about an
                # earlier POST whose answer was lost: that one stays uncertain.)
                self._ledger.resend_not_sent(job.event.key)
            return self._resend_failed(job, error, started)
        self._log(job, RESEND, "done", started, status=200)
        return replace(
            job, resend=result, resend_uncertain_since=None, history=_one_more(job, RESEND)
        )

    def _resend_failed(self, job: Job, error: BillingError, started: float) -> Outcome:
        """The resend step failed (the POST, or the email-info look before it)."""
        job, decision = self._decide(job, RESEND, error, started)
        if isinstance(decision, Retry):
            return RetryLater(job, decision.delay_seconds, RESEND, decision.kind)
        return self._give_up(job, RESEND, decision)

    def _idempotency_key_expired(self, uncertain_since: float) -> bool:
        """Has the API forgotten the key of a resend whose effect we do not know?"""
        window = self._provider.idempotency_window_seconds
        if window is None:
            return False
        return self._now() - uncertain_since > window - IDEMPOTENCY_MARGIN_SECONDS

    def _give_up_uncertain(self, job: Job, since: float) -> Outcome:
        """Sending again could send a second email and nothing can tell: stop, and let an
        operator decide (a replay from the dead-letter queue resends)."""
        hours = (self._now() - since) / 3600
        decision = GiveUp(
            status=None,
            code="idempotency_window_passed",
            detail=(
                f"a resend {hours:.1f} h ago got no answer and the API keeps idempotency "
                "keys for less; not resending blind"
            ),
            history=job.step_history(RESEND),
        )
        self._log(job, RESEND, "gave_up", self._clock(), code=decision.code)
        return self._give_up(job, RESEND, decision)

    def _find_uncertain_resend(self, job: Job) -> Job | Outcome:
        """Did the resend whose answer we never got happen? Ask email-info first.

        An email created at or after the first resend began is that resend's
        (HostUp's body names no idempotency key). If none, the caller sends again.
        """
        since = job.resend_uncertain_since
        assert since is not None
        started = self._clock()
        try:
            info = self._provider.email_info(job.event.invoice)
        except BillingError as error:
            return self._resend_failed(job, error, started)
        email = _email_created_since(info, since)
        if email is None:
            self._log(job, RESEND, "uncertain_not_sent", started)
            return job
        result = ResendResult(queued_at=str(email["createdAt"]), email=email.get("to"))
        self._ledger.record_resend(job.event.key, result, now=self._now(), email_info=info)
        self._log(job, RESEND, "uncertain_was_sent", started, status=200)
        return replace(
            job,
            resend=result,
            resend_uncertain_since=None,
            email_info=info,
            email_info_done=True,
        )

    # -- email-info ------------------------------------------------------------------------

    def _email_info(self, job: Job) -> Job | Outcome:
        started = self._clock()
        try:
            info = self._provider.email_info(job.event.invoice)
        except BillingError as error:
            job, decision = self._decide(job, EMAIL_INFO, error, started)
            if isinstance(decision, Retry):
                return RetryLater(job, decision.delay_seconds, EMAIL_INFO, decision.kind)
            # The email is queued already: say so, and say why we cannot say where.
            # Recorded with the publication: until then the job carries it, and a crash
            # in between only costs a repeated (read-only) GET.
            error_text = f"{decision.code}: {decision.detail}"
            return replace(job, email_info_done=True, email_info_error=error_text)
        self._log(job, EMAIL_INFO, "done", started, status=200)
        return replace(
            job, email_info=info, email_info_done=True, history=_one_more(job, EMAIL_INFO)
        )

    # -- publishing ------------------------------------------------------------------------

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
        self._ledger.record_published(
            job.event.key,
            event["id"],
            now=self._now(),
            email_info=job.email_info,
            email_info_error=job.email_info_error,
            resend=job.resend,
        )
        self._log(job, PUBLISH, "published", started)
        self._checkpoint("published", job)
        return Done(event)

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
        self._ledger.record_failed(job.event.key, job.failure, event["id"], now=self._now())
        self._observer.on_step(
            StepRecord(
                event_id=job.event.event_id,
                invoice=job.event.invoice,
                provider=self._provider.name,
                step=PUBLISH,
                outcome="published_failure",
                status=job.failure["status"],
                code=job.failure["code"],
                detail=job.failure["detail"],
                failed_step=job.failure["step"],
                attempt=attempts,
                duration_seconds=round(self._clock() - started, 4),
            )
        )
        return GaveUp(event)

    def _retry_publish(self, job: Job, exc: PublishError, started: float) -> RetryLater:
        """A publish the broker refused is retried without limit: the event must not be lost."""
        history = job.step_history(PUBLISH)
        history = replace(history, attempts=history.attempts + 1)
        delay = whole_seconds(server_error_delay(history.attempts, self._policy, self._rng))
        self._log(job, PUBLISH, "publish_failed", started, code=str(exc)[:200], wait=delay)
        job = replace(job, history={**job.history, PUBLISH: history})
        return RetryLater(job, delay, PUBLISH, "publish")

    # -- bookkeeping -----------------------------------------------------------------------

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

    def _ledger_unavailable(self, job: Job, exc: LedgerError) -> RetryLater:
        """Without the ledger nothing is safe to send: wait and try again, never give up."""
        history = job.step_history(LEDGER)
        history = replace(history, attempts=history.attempts + 1)
        delay = whole_seconds(server_error_delay(history.attempts, self._policy, self._rng))
        log.error("ledger unavailable: %s", exc, extra={"event_id": job.event.event_id})
        self._log(job, LEDGER, "unavailable", self._clock(), wait=delay)
        job = replace(job, history={**job.history, LEDGER: history})
        return RetryLater(job, delay, LEDGER, "ledger_error")

    def _release(self, job: Job, owner: str) -> None:
        try:
            self._ledger.release(job.event.key, owner, resend=job.resend)
        except LedgerError:
            log.warning("could not release the lease; it expires on its own", exc_info=True)

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
        self._observer.on_step(
            StepRecord(
                event_id=job.event.event_id,
                invoice=job.event.invoice,
                provider=self._provider.name,
                step=step,
                outcome=outcome,
                attempt=job.step_history(step).attempts + 1,
                status=status,
                code=code,
                duration_seconds=round(self._clock() - started, 4),
                wait_seconds=wait,
            )
        )


def _one_more(job: Job, step: str) -> dict[str, StepHistory]:
    history = job.step_history(step)
    return {**job.history, step: replace(history, attempts=history.attempts + 1)}


def _email_created_since(info: dict[str, Any], since: float) -> dict[str, Any] | None:
    """The first email in email-info created at or after ``since`` (Unix time)."""
    for email in info.get("emails") or []:
        created = email.get("createdAt") if isinstance(email, dict) else None
        if not isinstance(created, str):
            continue
        try:
            when = datetime.fromisoformat(created).timestamp()
        except ValueError:
            continue
        # Timestamps have millisecond precision: compare at that precision.
        if math.floor(when * 1000) >= math.floor(since * 1000):
            return dict(email)
    return None


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
