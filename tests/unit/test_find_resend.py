"""An unanswered resend, judged in the API's clock, one resend per invoice at a time.

The pipeline against the real sandbox (a real HTTP server whose clock can be off ours),
a real SQLite ledger and the in-memory publisher. The worker-level versions of these
are in tests/integration/test_reconcile.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx
import pytest
import respx

from invoice_mailer.billing import HostUpClient
from invoice_mailer.events import Reissued
from invoice_mailer.ledger import Ledger
from invoice_mailer.pipeline import Done, GaveUp, Job, Outcome, Pipeline, RetryLater
from invoice_mailer.policy import RetryPolicy
from invoice_mailer.publishing import InMemoryPublisher
from sandbox import DEFAULT_API_KEY, Fault, Sandbox
from tests.unit.conftest import Clock

INVOICE = "inv_1"
LOST = Fault(status=None, then_succeed=True, drop=True)
"""The email is queued, then the connection drops: the answer is lost."""
NEVER_ARRIVED = Fault(status=None, drop=True)
"""The connection drops before the API acts: nothing was sent, and we cannot know."""


def _pipeline(
    ledger: Ledger,
    http: httpx.Client,
    url: str,
    *,
    settles: float = 0.0,
    wall_clock: Callable[[], float] = time.time,
) -> tuple[Pipeline, InMemoryPublisher]:
    """A pipeline with a fresh HostUp client: a worker that knows nothing of the API's clock."""
    publisher = InMemoryPublisher()
    pipeline = Pipeline(
        provider=HostUpClient(http=http, base_url=url, api_key=DEFAULT_API_KEY),
        publisher=publisher,
        ledger=ledger,
        policy=RetryPolicy(server_error_base_seconds=1),
        lease_seconds=30,
        resend_settles_seconds=settles,
        wall_clock=wall_clock,
    )
    return pipeline, publisher


def _job(event_id: str, invoice: str = INVOICE) -> Job:
    return Job.new(
        Reissued(event_id=event_id, source="/billing", invoice=invoice),
        body="{}",
        content_type="application/cloudevents+json",
    )


def _until_final(pipeline: Pipeline, job: Job, runs: int = 4) -> Outcome:
    """Run ``job`` and its retries at once (the broker's wait skipped), until it ends."""
    outcome = pipeline.run(job)
    for _ in range(runs):
        if not isinstance(outcome, RetryLater):
            break
        outcome = pipeline.run(outcome.job)
    return outcome


@pytest.mark.parametrize("fresh", [True, False], ids=["fresh-worker", "same-worker"])
@pytest.mark.parametrize("offset", [-0.25, -30.0, 30.0])
def test_a_lost_resend_answer_is_found_whatever_the_api_clock(
    ledger: Ledger, http: httpx.Client, offset: float, fresh: bool
) -> None:
    """The invoice had an email just before; the new resend's answer is lost. Found in
    email-info as this resend's, not the earlier one: exactly one new email.
    ``fresh``: the run after the loss is a new worker, whose only estimate of the API's
    clock is email-info's own Date header."""
    with Sandbox(clock_offset=offset) as sb:
        pipeline, _ = _pipeline(ledger, http, sb.hostup_url)
        assert isinstance(_until_final(pipeline, _job("evt_earlier")), Done)
        sb.script(INVOICE, "resend", [LOST])
        first = pipeline.run(_job("evt_new"))
        assert isinstance(first, RetryLater)
        if fresh:
            pipeline, _ = _pipeline(ledger, http, sb.hostup_url)
        outcome = _until_final(pipeline, first.job)
        emails = sb.emails(INVOICE)
        posts = sb.requests(invoice=INVOICE, endpoint="resend")
    assert isinstance(outcome, Done)
    assert len(emails) == 2
    assert len(posts) == 2
    assert outcome.event["data"]["queuedAt"] == emails[1]["createdAt"]


@pytest.mark.parametrize("offset", [-30.0, 30.0])
def test_a_resend_that_never_arrived_is_sent_once_email_info_cannot_list_it(
    ledger: Ledger, http: httpx.Client, offset: float
) -> None:
    """The earlier email is not taken for it, however far off the API's clock is."""
    with Sandbox(clock_offset=offset) as sb:
        pipeline, _ = _pipeline(ledger, http, sb.hostup_url)
        _until_final(pipeline, _job("evt_earlier"))
        sb.script(INVOICE, "resend", [NEVER_ARRIVED])
        outcome = _until_final(pipeline, _job("evt_new"))
        emails = sb.emails(INVOICE)
    assert isinstance(outcome, Done)
    assert len(emails) == 2
    assert outcome.event["data"]["queuedAt"] == emails[1]["createdAt"]


