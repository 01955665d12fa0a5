"""Parsing invoice.reissued from raw bytes, and the ids of what we publish."""

from __future__ import annotations

import json
from typing import Any

import pytest

from invoice_mailer.errors import InvalidEvent
from invoice_mailer.events import (
    MAX_EVENT_BYTES,
    cloud_event,
    glimpse,
    outgoing_event_id,
    parse_reissued,
)


def _body(**changes: Any) -> bytes:
    event: dict[str, Any] = {
        "specversion": "1.0",
        "id": "evt_01jd5w3k8q9r7s6t5v4w3x2y1z",
        "source": "/billing",
        "type": "invoice.reissued",
        "time": "2026-11-21T10:00:00Z",
        "datacontenttype": "application/json",
        "data": {"invoiceId": "inv_01hxa3b4c5d6e7f8g9h0j1k2m3"},
    }
    event.update(changes)
    return json.dumps(event).encode()


def _code(body: bytes, content_type: str | None = None, provider: str = "hostup") -> str:
    with pytest.raises(InvalidEvent) as info:
        parse_reissued(body, content_type, provider=provider)
    return info.value.code


def test_the_contract_example_parses() -> None:
    """The event in CONTRACT.md yields its id, source and invoice id."""
    event = parse_reissued(_body(), "application/cloudevents+json", provider="hostup")
    assert event.event_id == "evt_01jd5w3k8q9r7s6t5v4w3x2y1z"
    assert event.source == "/billing"
    assert event.invoice == "inv_01hxa3b4c5d6e7f8g9h0j1k2m3"
    assert event.key == ("/billing", "evt_01jd5w3k8q9r7s6t5v4w3x2y1z")


@pytest.mark.parametrize(
    "content_type",
    [None, "application/json", "application/json; charset=utf-8", "Application/CloudEvents+JSON"],
)
def test_json_content_types_and_none_are_accepted(content_type: str | None) -> None:
    """Plain JSON, parameters, any case, or no content type at all: all are read."""
    assert parse_reissued(_body(), content_type, provider="hostup").invoice.startswith("inv_")


@pytest.mark.parametrize(
    "content_type", ["application/x-python-serialize", "text/plain", "application/data"]
)
def test_other_content_types_are_refused(content_type: str) -> None:
    """A declared non-JSON type is never decoded (no pickle, ever)."""
    assert _code(_body(), content_type) == "unsupported_content_type"


def test_time_is_optional() -> None:
    """CloudEvents makes `time` optional; so do we."""
    body = json.loads(_body())
    del body["time"]
    assert parse_reissued(json.dumps(body).encode(), None, provider="hostup").event_id


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"", "not_json"),
        (b"{", "not_json"),
        (b"\xff\xfe", "not_utf8"),
        (b"[" * 5000 + b"]" * 5000, "not_json"),
        (b"x" * (MAX_EVENT_BYTES + 1), "too_large"),
        (b'"a string"', "invalid_cloudevent"),
        (_body(specversion="0.3"), "invalid_cloudevent"),
        (_body(specversion=1.0), "invalid_cloudevent"),
        (_body(type="invoice.paid"), "invalid_cloudevent"),
        (_body(id=""), "invalid_cloudevent"),
        (_body(id=7), "invalid_cloudevent"),
        (_body(id="x" * 257), "invalid_cloudevent"),
        (_body(source=None), "invalid_cloudevent"),
        (_body(time="yesterday"), "invalid_cloudevent"),
        (_body(data="inv_1"), "invalid_cloudevent"),
        (_body(data={}), "invalid_invoice_id"),
        (_body(data={"invoiceId": None}), "invalid_invoice_id"),
    ],
)
def test_malformed_events_are_invalid_with_a_stable_code(body: bytes, code: str) -> None:
    """Each way an event can be unusable has its own code."""
    assert _code(body) == code


@pytest.mark.parametrize(
    "invoice",
    [
        "inv_a/b",
        "..",
        "inv_..",
        "inv_a%2Fb",
        "inv_a b",
        "inv_ä",
        "inv_a\n",
        "inv_",
        "INV_abc",
        "abc",
        "inv_a?x=1",
        "inv_a#b",
        "inv_" + "a" * 65,
        123,
        ["inv_a"],
    ],
)
def test_invoice_ids_that_are_not_safe_path_segments_are_refused(invoice: object) -> None:
    """Only `inv_` then letters and digits can ever reach a URL path."""
    assert _code(_body(data={"invoiceId": invoice})) == "invalid_invoice_id"


def test_abillify_reads_invoice_reference_instead() -> None:
    """With provider abillify the reference field is the one that counts."""
    body = _body(data={"invoiceReference": "RE-2026.0042"})
    assert parse_reissued(body, None, provider="abillify").invoice == "RE-2026.0042"
    assert _code(_body(), provider="abillify") == "invalid_invoice_id"


