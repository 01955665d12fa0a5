"""One ``invoice.reissued`` through its steps: resend, email-info, publish.

``Pipeline.run`` claims the event in the ledger, then asks ``steps.next_step``
what the record calls for, performs that one step, records its effect, and asks
again, until the event is done or a step must wait. It never sleeps: a step to
try later comes back as ``RetryLater`` with the job's new retry history, which
the task adapter hands to the broker to hold.

Every effect is in the ledger before anything that can block: a resend's answer
before email-info is asked, email-info's answer before the publish, a give-up
before its dead letter, the dead letter before its ``invoice.email_failed``. A
retry or a takeover therefore never repeats an effect: a resend recorded is never
sent again, email-info is asked once, a given-up event has one dead letter. A
resend whose effect is unknown (timed out after sending, or the worker died
before its answer was recorded) is first looked for in email-info, in the API's
clock (``invoice_mailer.clock``); while it is unknown, no other event of the same
invoice begins a resend (the ledger's rule), so an email created after it began is
its own. Outgoing events carry ids derived from the incoming event, so a
re-publication after a crash is recognisable.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

from invoice_mailer.billing import BillingProvider, ResendResult
from invoice_mailer.clock import Offset, Placement, parse_iso, placement
from invoice_mailer.contracts import (
    EmailFailedData,
    EmailQueuedData,
    FailureReason,
    ReissuedEventRef,
)
from invoice_mailer.dependencies import BUS, Dependencies, api, budget, pace
from invoice_mailer.errors import (
    BillingError,
    PublishError,
    PublishFailure,
    RateLimited,
    TransientError,
)
from invoice_mailer.events import (
    EMAIL_FAILED,
    EMAIL_QUEUED,
    ID_SCHEME,
    cloud_event,
    outgoing_event_id,
)
from invoice_mailer.job import EventRef, Job
from invoice_mailer.ledger import (
    AlreadyDone,
    Busy,
    EventKey,
    InvoiceBusy,
    Ledger,
    LedgerError,
    Record,
)
from invoice_mailer.observe import LoggingObserver, Observer, StepRecord
from invoice_mailer.policy import (
    GiveUp,
    Retry,
    RetryPolicy,
    decide,
    server_error_delay,
    whole_seconds,
)
from invoice_mailer.publishing import DeadLetter, Publisher
from invoice_mailer.steps import API_STEPS, BUS_STEPS, Step, next_step

__all__ = [
    "Done",
    "Duplicate",
    "GaveUp",
    "Job",
    "Pipeline",
    "RetryLater",
    "failed_event",
    "idempotency_key",
    "wait_for_ledger",
]

log = logging.getLogger("invoice_mailer.pipeline")

# Names of steps in the retry history, logs and ``reason.step`` (CONTRACT.md).
RESEND = "resend"
EMAIL_INFO = "email_info"
PUBLISH = "publish"
LEDGER = "ledger"

BUSY_RECHECK_SECONDS = 5.0
# Waiting behind another event's resend of the same invoice: recheck 1, 2, 4... s, up to.
INVOICE_RECHECK_MAX_SECONDS = 30
# Workers that died holding one event before it is taken for poison and dead-lettered.
POISON_TAKEOVERS = 3
# Stop trusting an Idempotency-Key this long before the API says it forgets it.
IDEMPOTENCY_MARGIN_SECONDS = 600.0
# A 429 with one of these codes speaks for the whole account, not for one invoice.
ACCOUNT_RATE_LIMIT_CODES = frozenset({"rate_limit_exceeded", "ERR_RATE_LIMIT"})
# Pacing to the API's budget sleeps in the thread up to this; a longer wait is the broker's.
PACING_SLEEP_MAX_SECONDS = 2.0
# A reminder that the ledger is still down, per process, at most this often.
LEDGER_REMINDER_SECONDS = 60.0

_GAVE_UP = object()
"""``_wait_for_dependencies``: the wait outlasted its budget and the give-up is recorded."""

Checkpoint = Callable[[str, Job], None]
"""Called with ``claimed``, ``resent`` and ``published`` as a run passes them."""


def idempotency_key(event: EventRef, step: str, *, scheme: int = ID_SCHEME) -> str:
    """The same for every try of one step of one event, and for no other."""
    return outgoing_event_id(f"idempotency:{step}", event.source, event.event_id, scheme=scheme)


@dataclass(frozen=True, slots=True)
class Done:
    """``invoice.email_queued`` was published."""

    event: dict[str, Any]


@dataclass(frozen=True, slots=True)
class GaveUp:
    """``invoice.email_failed`` was published and the event dead-lettered."""

    event: dict[str, Any]

    @property
    def reason(self) -> dict[str, Any]:
        """``{"step", "status", "code", "detail"}`` of CONTRACT.md."""
        reason: dict[str, Any] = self.event["data"]["reason"]
        return reason


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
    status: int | None = None
    code: str | None = None

    def describe(self) -> str:
        """What the retry waits for, as Flower and logs show it."""
        answer = " ".join(str(part) for part in (self.status, self.code) if part is not None)
        return f"{self.step} {answer or self.kind}, retry in {self.delay_seconds} s"


Outcome = Done | GaveUp | Duplicate | RetryLater


@dataclass(slots=True)
class _Run:
    """One run of one event: who holds the lease, and the record as the ledger has it."""

    job: Job
    owner: str
    record: Record
    resend_begun_at: float | None
    """Set when this run's claim marked the resend in flight: when the first began."""
    probe: str | None = None
    """The dependency this run is the one probe of, until its next call to it ends."""
    probe_failed: bool = False
    """Its probe failed: the outage's failure, not the event's (no try is used up)."""
    leased_at: float = 0.0
    """The wall-clock ``now`` of the last write that renewed this run's lease."""

    @property
    def key(self) -> tuple[str, str]:
        return self.job.event.key


