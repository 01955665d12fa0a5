"""Pipeline decisions that need a clock or a crash: the Abillify idempotency window,
when the resend is recorded."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import respx

from invoice_mailer.billing import AbillifyClient
from invoice_mailer.errors import PublishFailure
from invoice_mailer.events import EMAIL_QUEUED, Reissued, outgoing_event_id
from invoice_mailer.ledger import Ledger
from invoice_mailer.pipeline import Checkpoint, Done, GaveUp, Job, Pipeline, RetryLater
from invoice_mailer.policy import RetryPolicy
from invoice_mailer.publishing import InMemoryPublisher
from tests.unit.conftest import Clock

URL = "https://abillify.test/api/invoices/RE-1/resendInvoice"
HOUR = 3600.0
OK = {"job": "9", "result": "OK", "resultcode": "0"}


def _pipeline(
    ledger: Ledger,
    http: httpx.Client,
    clock: Clock,
    pub: InMemoryPublisher,
    checkpoint: Checkpoint | None = None,
) -> Pipeline:
    provider = AbillifyClient(
        http=http, base_url="https://abillify.test/api", username="u", password="p"
    )
    return Pipeline(
        provider=provider,
        publisher=pub,
        ledger=ledger,  # type: ignore[arg-type]
        policy=RetryPolicy(server_error_base_seconds=1),
        lease_seconds=30,
        wall_clock=clock,
        checkpoint=checkpoint,
    )


JOB = Job.new(
    Reissued(event_id="evt_1", source="/billing", invoice="RE-1"),
    body="{}",
    content_type="application/cloudevents+json",
)


@respx.mock
def test_an_unanswered_resend_is_retried_with_the_same_key_within_the_window(
    ledger: Ledger, http: httpx.Client
) -> None:
    """Within 24 h Abillify's Idempotency-Key makes a blind retry safe: it is sent."""
    route = respx.post(URL).mock(
        side_effect=[
            httpx.ReadTimeout("no answer"),
            httpx.Response(200, json=OK),
        ]
    )
    clock, pub = Clock(1_800_000_000.0), InMemoryPublisher()
    pipeline = _pipeline(ledger, http, clock, pub)
    first = pipeline.run(JOB)
    assert isinstance(first, RetryLater)
    clock.now += 20 * HOUR
    second = pipeline.run(first.job)
    assert isinstance(second, Done)
    keys = {call.request.headers["idempotency-key"] for call in route.calls}
    assert len(route.calls) == 2
    assert len(keys) == 1
    assert second.event["data"]["jobId"] == "9"


@respx.mock
def test_past_the_idempotency_window_an_unanswered_resend_is_not_sent_blind(
    ledger: Ledger, http: httpx.Client
) -> None:
    """24 h after a resend whose answer was lost, the key may be forgotten: give up
    (email_failed, dead letter) instead of risking a second email."""
    route = respx.post(URL).mock(
        side_effect=[
            httpx.ReadTimeout("no answer"),
            httpx.Response(
                429,
                headers={"Retry-After": "86400"},
                json={"code": 429, "type": "ERR_RATE_LIMIT", "message": "later"},
            ),
        ]
    )
    clock, pub = Clock(1_800_000_000.0), InMemoryPublisher()
    pipeline = _pipeline(ledger, http, clock, pub)
    first = pipeline.run(JOB)
    assert isinstance(first, RetryLater)
    clock.now += 2
    second = pipeline.run(first.job)  # a 429 does not settle the first POST's fate
    assert isinstance(second, RetryLater)
    clock.now += 24 * HOUR
    third = pipeline.run(second.job)
    assert isinstance(third, GaveUp)
    assert len(route.calls) == 2
    reason = third.event["data"]["reason"]
    assert (reason["step"], reason["code"]) == ("resend", "idempotency_window_passed")
    assert [d.code for d in pub.dead_letters] == ["idempotency_window_passed"]