@pytest.mark.parametrize("reference", ["..", ".", "a/b", "a b", "-x", "é", "a" * 129])
def test_abillify_references_must_be_one_safe_path_segment(reference: str) -> None:
    """No dot-segments, separators, spaces or non-ASCII in a reference."""
    assert _code(_body(data={"invoiceReference": reference}), provider="abillify") == (
        "invalid_invoice_id"
    )


def test_error_detail_never_echoes_the_input() -> None:
    """A rejected event's detail names the field, not its (possibly huge) value."""
    secret_looking = "inv_" + "z" * 200
    with pytest.raises(InvalidEvent) as info:
        parse_reissued(_body(data={"invoiceId": secret_looking}), None, provider="hostup")
    assert secret_looking not in info.value.detail
    assert "invoiceId" in info.value.detail


def test_outgoing_ids_are_deterministic_per_type_source_and_id() -> None:
    """Re-publication after a crash carries the same id; anything else differs."""
    a = outgoing_event_id("invoice.email_queued", "/billing", "evt_1")
    assert a == outgoing_event_id("invoice.email_queued", "/billing", "evt_1")
    assert a != outgoing_event_id("invoice.email_failed", "/billing", "evt_1")
    assert a != outgoing_event_id("invoice.email_queued", "/billing2", "evt_1")
    assert a != outgoing_event_id("invoice.email_queued", "/billing", "evt_2")


def test_cloud_event_is_structured_mode() -> None:
    """Outgoing events carry the CloudEvents 1.0 attributes and our source."""
    event = cloud_event(
        "invoice.email_queued", cause_key=("/billing", "evt_1"), subject="inv_1", data={"a": 1}
    )
    assert event["specversion"] == "1.0"
    assert event["source"] == "/invoice-mailer"
    assert event["subject"] == "inv_1"
    assert event["datacontenttype"] == "application/json"
    assert event["time"].endswith("Z")
    assert event["data"] == {"a": 1}


@pytest.mark.parametrize(
    ("body", "seen"),
    [
        (_body(), ("/billing", "evt_01jd5w3k8q9r7s6t5v4w3x2y1z", "inv_01hxa3b4c5d6e7f8g9h0j1k2m3")),
        (
            _body(data={"invoiceReference": "RE-1"}),
            ("/billing", "evt_01jd5w3k8q9r7s6t5v4w3x2y1z", "RE-1"),
        ),
        (_body(id=7, source="s" * 2000), (None, None, "inv_01hxa3b4c5d6e7f8g9h0j1k2m3")),
        (b"\xff", (None, None, None)),
        (b"[]", (None, None, None)),
    ],
)
def test_glimpse_reads_what_it_can_and_never_raises(body: bytes, seen: tuple[object, ...]) -> None:
    """Reports about bad events name their ids when they are short strings, else None."""
    g = glimpse(body)
    assert (g.source, g.event_id, g.invoice) == seen


def test_distinct_triples_never_share_an_outgoing_id() -> None:
    """0.2 joined the parts with newlines, so these two met; the new scheme keeps them apart,
    and the old one is kept only for events the ledger recorded under it."""
    a = ("invoice.email_queued", "/a\nx", "E")
    b = ("invoice.email_queued", "/a", "x\nE")
    assert outgoing_event_id(*a) != outgoing_event_id(*b)
    assert outgoing_event_id(*a, scheme=1) == outgoing_event_id(*b, scheme=1)


@pytest.mark.parametrize(
    "changes",
    [
        {"id": "evt\n1"},
        {"id": "evt\t1"},
        {"id": "evt\x001"},
        {"id": "evt\x1b[31m"},
        {"id": "evt\x85"},
        {"id": ""},
        {"source": ""},
        {"source": "/a\nx"},
        {"source": "/billing events"},
        {"source": "/bad%zzescape"},
        {"source": "http://[::1/"},
        {"source": "/caf\u00e9"},
        {"specversion": "1.1"},
        {"specversion": 1.0},
    ],
)
def test_cloudevents_attribute_rules_are_enforced_at_the_edge(changes: dict[str, Any]) -> None:
    """id and source non-empty without control characters, source a URI-reference
    (RFC 3986), specversion "1.0": anything else is invalid_cloudevent."""
    assert _code(_body(**changes)) == "invalid_cloudevent"


@pytest.mark.parametrize(
    "source", ["/billing", "https://billing.example.com/events?x=1#f", "urn:billing:eu", "b%20c"]
)
def test_uri_references_are_accepted_as_sources(source: str) -> None:
    assert parse_reissued(_body(source=source), None, provider="hostup").source == source
