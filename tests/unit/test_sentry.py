"""Sentry: a give-up is one grouped event, retries are silent, nothing secret or personal is sent.

The real pipeline runs in-process against the sandbox (a real HTTP server) and a
SQLite ledger; Sentry is initialised exactly as the worker does, with a capturing
transport instead of the network.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import sentry_sdk
from sentry_sdk.envelope import Envelope
from sentry_sdk.transport import Transport

from invoice_mailer.billing import HttpConfig, build_http_client, build_provider
from invoice_mailer.events import Reissued
from invoice_mailer.ledger import open_ledger
from invoice_mailer.observe import LoggingObserver, Observers
from invoice_mailer.pipeline import Done, GaveUp, Job, Pipeline, RetryLater
from invoice_mailer.publishing import InMemoryPublisher
from sandbox import DEFAULT_API_KEY, Fault, Sandbox
from settings import load
from tasks._sentry import SentryObserver, init_sentry

API_KEY = "hk_live_9f8e7d6c5b4a"


class CapturingTransport(Transport):
    def __init__(self) -> None:
        super().__init__()
        self.envelopes: list[Envelope] = []

    def capture_envelope(self, envelope: Envelope) -> None:
        self.envelopes.append(envelope)

    def events(self) -> list[dict[str, Any]]:
        return [
            item.payload.json
            for envelope in self.envelopes
            for item in envelope.items
            if item.type == "event" and item.payload.json is not None
        ]

    def raw(self) -> str:
        return "".join(e.serialize().decode("utf-8", "replace") for e in self.envelopes)


@pytest.fixture
def transport(monkeypatch: pytest.MonkeyPatch) -> Iterator[CapturingTransport]:
    monkeypatch.setenv("HOSTUP_API_KEY", API_KEY)
    monkeypatch.setenv("SENTRY_DSN", "https://publickey@sentry.invalid/1")
    transport = CapturingTransport()
    init_sentry(load(), transport=transport)
    yield transport
    sentry_sdk.get_client().close()


@pytest.fixture
def run(tmp_path: Path) -> Iterator[Any]:
    with (
        Sandbox(api_key=API_KEY) as sandbox,
        build_http_client(HttpConfig(timeout_seconds=2)) as http,
    ):
        ledger = open_ledger(f"sqlite:///{tmp_path}/ledger.sqlite3")
        pipeline = Pipeline(
            provider=build_provider(
                "hostup", http=http, base_url=sandbox.hostup_url, api_key=API_KEY
            ),
            publisher=InMemoryPublisher(),
            ledger=ledger,
            policy=load(hostup_api_key=API_KEY).retry_policy(),
            lease_seconds=30,
            observer=Observers([LoggingObserver(), SentryObserver()]),
        )

        def run_event(invoice: str, faults: list[Fault]) -> Any:
            sandbox.script(invoice, "resend", faults)
            job = Job.new(
                Reissued(event_id=f"evt_{invoice}", source="/billing", invoice=invoice),
                body="{}",
                content_type=None,
            )
            outcome = pipeline.run(job)
            while isinstance(outcome, RetryLater):
                outcome = pipeline.run(outcome.job)
            return outcome

        yield run_event
        ledger.close()


def test_a_permanent_failure_is_captured_once_grouped_by_provider_and_code(
    transport: CapturingTransport, run: Any
) -> None:
    """A 404 give-up: one warning event, fingerprinted hostup/not_found."""
    assert isinstance(run("inv_gone1", [Fault(status=404)]), GaveUp)
    sentry_sdk.flush()
    [event] = transport.events()
    assert event["level"] == "warning"
    assert event["fingerprint"] == ["invoice-mailer", "give-up", "hostup", "not_found"]
    assert event["tags"]["code"] == "not_found"
    assert event["tags"]["step"] == "resend"


def test_rejected_credentials_are_an_error_for_an_operator(
    transport: CapturingTransport, run: Any
) -> None:
    """401 and 403 are reported as errors that say what to fix."""
    run("inv_nokey1", [Fault(status=401)])
    run("inv_noscope1", [Fault(status=403)])
    sentry_sdk.flush()
    events = transport.events()
    assert [e["level"] for e in events] == ["error", "error"]
    assert {e["tags"]["operator_action"] for e in events} == {"fix billing API credentials"}
    assert [e["fingerprint"][-1] for e in events] == ["unauthorized", "forbidden"]


def test_a_retried_then_successful_event_captures_nothing(
    transport: CapturingTransport, run: Any
) -> None:
    """503, 429, then 200: retries are expected, not incidents."""
    outcome = run("inv_flaky1", [Fault(status=503), Fault(status=429, retry_after="1")])
    assert isinstance(outcome, Done)
    sentry_sdk.flush()
    assert transport.events() == []


def test_no_payload_carries_keys_authorization_or_addresses(
    transport: CapturingTransport, run: Any
) -> None:
    """Even an API error echoing an address, an exception naming the key, and a log line
    with both reach Sentry with all of them masked."""
    run(
        "inv_echo1",
        [
            Fault(
                status=400,
                body=json.dumps(
                    {
                        "code": "invalid_request",
                        "detail": "recipient owner@customer.example is blocked",
                    }
                ),
                content_type="application/problem+json",
            )
        ],
    )
    run("inv_echo2", [Fault(status=401, echo_headers=True)])  # the Bearer key echoed back
    logging.getLogger("invoice_mailer.test").error(
        "calling with Authorization: Bearer %s for jane.doe@customer.example", API_KEY
    )
    try:
        raise RuntimeError(f"boom with {API_KEY} and billing@example.com")
    except RuntimeError:
        sentry_sdk.capture_exception()
    sentry_sdk.flush()
    assert len(transport.events()) >= 2
    raw = transport.raw()
    for secret in (
        API_KEY,
        quote(API_KEY, safe=""),
        DEFAULT_API_KEY,
        "owner@customer.example",
        "jane.doe@customer.example",
        "billing@example.com",
        "Bearer hk_",
    ):
        assert secret not in raw
    assert "[redacted]" in raw


def test_abillify_basic_credentials_reach_sentry_in_no_form(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The one Redactor scrubs Sentry's payloads: an echoed Basic header (base64, raw,
    URL-encoded) in a log line and an exception reaches no envelope."""
    import base64

    user, password = "acme-ops", "s3cret-Pa55word"
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    for name, value in {
        "BILLING_PROVIDER": "abillify",
        "ABILLIFY_USERNAME": user,
        "ABILLIFY_PASSWORD": password,
        "SENTRY_DSN": "https://publickey@sentry.invalid/1",
    }.items():
        monkeypatch.setenv(name, value)
    transport = CapturingTransport()
    init_sentry(load(), transport=transport)
    try:
        logging.getLogger("invoice_mailer.test").error(
            "upstream said: request headers {'Authorization': 'Basic %s'} as sent: %s",
            token,
            quote(f"Basic {token}", safe=""),
        )
        try:
            raise RuntimeError(f"echo of {user}:{password} and {quote(password, safe='')}")
        except RuntimeError:
            sentry_sdk.capture_exception()
        sentry_sdk.flush()
    finally:
        sentry_sdk.get_client().close()
    raw = transport.raw()
    assert len(transport.events()) == 2
    for form in (password, token, token.rstrip("="), quote(token, safe=""), quote(password)):
        assert form not in raw
    assert "[redacted]" in raw
