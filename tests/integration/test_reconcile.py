"""An unanswered resend judged right, and what the outside world sends cannot make the
service lie: a real worker, RabbitMQ, and the sandbox with its clock off ours, its
answers lost or trickling, events with ids that once collided."""

from __future__ import annotations

import json
import time

import pytest

from sandbox import Fault, Sandbox
from tests.integration.conftest import StartWorker
from tests.support.broker import Bus, new_invoice, reissued_event

QUICK = {
    "HTTP_TIMEOUT_SECONDS": "2",
    "RETRY_SERVER_ERROR_BASE_SECONDS": "1",
    "RETRY_SERVER_ERROR_MAX_SECONDS": "1",
    "EMAIL_INFO_LAG_SECONDS": "0",
}
LOST = Fault(status=None, then_succeed=True, drop=True)
"""The email is queued, then the connection drops before the answer."""
NEVER_ARRIVED = Fault(status=None, drop=True)


def _queued(invoice: str) -> object:
    return lambda e: e["type"] == "invoice.email_queued" and e["data"]["invoiceId"] == invoice


@pytest.mark.parametrize(
    "offset", [-0.25, -30.0, 30.0], ids=["behind-0.25s", "behind-30s", "ahead-30s"]
)
def test_a_lost_resend_answer_sends_exactly_one_email_whatever_the_api_clock(
    start_worker: StartWorker, bus: Bus, sandbox: Sandbox, offset: float
) -> None:
    """The invoice was reissued a moment before (its email is in email-info); the new
    resend's answer is lost. The retry finds the new email in email-info, judged in the
    API's clock: one email per reissue, neither doubled nor taken for the other."""
    sandbox.configure(clock_offset=offset)
    start_worker(concurrency=4, **QUICK)
    invoice = new_invoice()
    bus.reissue(invoice)
    bus.wait_for(1, where=_queued(invoice))
    sandbox.script(invoice, "resend", [LOST])
    bus.reissue(invoice)
    events = bus.wait_for(2, timeout=60, where=_queued(invoice))
    emails = sandbox.emails(invoice)
    assert len(emails) == 2
    assert len(sandbox.requests(invoice=invoice, endpoint="resend")) == 2
    assert [e["data"]["queuedAt"] for e in events] == [e["createdAt"] for e in emails]


@pytest.mark.parametrize("fault", [LOST, NEVER_ARRIVED], ids=["answer-lost", "never-arrived"])
def test_two_reissues_of_one_invoice_at_once_with_one_answer_lost_send_two_emails(
    start_worker: StartWorker, bus: Bus, sandbox: Sandbox, fault: Fault
) -> None:
    """While the first resend's outcome is unknown the second event waits in the broker;
    neither takes the other's email for its own, whether the lost POST arrived or not."""
    start_worker(concurrency=4, **QUICK)
    invoice = new_invoice()
    sandbox.script(invoice, "resend", [fault])
    bus.reissue(invoice)
    bus.reissue(invoice)
    events = bus.wait_for(2, timeout=60, where=_queued(invoice))
    emails = sandbox.emails(invoice)
    assert len(emails) == 2
    assert sorted(e["data"]["queuedAt"] for e in events) == sorted(e["createdAt"] for e in emails)
    assert len({e["data"]["reissuedEvent"]["id"] for e in events}) == 2


def test_a_trickling_api_costs_one_deadline_per_request_and_others_flow(
    start_worker: StartWorker, bus: Bus, sandbox: Sandbox
) -> None:
    """Six invoices whose email-info answers drip over 30 s, on four threads: each such
    request ends at its 2 s deadline (its retry follows within seconds, not after 30 s),
    and twenty ordinary events are published meanwhile."""
    start_worker(concurrency=4, RETRY_SERVER_ERROR_MAX_ATTEMPTS="2", **QUICK)
    slow = [new_invoice() for _ in range(6)]
    for invoice in slow:
        sandbox.script(invoice, "email_info", [Fault(status=None, trickle=30.0)] * 2)
        bus.reissue(invoice)
    started = time.monotonic()
    ordinary = [new_invoice() for _ in range(20)]
    for invoice in ordinary:
        bus.reissue(invoice)
    bus.wait_for(20, timeout=25, where=lambda e: e["data"]["invoiceId"] in ordinary)
    assert time.monotonic() - started < 30  # before the first trickle could have ended
    given_up = bus.wait_for(6, timeout=30, where=lambda e: e["data"]["invoiceId"] in slow)
    assert all("ReadTimeout" in e["data"]["emailInfoError"] for e in given_up)
    for invoice in slow:
        first, second = sandbox.requests(invoice=invoice, endpoint="email_info")
        assert second.at - first.at < 2 + 1 + 2  # deadline + backoff + scheduling slack


def test_ids_that_once_collided_stay_apart_and_control_characters_are_refused(
    start_worker: StartWorker, bus: Bus
) -> None:
    """("/a\\nx", "E") and ("/a", "x\\nE") got one outgoing id in 0.2. Control characters
    in id or source make an event invalid_cloudevent now: each is dead-lettered once with
    its reason and gets its own invoice.email_failed, with ids that differ."""
    start_worker(concurrency=2, **QUICK)
    invoice = new_invoice()
    bad = [
        {"source": "/a\nx", "id": "E"},
        {"source": "/a", "id": "x\nE"},
        {"source": "/billing", "id": "evt\ttab"},
        {"source": "/billing", "id": "evt\x00nul"},
        {"source": "/billing", "id": "evt\x1b[31mred"},
        {"source": "/billing events", "id": "evt_space"},
    ]
    for attributes in bad:
        event = reissued_event(invoice)
        event.update(attributes)
        bus.publish_raw(json.dumps(event).encode(), content_type="application/cloudevents+json")
    events = bus.wait_for(len(bad), timeout=30)
    letters = bus.dead_letters()
    assert {e["type"] for e in events} == {"invoice.email_failed"}
    assert {e["data"]["reason"]["code"] for e in events} == {"invalid_cloudevent"}
    assert len({e["id"] for e in events}) == len(bad)
    assert len(letters) == len(bad)
    assert all(
        letter.headers["x-invoice-mailer-reason"].startswith("invalid_cloudevent")
        for letter in letters
    )
