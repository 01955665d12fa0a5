"""The happy path from the outside: raw CloudEvents in, HostUp calls, events out."""

from __future__ import annotations

import json
import sqlite3
from collections import Counter

import pytest

from invoice_mailer.ledger import open_ledger
from sandbox import DEFAULT_API_KEY, Sandbox
from tests.integration.conftest import StartWorker
from tests.support.broker import Bus, new_invoice


def test_each_event_makes_one_post_one_get_and_one_email_queued(
    start_worker: StartWorker, bus: Bus, sandbox: Sandbox
) -> None:
    """Every invoice.reissued leads to exactly one resend, one email-info and one event out."""
    start_worker()
    invoices = [new_invoice() for _ in range(3)]
    published = {inv: bus.reissue(inv) for inv in invoices}

    events = bus.wait_for(3)

    by_invoice = {e["data"]["invoiceId"]: e for e in events}
    assert set(by_invoice) == set(invoices)
    for invoice, cause in published.items():
        posts = sandbox.requests(invoice=invoice, endpoint="resend")
        gets = sandbox.requests(invoice=invoice, endpoint="email_info")
        assert len(posts) == 1
        assert len(gets) == 1
        post = posts[0]
        assert post.method == "POST"
        assert post.path == f"/api/v2/billing/invoices/{invoice}/actions/resend-email"
        assert post.body == b""
        assert post.headers["authorization"] == f"Bearer {DEFAULT_API_KEY}"
        assert post.headers["accept"] == "application/json"
        assert gets[0].path == f"/api/v2/billing/invoices/{invoice}/email-info"
        assert gets[0].headers["authorization"] == f"Bearer {DEFAULT_API_KEY}"
        assert gets[0].at >= post.at

        event = by_invoice[invoice]
        assert event["type"] == "invoice.email_queued"
        assert event["specversion"] == "1.0"
        assert event["subject"] == invoice
        data = event["data"]
        assert data["provider"] == "hostup"
        assert data["email"] == "billing@example.com"
        assert data["queuedAt"] == sandbox.emails(invoice)[0]["createdAt"]
        assert data["jobId"] is None
        assert data["emailInfo"]["currentTargets"] == {
            "to": "billing@example.com",
            "ccRecipients": ["finance@example.com"],
        }
        assert len(data["emailInfo"]["emails"]) == 1
        assert "emailInfoError" not in data
        assert data["reissuedEvent"] == {"id": cause["id"], "source": cause["source"]}


def test_outgoing_events_are_persistent_structured_cloudevents(
    start_worker: StartWorker, bus: Bus
) -> None:
    """Events out are persistent, typed application/cloudevents+json, message id = event id."""
    start_worker()
    bus.reissue(new_invoice())
    [event] = bus.wait_for(1)
    [message] = bus.received_messages
    assert message.content_type == "application/cloudevents+json"
    assert message.properties["delivery_mode"] == 2
    assert message.properties["message_id"] == event["id"]
    assert message.delivery_info["routing_key"] == "invoice.email_queued"
    assert json.loads(message.body) == event


def test_plain_application_json_events_are_accepted(start_worker: StartWorker, bus: Bus) -> None:
    """Upstream may send plain application/json (with a charset) instead of CloudEvents JSON."""
    start_worker()
    invoice = new_invoice()
    body = json.dumps(
        {
            "specversion": "1.0",
            "id": "evt_plain",
            "source": "/billing",
            "type": "invoice.reissued",
            "data": {"invoiceId": invoice},
        }
    ).encode()
    bus.publish_raw(body, content_type="application/json; charset=utf-8")
    [event] = bus.wait_for(1)
    assert event["data"]["invoiceId"] == invoice


@pytest.mark.parametrize("pool", ["gevent", "threads"])
def test_a_burst_of_200_events_all_come_out_once(
    start_worker: StartWorker, bus: Bus, sandbox: Sandbox, pool: str
) -> None:
    """200 events published at once: 200 resends, 200 events out, none twice; on the
    Procfile's gevent pool and on threads (a worker started without ``--pool``)."""
    worker = start_worker(concurrency=16, pool=pool)
    invoices = [new_invoice() for _ in range(200)]
    for invoice in invoices:
        bus.reissue(invoice)

    bus.wait_for(200, timeout=120)
    # Stop the worker (warm shutdown finishes running tasks): afterwards nothing
    # more can be published, so what the queue holds is final.
    assert worker.stop() == 0
    events = bus.drain()

    counts = Counter(e["data"]["invoiceId"] for e in events)
    assert set(counts) == set(invoices)
    assert max(counts.values()) == 1
    assert all(e["type"] == "invoice.email_queued" for e in events)
    assert len(sandbox.requests(endpoint="resend")) == 200
    assert len({e["id"] for e in events}) == 200


def test_outgoing_event_id_derives_from_the_incoming_source_and_id(
    start_worker: StartWorker, bus: Bus
) -> None:
    """The same (source, id) gives the same outgoing id; another source, another id."""
    from invoice_mailer.events import outgoing_event_id

    start_worker()
    bus.reissue(new_invoice(), event_id="evt_same", source="/billing/a")
    bus.reissue(new_invoice(), event_id="evt_same", source="/billing/b")
    events = bus.wait_for(2)
    ids = {e["data"]["reissuedEvent"]["source"]: e["id"] for e in events}
    assert ids["/billing/a"] == outgoing_event_id("invoice.email_queued", "/billing/a", "evt_same")
    assert ids["/billing/a"] != ids["/billing/b"]


def test_the_ledger_forgets_the_addresses_once_the_event_is_out(
    start_worker: StartWorker, bus: Bus, ledger_url: str
) -> None:
    """The addresses go out in invoice.email_queued, as the contract asks; the ledger
    keeps what a later decision needs (when the email was queued), not who got it."""
    start_worker()
    invoice = new_invoice()
    cause = bus.reissue(invoice)
    [event] = bus.wait_for(1)
    assert event["data"]["email"] == "billing@example.com"
    ledger = open_ledger(ledger_url)
    try:
        [record] = ledger.find(cause["id"])
    finally:
        ledger.close()
    assert record.outcome_event_id == event["id"]
    assert record.resend is not None
    assert (record.resend.email, record.email_info) == (None, None)
    assert record.resend.queued_at == event["data"]["queuedAt"]
    path = ledger_url.removeprefix("sqlite:///")
    with sqlite3.connect(path) as conn:
        rows = conn.execute("SELECT * FROM invoice_mailer_ledger").fetchall()
    assert "@" not in json.dumps(rows)


def test_a_list_of_broker_urls_fails_over_to_the_node_that_answers(
    start_worker: StartWorker, bus: Bus, broker_url: str
) -> None:
    """``CELERY_BROKER_URL=amqp://a;amqp://b`` (a cluster's nodes): the first is down, the
    worker consumes from and publishes to the second."""
    dead = broker_url.replace(":5672/", ":1/")
    worker = start_worker(CELERY_BROKER_URL=f"{dead};{broker_url}")
    invoice = new_invoice()
    bus.reissue(invoice)
    [event] = bus.wait_for(1, timeout=60)
    assert event["data"]["invoiceId"] == invoice
    # The delay queues are declared on the node the consumer connected to, not on each
    # URL in turn (Celery's step retried the dead one about 17 s: LiveNodeDelayedDelivery).
    log = worker.whole_log()
    assert "native delayed delivery in place" in log
    assert "Failed to setup delayed delivery" not in log
    assert "could not set up delayed delivery" not in log
