"""Bad input at the door: never sent to the API, dead-lettered with a reason, worker goes on."""

from __future__ import annotations

import json
import uuid
from collections import Counter

import pytest

from sandbox import Sandbox
from tests.integration.conftest import StartWorker
from tests.support.broker import Bus, reissued_event

CE = "application/cloudevents+json"
DEEP = ("[" * 20_000 + "]" * 20_000).encode()  # under the size limit, over any parser depth


def _event_with(**changes: object) -> bytes:
    event = reissued_event("inv_ok1")
    event.update(changes)
    return json.dumps(event).encode()


def _with_invoice(invoice: object) -> bytes:
    return json.dumps(reissued_event(invoice)).encode()  # type: ignore[arg-type]


BAD_EVENTS = [
    pytest.param(b"not json at all", "application/cloudevents+json", "not_json", id="not-json"),
    pytest.param(b"\xff\xfe\x00garbage", "application/cloudevents+json", "not_utf8", id="non-utf8"),
    pytest.param(DEEP, "application/cloudevents+json", "not_json", id="deeply-nested"),
    pytest.param(b"x" * 70_000, "application/json", "too_large", id="huge"),
    pytest.param(b"[1, 2]", "application/json", "invalid_cloudevent", id="not-an-object"),
    pytest.param(_event_with(specversion="0.3"), CE, "invalid_cloudevent", id="specversion"),
    pytest.param(_event_with(type="invoice.paid"), CE, "invalid_cloudevent", id="wrong-type"),
    pytest.param(_event_with(id=None), CE, "invalid_cloudevent", id="no-id"),
    pytest.param(_event_with(id=42), CE, "invalid_cloudevent", id="id-not-a-string"),
    pytest.param(_event_with(data={}), CE, "invalid_invoice_id", id="no-invoice-id"),
    pytest.param(_with_invoice("inv_a/b"), CE, "invalid_invoice_id", id="slash"),
    pytest.param(_with_invoice(".."), CE, "invalid_invoice_id", id="dot-dot"),
    pytest.param(_with_invoice("inv_a%2Fb"), CE, "invalid_invoice_id", id="percent-2f"),
    pytest.param(_with_invoice("inv_a b"), CE, "invalid_invoice_id", id="space"),
    pytest.param(_with_invoice("inv_ä"), CE, "invalid_invoice_id", id="unicode"),
    pytest.param(_with_invoice(12345), CE, "invalid_invoice_id", id="number"),
    pytest.param(
        b"\x80\x03}q\x00.",
        "application/x-python-serialize",
        "unsupported_content_type",
        id="pickle",
    ),
]


def test_every_bad_event_is_dead_lettered_with_its_reason_and_the_next_one_flows(
    start_worker: StartWorker, bus: Bus, sandbox: Sandbox
) -> None:
    """Each bad event: no API call, one dead letter (body unchanged), one email_failed."""
    start_worker()
    bad = [p.values for p in BAD_EVENTS]
    for body, content_type, _ in bad:
        bus.publish_raw(body, content_type=content_type)
    good = f"inv_{uuid.uuid4().hex[:12]}"
    bus.reissue(good)

    events = bus.wait_for(len(bad) + 1, timeout=60)

    queued = [e for e in events if e["type"] == "invoice.email_queued"]
    assert [e["data"]["invoiceId"] for e in queued] == [good]
    assert [r.invoice for r in sandbox.requests()] == [good, good]  # its POST and its GET

    failed = [e for e in events if e["type"] == "invoice.email_failed"]
    assert Counter(e["data"]["reason"]["code"] for e in failed) == Counter(c for *_, c in bad)
    assert all(e["data"]["reason"]["step"] == "validate" for e in failed)
    assert all(e["data"]["invoiceId"] is None for e in failed)

    letters = bus.dead_letters()
    assert sorted(letter.body for letter in letters) == sorted(body for body, *_ in bad)
    by_body = {letter.body: letter for letter in letters}
    for body, content_type, code in bad:
        assert by_body[body].content_type == content_type
        headers = by_body[body].headers
        assert headers["x-invoice-mailer-reason-code"] == code
        assert headers["x-invoice-mailer-reason"].startswith(f"{code}: ")
        assert headers["x-invoice-mailer-attempts"] == 0


def test_an_event_without_content_type_is_parsed_from_its_bytes(
    start_worker: StartWorker, bus: Bus
) -> None:
    """No content-type property at all: the body is still read as JSON, not dropped."""
    start_worker()
    invoice = f"inv_{uuid.uuid4().hex[:12]}"
    bus.publish_raw(json.dumps(reissued_event(invoice)).encode(), content_type=None)
    [event] = bus.wait_for(1)
    assert event["type"] == "invoice.email_queued"
    assert event["data"]["invoiceId"] == invoice


def test_an_event_with_readable_ids_names_them_in_email_failed(
    start_worker: StartWorker, bus: Bus
) -> None:
    """When source and id can be read, email_failed points back at the bad event."""
    start_worker()
    bus.publish_raw(_event_with(id="evt_bad", source="/billing", data={"invoiceId": "x/y"}))
    [event] = bus.wait_for(1)
    assert event["data"]["reissuedEvent"] == {"id": "evt_bad", "source": "/billing"}
    assert event["data"]["reason"]["code"] == "invalid_invoice_id"