class Pipeline:
    """Runs jobs against one provider, ledger and publisher. Safe to share between threads."""

    def __init__(
        self,
        *,
        provider: BillingProvider,
        publisher: Publisher,
        ledger: Ledger,
        policy: RetryPolicy,
        lease_seconds: float,
        resend_settles_seconds: float = 15.0,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        checkpoint: Checkpoint | None = None,
        observer: Observer | None = None,
        dependencies: Dependencies | None = None,
        outage_max_wait_seconds: float = 172_800.0,
    ) -> None:
        self._provider = provider
        self._observer: Observer = observer or LoggingObserver()
        self._publisher = publisher
        self._ledger = ledger
        self._policy = policy
        self._lease_seconds = lease_seconds
        self._settles = resend_settles_seconds
        self._rng = rng or random.Random()
        self._clock = clock
        self._now = wall_clock
        self._checkpoint = checkpoint or (lambda name, job: None)
        self._deps = dependencies
        self._outage_max_wait = outage_max_wait_seconds
        self._ledger_down: list[float] = []  # [since, last reminder] while it is down
        # Outgoing events a blocked broker holds unconfirmed: id -> (event key, job, the
        # ledger write that says it went out), for ``confirmed_late``.
        self._held: dict[str, tuple[EventKey, Job, Callable[..., Record]]] = {}

    def run(self, job: Job) -> Outcome:
        """Claim the event, then perform each step its record calls for, until one waits."""
        owner = uuid.uuid4().hex
        claimed_at = self._now()
        try:
            claim = self._ledger.claim(
                job.event.key,
                invoice=job.event.invoice,
                provider=self._provider.name,
                owner=owner,
                lease_seconds=self._lease_seconds,
                now=claimed_at,
                reopen_failed=job.replay,
                # Mark the resend in flight in the claim's own write, unless the API is
                # unhealthy for the fleet: then the run will wait, not send.
                begin_resend=self._api_healthy(),
            )
        except LedgerError as exc:
            return self.ledger_unavailable(job, exc)
        self._ledger_back()
        if isinstance(claim, AlreadyDone):
            self._log(job, "claim", "duplicate", self._clock())
            return Duplicate(claim.record)
        if isinstance(claim, Busy):
            # Come back when the lease ends, or sooner: the holder may finish early.
            delay = whole_seconds(min(claim.retry_in, BUSY_RECHECK_SECONDS))
            self._log(job, "claim", "busy", self._clock(), wait=delay)
            return RetryLater(job, delay, "claim", "busy")
        run = _Run(job, owner, claim.record, claim.resend_begun_at, leased_at=claimed_at)
        try:
            outcome = self._steps(run)
        except LedgerError as exc:
            outcome = self.ledger_unavailable(run.job, exc)
        if isinstance(outcome, RetryLater):
            self._release(run, outcome)
        return outcome

    def _steps(self, run: _Run) -> Outcome:
        if not (run.record.takeovers >= POISON_TAKEOVERS and self._poison(run)):
            self._checkpoint("claimed", run.job)
        # Every step that does not end the run records what moves the record on, so no
        # step comes twice in a run; one that does means the ledger did not keep a write,
        # and repeating it (a POST!) until something changes is the one thing not to do.
        done: set[Step] = set()
        while True:
            step = next_step(run.record, has_email_info=self._provider.has_email_info)
            if step in done:
                raise RuntimeError(f"{step} again for {run.key!r}: the ledger kept no progress")
            done.add(step)
            waited = self._wait_for_dependencies(step, run)
            if waited is _GAVE_UP:
                continue  # the record moved on: its dead letter (or publication) is next
            if isinstance(waited, RetryLater):
                return waited
            outcome = self._perform(step, run)
            if outcome is not None:
                return outcome

    def _perform(self, step: Step, run: _Run) -> Outcome | None:
        """One step; its effect lands in ``run.record``. An outcome ends the run."""
        if step is Step.FIND_RESEND:
            return self._find_resend(run)
        if step is Step.RESEND:
            return self._resend(run, uncertain=run.record.resend_in_flight)
        if step is Step.EMAIL_INFO:
            return self._email_info(run)
        if step is Step.DEAD_LETTER:
            return self._dead_letter(run)
        if step is Step.PUBLISH_FAILED:
            return self._publish_failed(run)
        if step is Step.PUBLISH_QUEUED:
            return self._publish_queued(run)
        return Duplicate(run.record)  # Step.DONE: finished by another run meanwhile

    def _poison(self, run: _Run) -> bool:
        """Workers keep dying on this event: stop feeding it to them. True if it did.

        Before the resend: give up (``invoice.email_failed`` and a dead letter). After
        it the email is out, so ``invoice.email_queued`` says so, without email-info.
        """
        record = run.record
        if record.failure is not None or (record.resend is not None and record.email_info_done):
            return False
        code = "worker_lost_repeatedly"
        detail = f"{record.takeovers} workers died handling this event"
        step = RESEND if record.resend is None else EMAIL_INFO
        self._log(run.job, step, "gave_up", self._clock(), code=code)
        if record.resend is None:
            decision = GiveUp(
                status=None, code=code, detail=detail, history=run.job.step_history(step)
            )
            self._give_up(run, step, decision)
        else:
            run.record = self._ledger.record_email_info(
                run.key, **self._lease(run), email_info=None, error=f"{code}: {detail}"
            )
        return True

    # -- resend ----------------------------------------------------------------------------

    def _find_resend(self, run: _Run) -> Outcome | None:
        """Did the resend whose answer we never got happen? Ask email-info first.

        Its emails' ``createdAt`` is in the API's clock, the resend's start in ours:
        the email-info answer itself brings the provider's clock an estimate if it had
        none, and each email is placed against the start within that estimate's bounds
        (``clock.placement``). Created after the start: this resend's, since no other
        event of the invoice could begin one meanwhile (the ledger's rule). Too close to
        tell: this resend's, unless another event recorded it as its own. None: not
        sent, once email-info has had time to list it (``resend_settles_seconds``
        after the last try began); until then, look again later. An API that tells no
        time cannot be compared: given up, not resent blind.
        """
        record = run.record
        since = record.resend_first_started_at
        assert since is not None  # set with resend_in_flight
        started = self._clock()
        try:
            info = self._call(run, lambda: self._provider.email_info(run.job.event.invoice))
        except BillingError as error:
            return self._resend_failed(run, error, started)
        offset = self._provider.clock.offset()
        if offset is None:
            self._log(run.job, RESEND, "gave_up", started, code="resend_unverifiable")
            decision = GiveUp(
                status=None,
                code="resend_unverifiable",
                detail="a resend got no answer and the API's answers tell no time (no Date "
                "header) to compare email-info with; not resending blind",
                history=run.job.step_history(RESEND),
            )
            self._give_up(run, RESEND, decision)
            return None
        email = self._own_email(run, info, since, offset)
        if email is None:
            last = record.resend_last_started_at or since
            unlisted_for = self._now() - last
            if unlisted_for < self._settles:
                wait = whole_seconds(self._settles - unlisted_for)
                self._log(run.job, RESEND, "uncertain_unlisted", started, status=200, wait=wait)
                return RetryLater(run.job, wait, RESEND, "uncertain_unlisted")
            self._log(run.job, RESEND, "uncertain_not_sent", started, status=200)
            return self._resend(run, uncertain=False, rebegin=True)
        result = ResendResult(queued_at=str(email["createdAt"]), email=email.get("to"))
        run.record = self._ledger.record_resend(
            run.key, result, **self._lease(run), email_info=info
        )
        self._log(run.job, RESEND, "uncertain_was_sent", started, status=200)
        self._checkpoint("resent", run.job)
        return None

    def _own_email(
        self, run: _Run, info: dict[str, Any], since: float, offset: Offset
    ) -> dict[str, Any] | None:
        """The earliest email of email-info that is this event's resend's, if any."""
        candidates: list[tuple[float, Placement, dict[str, Any]]] = []
        for email in info.get("emails") or []:
            created = parse_iso(email.get("createdAt")) if isinstance(email, dict) else None
            if created is None:
                continue
            where = placement(created, since, offset)
            if where is not Placement.BEFORE:
                candidates.append((created, where, email))
        if any(where is Placement.WITHIN for _, where, _ in candidates):
            event = run.job.event
            taken = {
                parse_iso(r.queued_at)
                for r in self._ledger.resends_of_invoice(
                    run.key, event.invoice, self._provider.name
                )
            }
            candidates = [c for c in candidates if c[1] is Placement.AFTER or c[0] not in taken]
        return dict(min(candidates, key=lambda c: c[0])[2]) if candidates else None

    def _resend(self, run: _Run, *, uncertain: bool, rebegin: bool = False) -> Outcome | None:
        """POST the resend, and record its answer before anything else happens.

        ``uncertain``: an earlier POST got no answer (no email-info could tell);
        ``rebegin``: time has passed since the claim marked this resend in flight.
        """
        job = run.job
        first_started = run.record.resend_first_started_at
        if (
            uncertain
            and first_started is not None
            and not job.replay
            and self._idempotency_key_expired(first_started)
        ):
            self._give_up_uncertain(run, first_started)
            return None
        started = self._clock()
        begun_at = None if rebegin or self._lease_uncertain(run) else run.resend_begun_at
        if begun_at is None:
            # Not marked by the claim, or marked a while ago, or the claim's answer came
            # so late that the lease may have passed to another run meanwhile: mark it
            # now, if the lease is still ours (this also renews it).
            try:
                run.leased_at = self._now()
                begun_at = self._ledger.begin_resend(
                    run.key, owner=run.owner, now=run.leased_at, lease_seconds=self._lease_seconds
                )
            except InvoiceBusy:
                return self._wait_for_invoice(run, started)
        if begun_at is None or self._lease_uncertain(run):
            # Someone else took the event over (let them finish), or this renewal's own
            # answer came too late to be sure it still holds: never POST on a lease
            # that may be another run's.
            self._log(job, RESEND, "lease_lost", started, wait=1)
            return RetryLater(job, 1, RESEND, "lease_lost")
        try:
            key = idempotency_key(job.event, RESEND, scheme=run.record.id_scheme)
            result = self._call(
                run, lambda: self._provider.resend(job.event.invoice, idempotency_key=key)
            )
        except BillingError as error:
            if not uncertain and not (isinstance(error, TransientError) and error.request_sent):
                # A definite answer: this POST did nothing. (It says nothing about an
                # earlier POST whose answer was lost: that one stays uncertain.)
                self._ledger.resend_not_sent(run.key)
            return self._resend_failed(run, error, started)
        run.record = self._ledger.record_resend(run.key, result, **self._lease(run))
        run.job = _one_more(job, RESEND)
        self._log(run.job, RESEND, "done", started, status=200)
        self._checkpoint("resent", run.job)
        return None

    def _wait_for_invoice(self, run: _Run, started: float) -> RetryLater:
        """Another event of the invoice has a resend whose outcome is unknown: wait for
        it to settle, in the broker, checking again after 1, 2, 4... seconds."""
        history = run.job.step_history("invoice")
        history = replace(history, attempts=history.attempts + 1)
        delay = min(2 ** (history.attempts - 1), INVOICE_RECHECK_MAX_SECONDS)
        self._log(run.job, RESEND, "invoice_busy", started, wait=delay)
        return RetryLater(run.job.with_history("invoice", history), delay, RESEND, "invoice_busy")

    def _resend_failed(self, run: _Run, error: BillingError, started: float) -> Outcome | None:
        """The resend step failed (the POST, or the email-info look before it)."""
        decision = self._decide(run, RESEND, error, started)
        if isinstance(decision, Retry):
            return self._retry(run, RESEND, decision, error)
        self._give_up(run, RESEND, decision)
        return None

    def _idempotency_key_expired(self, uncertain_since: float) -> bool:
        """Has the API forgotten the key of a resend whose effect we do not know?"""
        window = self._provider.idempotency_window_seconds
        if window is None:
            return False
        return self._now() - uncertain_since > window - IDEMPOTENCY_MARGIN_SECONDS

    def _give_up_uncertain(self, run: _Run, since: float) -> None:
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
            history=run.job.step_history(RESEND),
        )
        self._log(run.job, RESEND, "gave_up", self._clock(), code=decision.code)
        self._give_up(run, RESEND, decision)

    # -- email-info ------------------------------------------------------------------------

    def _email_info(self, run: _Run) -> Outcome | None:
        started = self._clock()
        try:
            info = self._call(run, lambda: self._provider.email_info(run.job.event.invoice))
        except BillingError as error:
            decision = self._decide(run, EMAIL_INFO, error, started)
            if isinstance(decision, Retry):
                return self._retry(run, EMAIL_INFO, decision, error)
            # The email is queued already: say so, and say why we cannot say where.
            run.record = self._ledger.record_email_info(
                run.key,
                **self._lease(run),
                email_info=None,
                error=f"{decision.code}: {decision.detail}",
            )
            return None
        run.record = self._ledger.record_email_info(run.key, **self._lease(run), email_info=info)
        run.job = _one_more(run.job, EMAIL_INFO)
        self._log(run.job, EMAIL_INFO, "done", started, status=200)
        return None

    # -- giving up and publishing ----------------------------------------------------------

    def _give_up(self, run: _Run, step: str, decision: GiveUp) -> None:
        """Record the give-up; the dead letter and ``invoice.email_failed`` follow."""
        failure = {
            "step": step,
            "status": decision.status,
            "code": decision.code,
            "detail": decision.detail,
        }
        run.job = run.job.with_history(step, decision.history)
        run.record = self._ledger.record_failure(run.key, failure, **self._lease(run))

    def _dead_letter(self, run: _Run) -> Outcome | None:
        """The original event on the dead-letter queue, once: recorded before its event.

        A crash between the dead letter and its record leaves two dead letters of one
        event (the only window); every retry after the record writes none.
        """
        failure = run.record.failure
        assert failure is not None
        started = self._clock()
        letter = DeadLetter(
            body=run.job.body.encode("utf-8"),
            content_type=run.job.content_type,
            code=failure["code"],
            detail=failure["detail"],
            attempts=run.job.step_history(failure["step"]).attempts,
        )
        try:
            self._publish(run, lambda: self._publisher.dead_letter(letter))
        except PublishError as exc:
            return self._retry_publish(run, exc, started)
        run.record = self._ledger.record_dead_lettered(run.key, **self._lease(run))
        return None

    def _publish_failed(self, run: _Run) -> Outcome:
        failure = run.record.failure
        assert failure is not None
        job = run.job
        started = self._clock()
        attempts = job.step_history(failure["step"]).attempts
        event = failed_event(
            invoice=job.event.invoice,
            provider=self._provider.name,
            cause_key=job.event.key,
            reissued_event={"id": job.event.event_id, "source": job.event.source},
            attempts=attempts,
            reason=failure,
            id_scheme=run.record.id_scheme,
        )
        try:
            self._publish(
                run,
                lambda: self._publisher.publish_event(event, EMAIL_FAILED),
                held=(event["id"], self._ledger.record_failed),
            )
        except PublishError as exc:
            return self._retry_publish(run, exc, started)
        run.record = self._ledger.record_failed(run.key, event["id"], now=self._now())
        self._observer.on_step(
            StepRecord(
                event_id=job.event.event_id,
                invoice=job.event.invoice,
                provider=self._provider.name,
                step=PUBLISH,
                outcome="published_failure",
                status=failure["status"],
                code=failure["code"],
                detail=failure["detail"],
                failed_step=failure["step"],
                attempt=attempts,
                duration_seconds=round(self._clock() - started, 4),
            )
        )
        return GaveUp(event)

    def _publish_queued(self, run: _Run) -> Outcome:
        record, job = run.record, run.job
        assert record.resend is not None
        fields: dict[str, Any] = {}
        if record.email_info is None and record.email_info_error is not None:
            fields["emailInfoError"] = record.email_info_error
        data = EmailQueuedData(
            invoiceId=job.event.invoice,
            provider=self._provider.name,
            email=record.resend.email,
            queuedAt=record.resend.queued_at,
            jobId=record.resend.job_id,
            emailInfo=record.email_info,
            reissuedEvent=ReissuedEventRef(id=job.event.event_id, source=job.event.source),
            **fields,
        )
        event = cloud_event(
            EMAIL_QUEUED,
            cause_key=job.event.key,
            subject=job.event.invoice,
            data=data.model_dump(exclude_unset=True),
            id_scheme=record.id_scheme,
        )
        started = self._clock()
        kept = replace(record.resend, email=None)  # the address goes out, and is not kept
        try:
            self._publish(
                run,
                lambda: self._publisher.publish_event(event, EMAIL_QUEUED),
                held=(event["id"], partial(self._ledger.record_published, keep=kept)),
            )
        except PublishError as exc:
            return self._retry_publish(run, exc, started)
        run.record = self._ledger.record_published(run.key, event["id"], now=self._now(), keep=kept)
        self._log(job, PUBLISH, "published", started)
        self._checkpoint("published", job)
        return Done(event)

    def _retry_publish(self, run: _Run, exc: PublishError, started: float) -> RetryLater:
        """A publish the broker refused is retried without limit: the event must not be lost."""
        history = run.job.step_history(PUBLISH)
        history = replace(history, attempts=history.attempts + 1)
        delay = whole_seconds(server_error_delay(history.attempts, self._policy, self._rng))
        self._log(run.job, PUBLISH, "publish_failed", started, code=exc.reason, wait=delay)
        return RetryLater(
            run.job.with_history(PUBLISH, history),
            delay,
            PUBLISH,
            "publish_failed",
            code=str(exc.reason),
        )

    # -- shared dependency health ----------------------------------------------------------

    def _wait_for_dependencies(self, step: Step, run: _Run) -> RetryLater | object | None:
        """Before a step that calls the API or the bus: wait in the broker while that
        dependency is unhealthy for the whole fleet, unless this run is its probe. The
        wait uses none of the step's tries; an API outage longer than
        ``outage_max_wait_seconds`` (all of the event's waits together) gives up."""
        if self._deps is None:
            return None
        if step in API_STEPS:
            names = [budget(self._provider.name), api(self._provider.name)]
        elif step in BUS_STEPS:
            names = [BUS]
        else:
            return None
        rate = self._provider.budget.rate() if step in API_STEPS else None
        spacing = 1.0 / rate if rate else None  # the API's rate, for the API's waits
        for name in names:
            gate = self._deps.check(name, run.owner, spacing=spacing)
            if gate.probe:
                run.probe = name
            if gate.go:
                continue
            history = run.job.step_history("paused")
            waited = history.rate_limited_seconds
            delay = whole_seconds(gate.wait)
            if name != BUS and waited + delay > self._outage_max_wait:
                self._give_up_waiting(run, name, gate.health, waited)
                return _GAVE_UP
            run.job = run.job.with_history(
                "paused",
                replace(
                    history, attempts=history.attempts + 1, rate_limited_seconds=waited + delay
                ),
            )
            began_here = run.resend_begun_at is not None and not run.record.resend_in_flight
            if step is Step.RESEND and began_here:  # marked by this claim, and not sent
                self._ledger.resend_not_sent(run.key)
            self._log(run.job, str(step), "paused", self._clock(), code=name, wait=delay)
            return RetryLater(run.job, delay, str(step), "paused", code=name)
        if step in API_STEPS:
            return self._pace(step, run)
        return None

    def _pace(self, step: Step, run: _Run) -> RetryLater | None:
        """Keep the fleet's requests to the API's budget: each takes the next slot of the
        rate ``provider.budget`` knows, shared by every process; a short wait is slept
        here (up to ``PACING_SLEEP_MAX_SECONDS``), a longer one in the broker."""
        rate = self._provider.budget.rate()
        if rate is None or self._deps is None:
            return None
        wait = self._deps.reserve(pace(self._provider.name), 1.0 / rate) - self._now()
        if wait <= 0:
            return None
        if wait <= PACING_SLEEP_MAX_SECONDS:
            time.sleep(wait)
            return None
        delay = whole_seconds(wait)
        self._log(run.job, str(step), "paced", self._clock(), wait=delay)
        return RetryLater(run.job, delay, str(step), "paced")

    def _api_healthy(self) -> bool:
        if self._deps is None:
            return True
        provider = self._provider.name
        try:
            return not self._deps.unhealthy([api(provider), budget(provider)])
        except LedgerError:
            return True  # the claim that follows will tell

    def _give_up_waiting(self, run: _Run, name: str, health: Any, waited: float) -> None:
        """An outage outlasted what the event may wait: give up, as for any step."""
        step = RESEND if run.record.resend is None else EMAIL_INFO
        detail = f"{name} unhealthy for {waited:.0f} s ({getattr(health, 'detail', None)})"
        self._log(run.job, step, "gave_up", self._clock(), code="dependency_unavailable")
        if run.record.resend is not None:
            run.record = self._ledger.record_email_info(
                run.key,
                **self._lease(run),
                email_info=None,
                error=f"dependency_unavailable: {detail}",
            )
            return
        decision = GiveUp(
            status=None,
            code="dependency_unavailable",
            detail=detail,
            history=run.job.step_history(step),
        )
        self._give_up(run, step, decision)

    def _call(self, run: _Run, call: Callable[[], Any]) -> Any:
        """One call to the billing API; its outcome tells the API's shared health (and
        settles the probe, if this run is the API's or the rate budget's)."""
        names = (api(self._provider.name), budget(self._provider.name))
        probing = run.probe if run.probe in names else None
        if probing is not None:
            run.probe = None
        try:
            result = call()
        except BillingError as error:
            self._tell(run, probing, error)
            raise
        self._tell(run, probing, None)
        return result

    def _tell(self, run: _Run, probing: str | None, error: BillingError | None) -> None:
        deps = self._deps
        if deps is None:
            return
        api_name, budget_name = api(self._provider.name), budget(self._provider.name)
        invoice = run.job.event.invoice
        outage = isinstance(error, TransientError) and (error.status or 500) >= 500
        if error is not None and outage:
            detail = f"{error.status or error.code} {error.detail}"
            deps.failed(api_name, invoice, detail, probe=probing == api_name)
            run.probe_failed = probing == api_name
        else:  # it answered (a 4xx is about the event, not the API)
            deps.succeeded(api_name, invoice, probe=probing == api_name)
        if (
            isinstance(error, RateLimited)
            and error.code in ACCOUNT_RATE_LIMIT_CODES
            and error.retry_after
        ):
            deps.hold(budget_name, self._now() + error.retry_after, f"429 {error.code}")
        elif probing == budget_name:
            deps.succeeded(budget_name, invoice, probe=True)

    def _publish(
        self,
        run: _Run,
        publish: Callable[[], None],
        *,
        held: tuple[str, Callable[..., Record]] | None = None,
    ) -> None:
        """One publish; its outcome tells the bus's shared health. A blocked broker says
        so itself: the bus is unhealthy for the fleet at once. What it holds (``held``:
        the outgoing id, and the ledger write for it) is recorded by ``confirmed_late``."""
        deps = self._deps
        probe = run.probe == BUS
        run.probe = None if probe else run.probe
        try:
            publish()
        except PublishError as exc:
            blocked = exc.reason is PublishFailure.BLOCKED
            if exc.held and held is not None:
                self._held[held[0]] = (run.key, run.job, held[1])
            if deps is not None:
                detail = f"{exc.reason}: {exc.detail}"
                deps.failed(BUS, run.job.event.event_id, detail, probe=probe, certain=blocked)
            raise
        if held is not None:
            self._held.pop(held[0], None)
        if deps is not None:
            deps.succeeded(BUS, run.job.event.event_id, probe=probe)

    def confirmed_late(self, outgoing_ids: list[str]) -> None:
        """A blocked broker took these events after all: the ledger says they went out
        (before their retries come), so no retry sends one twice."""
        for outgoing_id in outgoing_ids:
            held = self._held.pop(outgoing_id, None)
            if held is None:
                continue
            key, job, record = held
            record(key, outgoing_id, now=self._now())
            self._log(job, PUBLISH, "published", self._clock(), code="confirmed_late")

    def dependency_states(self) -> dict[str, tuple[bool, float]]:
        """Each dependency this process calls: (healthy, for how long it has not been)."""
        if self._deps is None:
            return {}
        now = time.time()
        names = [budget(self._provider.name), api(self._provider.name), BUS]
        states = {n: (h.ok, now - h.since) for n in names for h in [self._deps.state(n)]}
        states["ledger"] = (
            not self._ledger_down,
            now - self._ledger_down[0] if self._ledger_down else 0.0,
        )
        return states

    def budget(self) -> tuple[str, float | None, float | None]:
        """(provider, the request rate kept to, requests left in the API's window)."""
        budget = self._provider.budget
        return (self._provider.name, budget.rate(), budget.remaining)

    def unhealthy(self, *, for_intake: bool = False) -> list[str]:
        """The dependencies this process sees unhealthy (the ledger included), with why.
        ``for_intake``: those that keep the consumer from taking new events (less an
        outage whose probe is due: ``Dependencies.unhealthy``)."""
        found = []
        if self._ledger_down:
            try:  # back? (no event may come to tell while intake waits for it)
                self._ledger.health(BUS, time.time())
                self._ledger_back()
            except LedgerError:
                down = time.time() - self._ledger_down[0]
                found.append(f"ledger: unavailable for {down:.0f} s")
        if self._deps is not None:
            # A shut rate budget does not pause intake: it lasts seconds, and the events
            # that meet it take their slots after it (spread at the budget's rate).
            names = [api(self._provider.name), BUS]
            with contextlib.suppress(LedgerError):  # the ledger says so at its next claim
                sick = self._deps.unhealthy(names, for_intake=for_intake)
                found += [f"{h.dependency}: {h.detail}" for h in sick]
        return found

    # -- bookkeeping -----------------------------------------------------------------------

    def _lease(self, run: _Run) -> dict[str, Any]:
        """What a ledger write needs to renew this run's lease (and when it began, for
        ``_lease_uncertain``: a write that raises ends the run, so it is never read)."""
        run.leased_at = self._now()
        return {"owner": run.owner, "now": run.leased_at, "lease_seconds": self._lease_seconds}

    def _lease_uncertain(self, run: _Run) -> bool:
        """Has half the lease passed since the write that last renewed it began?

        A ledger answer can arrive long after its statement ran (a link down for 20 s,
        TCP delivering the reply once it is back): the lease it renewed may have run out
        and another run, on another host, taken the event over meanwhile. Past half the
        lease, the POST (bounded by the HTTP deadline, well inside the other half) waits
        for a fresh renewal first.
        """
        return self._now() - run.leased_at > self._lease_seconds / 2

    def _decide(self, run: _Run, step: str, error: BillingError, started: float) -> Retry | GiveUp:
        """Apply the retry policy to a failed step; the job's history records the try."""
        job = run.job
        if run.probe_failed and self._deps is not None:
            # The API is still down: wait for the next probe like every other event.
            run.probe_failed = False
            health = self._deps.state(api(self._provider.name))
            pause = whole_seconds(max(1.0, (health.retry_at or 0) - self._now()))
            self._log(
                job, step, "paused", started, status=error.status, code=error.code, wait=pause
            )
            return Retry(delay_seconds=pause, history=job.step_history(step), kind="paused")
        elsewhere = sum(h.rate_limited_seconds for s, h in job.history.items() if s != step)
        decision = decide(
            error, job.step_history(step), self._policy, self._rng, rate_limited_elsewhere=elsewhere
        )
        if isinstance(decision, Retry):
            outcome, wait = decision.kind, decision.delay_seconds
        else:
            outcome, wait = "gave_up", None
        self._log(job, step, outcome, started, status=error.status, code=error.code, wait=wait)
        run.job = job.with_history(step, decision.history)
        return decision

    def _retry(self, run: _Run, step: str, decision: Retry, error: BillingError) -> RetryLater:
        return RetryLater(
            run.job,
            decision.delay_seconds,
            step,
            decision.kind,
            status=error.status,
            code=error.code,
        )

    def ledger_unavailable(self, job: Job, exc: LedgerError) -> RetryLater:
        """Wait for the ledger in the broker. Logged once when it goes, then every
        ``LEDGER_REMINDER_SECONDS`` while it stays away, not once per event."""
        retry = wait_for_ledger(job, self._policy, self._rng)
        now = time.time()
        if not self._ledger_down:
            self._ledger_down[:] = [now, now]
            log.error("ledger unavailable: %s; events wait in the broker", exc)
        elif now - self._ledger_down[1] >= LEDGER_REMINDER_SECONDS:
            self._ledger_down[1] = now
            log.error("ledger still unavailable after %.0f s: %s", now - self._ledger_down[0], exc)
        self._log(job, LEDGER, "unavailable", self._clock(), wait=retry.delay_seconds)
        return retry

    def _ledger_back(self) -> None:
        if self._ledger_down:
            log.warning("ledger available again after %.0f s", time.time() - self._ledger_down[0])
            self._ledger_down.clear()

    def _release(self, run: _Run, retry: RetryLater) -> None:
        try:
            self._ledger.release(
                run.key,
                run.owner,
                waiting=f"{retry.step} {retry.kind}",
                until=self._now() + retry.delay_seconds,
            )
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


