"""Each kind of dead letter is shown as the event it stands for."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from broker import describe
from invoice_mailer.publishing import DeadLetter

EVENT = json.dumps(
    {
        "specversion": "1.0",
        "id": "evt_1",
        "source": "/billing",
        "type": "invoice.reissued",
        "data": {"invoiceId": "inv_1"},
    }
).encode()


def test_the_services_own_dead_letter_carries_its_reason_in_headers() -> None:
    """Reason code, detail, attempts and time come from x-invoice-mailer-* headers."""
    letter = DeadLetter(
        body=EVENT,
        content_type="application/cloudevents+json",
        code="not_found",
        detail="no such invoice",
        attempts=1,
    )
    entry = describe(EVENT, "application/cloudevents+json", "utf-8", letter.headers())
    assert (entry.event_id, entry.invoice, entry.code, entry.detail, entry.attempts) == (
        "evt_1",
        "inv_1",
        "not_found",
        "no such invoice",
        1,
    )
    assert entry.origin == "service"
    assert entry.failed_at is not None
    assert abs((datetime.now(UTC) - entry.failed_at).total_seconds()) < 5
    assert entry.body == EVENT


def test_a_raw_event_dead_lettered_by_rabbitmq_shows_x_death() -> None:
    """Delivery limit on the raw queue: reason and count from x-death, body unchanged."""
    when = datetime(2026, 11, 21, 10, 0, tzinfo=UTC)
    headers = {
        "x-death": [
            {
                "reason": "delivery_limit",
                "queue": "invoice-mailer.reissued",
                "count": 1,
                "time": when,
            }
        ]
    }
    entry = describe(EVENT, "application/cloudevents+json", "utf-8", headers)
    assert (entry.code, entry.origin, entry.failed_at, entry.body) == (
        "delivery_limit",
        "broker:reissued",
        when,
        EVENT,
    )
    assert "invoice-mailer.reissued" in entry.detail


def test_a_dead_lettered_task_message_is_unwrapped_to_the_original_event() -> None:
    """A Celery task message from the task queue: its job's body is what gets replayed."""
    job = {
        "event": {"id": "evt_1", "source": "/billing", "invoice": "inv_1"},
        "body": EVENT.decode(),
        "content_type": "application/json",
    }
    task_body = json.dumps([[], {"job": job}, {"callbacks": None}]).encode()
    headers = {
        "task": "invoice_mailer.resend_invoice_email",
        "id": "t1",
        "x-death": [{"reason": "rejected", "queue": "invoice-mailer.tasks", "count": 1}],
    }
    entry = describe(task_body, "application/json", "utf-8", headers)
    assert entry.body == EVENT
    assert entry.content_type == "application/json"
    assert (entry.event_id, entry.code, entry.origin) == ("evt_1", "rejected", "broker:tasks")


def test_garbage_is_described_not_raised() -> None:
    """Whatever sits in the queue, listing it never fails."""
    entry = describe(b"\xff\x00", None, None, {"x-death": "nonsense"})
    assert (entry.event_id, entry.invoice, entry.code) == (None, None, "unknown")