def test_an_unlisted_resend_is_sent_again_once_it_has_settled(
    ledger: Ledger, http: httpx.Client
) -> None:
    """Not listed right after the lost POST: wait. Still not listed once email-info has had
    ``resend_settles_seconds`` since that POST: it never arrived; sent again (once)."""
    wall = Clock(time.time())  # ours, moved by the test; the API's is the sandbox's own
    with Sandbox() as sb:
        pipeline, _ = _pipeline(ledger, http, sb.hostup_url, settles=15, wall_clock=wall)
        sb.script(INVOICE, "resend", [NEVER_ARRIVED])
        first = pipeline.run(_job("evt_new"))
        assert isinstance(first, RetryLater)
        wall.now += 1
        waiting = pipeline.run(first.job)
        assert isinstance(waiting, RetryLater)
        assert waiting.kind == "uncertain_unlisted"
        assert waiting.delay_seconds == 14
        wall.now += 14
        outcome = pipeline.run(waiting.job)
        posts = sb.requests(invoice=INVOICE, endpoint="resend")
        emails = sb.emails(INVOICE)
    assert isinstance(outcome, Done)
    assert len(posts) == 2
    assert len(emails) == 1


def test_until_email_info_could_list_it_an_unlisted_resend_waits(
    ledger: Ledger, http: httpx.Client
) -> None:
    """email-info lags behind resend: not listed yet is not "not sent". The event waits
    (in the broker) until the resend settles, and then finds it: one email."""
    with Sandbox(email_info_lag=0.5) as sb:
        pipeline, _ = _pipeline(ledger, http, sb.hostup_url, settles=30)
        sb.script(INVOICE, "resend", [LOST])
        first = pipeline.run(_job("evt_new"))
        assert isinstance(first, RetryLater)
        waiting = pipeline.run(first.job)
        assert isinstance(waiting, RetryLater)
        assert (waiting.step, waiting.kind) == ("resend", "uncertain_unlisted")
        assert 0 < waiting.delay_seconds <= 30
        _listed(sb)
        outcome = pipeline.run(waiting.job)
        emails = sb.emails(INVOICE)
    assert isinstance(outcome, Done)
    assert len(emails) == 1


@pytest.mark.parametrize("reached", [True, False], ids=["answer-lost", "never-arrived"])
def test_two_reissues_of_one_invoice_at_once_send_two_emails(
    ledger: Ledger, http: httpx.Client, reached: bool
) -> None:
    """A's resend is unanswered; B, of the same invoice, waits until A is settled, so
    neither takes the other's email: the customer gets two."""
    with Sandbox() as sb:
        pipeline, _ = _pipeline(ledger, http, sb.hostup_url)
        sb.script(INVOICE, "resend", [LOST if reached else NEVER_ARRIVED])
        a = pipeline.run(_job("evt_a"))
        b = pipeline.run(_job("evt_b"))
        assert isinstance(a, RetryLater)
        assert isinstance(b, RetryLater)
        assert b.kind == "invoice_busy"
        assert len(sb.requests(invoice=INVOICE, endpoint="resend")) == 1
        a_done = _until_final(pipeline, a.job)
        b_done = _until_final(pipeline, b.job)
        emails = sb.emails(INVOICE)
    assert isinstance(a_done, Done)
    assert isinstance(b_done, Done)
    assert len(emails) == 2
    assert {a_done.event["data"]["queuedAt"], b_done.event["data"]["queuedAt"]} == {
        e["createdAt"] for e in emails
    }


@respx.mock
def test_an_api_that_tells_no_time_cannot_be_compared_and_is_not_resent_blind(
    ledger: Ledger, http: httpx.Client
) -> None:
    base = "https://hostup.test/api/v2"
    post = respx.post(f"{base}/billing/invoices/{INVOICE}/actions/resend-email").mock(
        side_effect=httpx.ReadTimeout("no answer")
    )
    respx.get(f"{base}/billing/invoices/{INVOICE}/email-info").respond(
        200, json={"emails": [], "currentTargets": None}
    )
    pipeline, publisher = _pipeline(ledger, http, base)
    outcome = _until_final(pipeline, _job("evt_new"))
    assert isinstance(outcome, GaveUp)
    assert outcome.reason["code"] == "resend_unverifiable"
    assert len(post.calls) == 1
    assert len(publisher.dead_letters) == 1


def _listed(sb: Sandbox) -> None:
    """Until email-info lists the invoice's email (the sandbox's lag is its own clock)."""
    url = f"{sb.hostup_url}/billing/invoices/{INVOICE}/email-info"
    auth = {"Authorization": f"Bearer {DEFAULT_API_KEY}"}
    deadline = time.monotonic() + 10
    with httpx.Client() as client:
        while time.monotonic() < deadline:
            if client.get(url, headers=auth).json()["emails"]:
                return
            time.sleep(0.02)  # polling a condition that time alone brings about
    raise AssertionError("email-info never listed the email")