def wait_for_ledger(job: Job, policy: RetryPolicy, rng: random.Random) -> RetryLater:
    """Without the ledger nothing is safe to send: back off and try again, never give up."""
    history = job.step_history(LEDGER)
    history = replace(history, attempts=history.attempts + 1)
    delay = whole_seconds(server_error_delay(history.attempts, policy, rng))
    return RetryLater(job.with_history(LEDGER, history), delay, LEDGER, "ledger_error")


def _one_more(job: Job, step: str) -> Job:
    history = job.step_history(step)
    return job.with_history(step, replace(history, attempts=history.attempts + 1))


def failed_event(
    *,
    invoice: str | None,
    provider: str,
    cause_key: tuple[str, str],
    reissued_event: dict[str, str | None],
    attempts: int,
    reason: dict[str, Any],
    id_scheme: int = ID_SCHEME,
) -> dict[str, Any]:
    """An ``invoice.email_failed`` CloudEvent."""
    return cloud_event(
        EMAIL_FAILED,
        cause_key=cause_key,
        subject=invoice,
        id_scheme=id_scheme,
        data=EmailFailedData(
            invoiceId=invoice,
            provider=provider,
            reissuedEvent=ReissuedEventRef.model_validate(reissued_event),
            attempts=attempts,
            reason=FailureReason.model_validate(reason),
        ).model_dump(),
    )
