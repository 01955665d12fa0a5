"""Each kind of dead letter is shown as the event it stands for."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import click
import pytest

from broker import Selection, by_reason, describe
from cli._deadletters import parse_age
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


def test_a_quorum_queues_delivery_count_is_the_attempts_not_x_deaths_count() -> None:
    """Dead-lettered after 20 deliveries: x-death says it died once, x-delivery-count how
    often it was delivered."""
    headers = {
        "x-death": [{"reason": "delivery_limit", "queue": "invoice-mailer.reissued", "count": 1}],
        "x-delivery-count": 20,
    }
    assert describe(EVENT, None, None, headers).attempts == 20


def test_a_body_that_is_no_event_is_named_by_its_message_id() -> None:
    entry = describe(b"\xff not json", None, None, {}, message_id="msg-7")
    assert (entry.event_id, entry.invoice) == ("msg-7", None)
    assert describe(EVENT, None, None, {}, message_id="msg-7").event_id == "evt_1"


NOW = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)


def _entry(code: str, *, age: float | None, invoice: str = "inv_1", event_id: str = "e") -> Any:
    letter = describe(EVENT, None, None, {"x-invoice-mailer-reason-code": code})
    failed_at = None if age is None else NOW - timedelta(seconds=age)
    return replace(letter, invoice=invoice, event_id=event_id, failed_at=failed_at)


@pytest.mark.parametrize(
    ("selection", "entry", "selected"),
    [
        (Selection(), _entry("not_found", age=None), True),
        (Selection(reasons=frozenset({"not_found"})), _entry("not_found", age=1), True),
        (Selection(reasons=frozenset({"not_found"})), _entry("invalid", age=1), False),
        (Selection(invoices=frozenset({"inv_2"})), _entry("x", age=1, invoice="inv_2"), True),
        (Selection(invoices=frozenset({"inv_2"})), _entry("x", age=1), False),
        (Selection(ids=frozenset({"a", "b"})), _entry("x", age=1, event_id="b"), True),
        (Selection(older_than=3600), _entry("x", age=7200), True),
        (Selection(older_than=3600), _entry("x", age=60), False),
        (Selection(older_than=3600), _entry("x", age=None), False),  # age unknown
        (Selection(newer_than=3600), _entry("x", age=60), True),
        (Selection(newer_than=3600), _entry("x", age=7200), False),
        (
            Selection(reasons=frozenset({"x"}), older_than=60, newer_than=600),
            _entry("x", age=120),
            True,
        ),
    ],
)
def test_a_selection_holds_when_every_criterion_given_does(
    selection: Selection, entry: Any, selected: bool
) -> None:
    assert selection(entry, NOW) is selected


def test_dead_letters_group_by_reason_biggest_first() -> None:
    entries = [
        _entry("invalid", age=10),
        _entry("not_found", age=300),
        _entry("not_found", age=30),
        _entry("not_found", age=None),
    ]
    groups = by_reason(entries)
    assert [(g.code, g.count) for g in groups] == [("not_found", 3), ("invalid", 1)]
    assert groups[0].oldest == NOW - timedelta(seconds=300)
    assert groups[0].newest == NOW - timedelta(seconds=30)


def test_two_dead_letters_of_one_event_are_the_same_event() -> None:
    first, second = _entry("a", age=1), _entry("b", age=2)
    assert first.identity() == second.identity()
    garbage = describe(b"\xff", None, None, {})
    assert garbage.identity() == describe(b"\xff", None, None, {}).identity()
    assert garbage.identity() != describe(b"\xfe", None, None, {}).identity()


@pytest.mark.parametrize(
    ("text", "seconds"), [("90", 90), ("90s", 90), ("30m", 1800), ("2h", 7200), ("1.5d", 129600)]
)
def test_ages_read_as_operators_write_them(text: str, seconds: float) -> None:
    assert parse_age(text) == seconds


def test_a_bad_age_is_a_usage_error() -> None:
    with pytest.raises(click.BadParameter):
        parse_age("soon")
