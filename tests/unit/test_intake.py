"""Property: whatever body arrives, nothing unsafe reaches the API, and every rejected
body is dead-lettered once with a reason code and told once as invoice.email_failed."""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from invoice_mailer.billing import HostUpClient
from invoice_mailer.errors import InvalidEvent
from invoice_mailer.events import parse_reissued
from invoice_mailer.intake import reject
from invoice_mailer.publishing import InMemoryPublisher

SAFE_PATH = re.compile(
    r"^/api/v2/billing/invoices/inv_[A-Za-z0-9]+/(actions/resend-email|email-info)$"
)
REASON_CODES = {
    "unsupported_content_type",
    "too_large",
    "not_utf8",
    "not_json",
    "invalid_cloudevent",
    "invalid_invoice_id",
}

# Strings an attacker or a careless producer would try in ids, sources and invoice ids.
_nasty = st.sampled_from(
    [
        "inv_1",
        "inv_../../admin",
        "inv_1/../../x",
        "inv_%2e%2e",
        "inv_1%2Fx",
        "inv_1?x=1",
        "inv_1#f",
        "inv_\u0131",  # dotless i: letters, but not ASCII ones
        "inv_\uff11",  # a full-width digit
        "inv_1\n",
        "inv_",
        "../inv_1",
        "/billing",
        "/a\nx",
        "http://h/p",
        "",
        " ",
        "\x00",
        "\x1b[2J",
    ]
)
_text = st.one_of(_nasty, st.text(max_size=40))
_scalar = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), _text)
_json = st.recursive(
    _scalar,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)


@st.composite
def _event_like(draw: st.DrawFn) -> bytes:
    """A valid CloudEvent with up to two attributes swapped for something else, or dropped,
    and an invoice id that may be anything: about half are accepted."""
    event: dict[str, Any] = {
        "specversion": "1.0",
        "id": draw(st.from_regex(r"\Aevt_[a-z0-9]{1,12}\Z")),
        "source": draw(st.sampled_from(["/billing", "https://billing.example/x", "urn:b:c"])),
        "type": "invoice.reissued",
        "data": {
            "invoiceId": draw(st.one_of(st.from_regex(r"\Ainv_[A-Za-z0-9]{1,20}\Z"), _nasty, _json))
        },
    }
    for name in draw(st.sets(st.sampled_from(sorted(event)), max_size=2)):
        if draw(st.booleans()):
            del event[name]
        else:
            event[name] = draw(st.one_of(_text, _json))
    return json.dumps(event).encode()


_bodies = st.one_of(
    _event_like(), st.binary(max_size=64), _json.map(lambda v: json.dumps(v).encode())
)
_content_types = st.sampled_from(
    [
        None,
        "application/cloudevents+json",
        "application/cloudevents+json",
        "application/json",
        "text/plain",
    ]
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=_bodies, content_type=_content_types)
def test_nothing_unsafe_reaches_the_api_and_every_rejection_is_told_once(
    body: bytes, content_type: str | None
) -> None:
    paths: list[str] = []

    def api(request: httpx.Request) -> httpx.Response:
        paths.append(request.url.raw_path.decode("ascii"))
        if request.method == "POST":
            return httpx.Response(200, json={"queuedAt": "2026-12-02T00:00:00.000Z", "email": "x"})
        return httpx.Response(200, json={"emails": [], "currentTargets": None})

    try:
        event = parse_reissued(body, content_type, provider="hostup")
    except InvalidEvent as invalid:
        publisher = InMemoryPublisher()
        reject(
            publisher,
            body,
            invalid,
            provider="hostup",
            content_type=content_type,
            content_encoding=None,
        )
        [letter] = publisher.dead_letters
        [(routing_key, told)] = publisher.events
        assert letter.body == body
        assert letter.code in REASON_CODES
        assert routing_key == "invoice.email_failed"
        assert told["data"]["reason"]["code"] == letter.code
        return
    with httpx.Client(transport=httpx.MockTransport(api)) as http:
        client = HostUpClient(http=http, base_url="https://api.test/api/v2", api_key="k" * 8)
        client.resend(event.invoice, idempotency_key="key")
        client.email_info(event.invoice)
    assert len(paths) == 2
    assert all(SAFE_PATH.match(path) for path in paths), paths