@respx.mock
def test_a_replay_after_the_window_resends_on_the_operators_word(
    ledger: Ledger, http: httpx.Client
) -> None:
    """Replaying the dead letter is the decision to send again: it is sent."""
    route = respx.post(URL).mock(
        side_effect=[
            httpx.ReadTimeout("no answer"),
            httpx.Response(200, json={"job": "3", "result": "OK", "resultcode": "0"}),
        ]
    )
    clock, pub = Clock(1_800_000_000.0), InMemoryPublisher()
    pipeline = _pipeline(ledger, http, clock, pub)
    first = pipeline.run(JOB)
    assert isinstance(first, RetryLater)
    clock.now += 25 * HOUR
    assert isinstance(pipeline.run(first.job), GaveUp)
    replayed = pipeline.run(JOB.model_copy(update={"replay": True}))
    assert isinstance(replayed, Done)
    assert len(route.calls) == 2


@respx.mock
def test_a_resend_whose_publication_must_wait_is_recorded_before_the_wait(
    ledger: Ledger, http: httpx.Client
) -> None:
    """The resend is recorded when its answer arrives, so the retry publishes without
    sending again (or asking whether it was sent)."""
    route = respx.post(URL).mock(return_value=httpx.Response(200, json=OK))
    clock, pub = Clock(1_800_000_000.0), InMemoryPublisher()
    pub.refuse_events = PublishFailure.UNREACHABLE
    pipeline = _pipeline(ledger, http, clock, pub)
    first = pipeline.run(JOB)
    pub.refuse_events = None
    assert isinstance(first, RetryLater)
    assert first.step == "publish"
    clock.now += 5
    assert "resend" not in first.job.wire()  # the ledger is the authority, not the message
    second = pipeline.run(first.job)
    assert isinstance(second, Done)
    assert len(route.calls) == 1
    assert second.event["data"]["jobId"] == "9"


@respx.mock
def test_a_crash_after_the_resend_answered_sends_nothing_again(
    ledger: Ledger, http: httpx.Client
) -> None:
    """The resend's answer is written before anything else: a worker that dies right
    after it leaves it recorded, and the run that takes over only publishes."""
    route = respx.post(URL).mock(return_value=httpx.Response(200, json=OK))
    clock, pub = Clock(1_800_000_000.0), InMemoryPublisher()

    def die_after_the_resend(point: str, job: Job) -> None:
        if point == "resent":
            raise SystemExit("killed")

    dying = _pipeline(ledger, http, clock, pub, checkpoint=die_after_the_resend)
    with pytest.raises(SystemExit):
        dying.run(JOB)
    clock.now += 31  # the dead run's lease runs out
    outcome = _pipeline(ledger, http, clock, pub).run(JOB)
    assert isinstance(outcome, Done)
    assert len(route.calls) == 1
    assert outcome.event["data"]["jobId"] == "9"
    assert [e["type"] for _, e in pub.events] == ["invoice.email_queued"]


@respx.mock
def test_a_given_up_event_is_dead_lettered_once_however_often_its_event_must_wait(
    ledger: Ledger, http: httpx.Client
) -> None:
    """400 from the API, then email_failed cannot be published five times: one POST,
    one dead letter; the sixth try publishes."""
    route = respx.post(URL).mock(
        return_value=httpx.Response(
            400, json={"code": 400, "type": "ERR_INVALID_VALUE", "message": "bad", "details": []}
        )
    )
    clock, pub = Clock(1_800_000_000.0), InMemoryPublisher()
    pub.refuse_events = PublishFailure.UNROUTABLE  # nothing bound downstream
    pipeline = _pipeline(ledger, http, clock, pub)
    outcome = pipeline.run(JOB)
    for _ in range(5):
        assert isinstance(outcome, RetryLater)
        assert outcome.step == "publish"
        clock.now += outcome.delay_seconds
        outcome = pipeline.run(outcome.job)
    assert isinstance(outcome, RetryLater)
    pub.refuse_events = None  # a queue is bound
    final = pipeline.run(outcome.job)
    assert isinstance(final, GaveUp)
    assert len(route.calls) == 1
    assert [d.code for d in pub.dead_letters] == ["ERR_INVALID_VALUE"]
    assert [e["type"] for _, e in pub.events] == ["invoice.email_failed"]


@respx.mock
def test_an_event_a_blocked_broker_took_late_is_recorded_and_never_published_again(
    ledger: Ledger, http: httpx.Client
) -> None:
    """The broker blocks (a memory alarm) with the event written: the publish is held.
    When the broker's late confirm comes, the ledger records the event as out, and its
    retry publishes nothing."""
    respx.post(URL).mock(return_value=httpx.Response(200, json=OK))
    clock, pub = Clock(1_800_000_000.0), InMemoryPublisher()
    pub.refuse_events = PublishFailure.BLOCKED
    pipeline = _pipeline(ledger, http, clock, pub)
    outcome = pipeline.run(JOB)
    assert isinstance(outcome, RetryLater)
    assert outcome.step == "publish"
    pub.refuse_events = None
    outgoing = outgoing_event_id(EMAIL_QUEUED, "/billing", "evt_1")
    pipeline.confirmed_late([outgoing, "an id this process never held"])
    (record,) = ledger.find(JOB.event.event_id)
    assert record.outcome_event_id == outgoing
    clock.now += outcome.delay_seconds
    assert not isinstance(pipeline.run(outcome.job), RetryLater)
    assert pub.events == []


class _ForgetfulLedger:
    """A ledger whose record of the resend is lost: every write answers the claim's record."""

    def __init__(self, ledger: Ledger) -> None:
        self._ledger = ledger

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ledger, name)

    def record_resend(self, key: Any, result: Any, **kw: Any) -> Any:
        return self._ledger.find(key[1])[0]  # as if the write never happened


@respx.mock
def test_a_ledger_that_keeps_no_progress_stops_the_run_after_one_post(
    ledger: Ledger, http: httpx.Client
) -> None:
    """Sent, but the record still says not sent: the run stops (a bug, for the dead-letter
    queue) rather than POST again until the record changes."""
    route = respx.post(URL).mock(return_value=httpx.Response(200, json=OK))
    clock, pub = Clock(1_800_000_000.0), InMemoryPublisher()
    pipeline = _pipeline(_ForgetfulLedger(ledger), http, clock, pub)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="kept no progress"):
        pipeline.run(JOB)
    assert len(route.calls) == 1
    assert pub.events == []


class _LateClaims:
    """A ledger whose claims answer ``late`` seconds after they ran; with ``takeover``,
    another run claims the event in between (its lease having run out)."""

    def __init__(self, ledger: Ledger, clock: Clock, *, late: float, takeover: bool) -> None:
        self._ledger, self._clock = ledger, clock
        self._late, self._takeover = late, takeover
        self.renewals = 0

    def claim(self, key: Any, **kwargs: Any) -> Any:
        answer = self._ledger.claim(key, **kwargs)
        self._clock.now += self._late
        if self._takeover:
            self._ledger.claim(key, **{**kwargs, "owner": "another-run", "now": self._clock.now})
        return answer

    def begin_resend(self, key: Any, **kwargs: Any) -> Any:
        self.renewals += 1
        return self._ledger.begin_resend(key, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ledger, name)


@respx.mock
@pytest.mark.parametrize(
    ("late", "takeover", "posts", "renewals"),
    [
        (1, False, 1, 0),  # an answer in time: POST on the claim's own mark
        (20, False, 1, 1),  # past half the lease: renewed first, then POST
        (31, True, 0, 1),  # past the lease, taken over meanwhile: no POST
    ],
)
def test_a_claim_answered_late_posts_only_on_a_lease_still_held(
    ledger: Ledger, http: httpx.Client, late: float, takeover: bool, posts: int, renewals: int
) -> None:
    """A claim whose answer comes late (a host's link down while it was in flight) may
    no longer hold the lease: the resend is sent only after a renewal says it does."""
    route = respx.post(URL).mock(return_value=httpx.Response(200, json=OK))
    clock, pub = Clock(1_800_000_000.0), InMemoryPublisher()
    late_ledger = _LateClaims(ledger, clock, late=late, takeover=takeover)
    outcome = _pipeline(late_ledger, http, clock, pub).run(JOB)  # type: ignore[arg-type]
    assert len(route.calls) == posts
    assert late_ledger.renewals == renewals
    assert isinstance(outcome, RetryLater if takeover else Done)
