"""An API that echoes the request's credentials in its errors, against a real worker:
the secret, in every form it travels in, reaches no event, dead letter, ledger, log or
Sentry envelope."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, quote_plus

import pytest

from sandbox import (
    DEFAULT_ABILLIFY_PASSWORD,
    DEFAULT_ABILLIFY_USER,
    DEFAULT_API_KEY,
    Fault,
    Sandbox,
)
from tests.integration.conftest import StartWorker
from tests.support.broker import Bus, new_invoice, wait_until
from tests.support.sentry import SentryCollector

QUICK = {
    "HTTP_TIMEOUT_SECONDS": "2",
    "RETRY_SERVER_ERROR_BASE_SECONDS": "1",
    "RETRY_SERVER_ERROR_MAX_SECONDS": "1",
    "RETRY_SERVER_ERROR_MAX_ATTEMPTS": "2",
}
BASIC = base64.b64encode(f"{DEFAULT_ABILLIFY_USER}:{DEFAULT_ABILLIFY_PASSWORD}".encode()).decode()


@pytest.fixture
def sentry() -> Iterator[SentryCollector]:
    with SentryCollector() as collector:
        yield collector


def _forms(*secrets: str) -> set[str]:
    return {f(s) for s in secrets for f in (str, lambda v: quote(v, safe=""), quote_plus)}


def _everything_written(
    bus: Bus, events: list[dict[str, object]], tmp_path: Path, sentry: SentryCollector
) -> str:
    """Events out, dead letters (bodies and headers), the ledger's files, worker logs and
    the Sentry envelopes of the give-ups (one each, sent in the background)."""
    failed = sum(1 for e in events if e["type"] == "invoice.email_failed")
    wait_until(lambda: len(sentry.envelopes) >= failed, timeout=30, what="Sentry envelopes")
    letters = bus.dead_letters()
    parts = [json.dumps(events), sentry.text()]
    parts += [
        letter.body.decode("utf-8", "replace") + json.dumps(letter.headers) for letter in letters
    ]
    parts += [p.read_bytes().decode("latin-1") for p in tmp_path.rglob("ledger.sqlite3*")]
    parts += [p.read_text(errors="replace") for p in tmp_path.glob("*.log")]
    assert letters, "the echoing answers were given up: dead letters expected"
    return "\n".join(parts)


def test_hostup_errors_echoing_the_bearer_key_leak_it_nowhere(
    start_worker: StartWorker,
    bus: Bus,
    sandbox: Sandbox,
    tmp_path: Path,
    sentry: SentryCollector,
) -> None:
    """401 and 500 (until given up) on resend, 500 on email-info, each echoing the
    request's headers: every outcome says what happened, and the key is nowhere."""
    start_worker(concurrency=4, SENTRY_DSN=sentry.dsn, **QUICK)
    rejected, failing, info_failing = new_invoice(), new_invoice(), new_invoice()
    echo = {"echo_headers": True}
    sandbox.script(rejected, "resend", [Fault(status=401, **echo)])
    sandbox.script(failing, "resend", [Fault(status=500, **echo), Fault(status=500, **echo)])
    sandbox.script(info_failing, "email_info", [Fault(status=500, **echo)] * 2)
    for invoice in (rejected, failing, info_failing):
        bus.reissue(invoice)
    events = bus.wait_for(3, timeout=60)
    by_invoice = {e["data"]["invoiceId"]: e for e in events}
    assert by_invoice[rejected]["data"]["reason"]["code"] == "unauthorized"
    assert "[redacted]" in by_invoice[rejected]["data"]["reason"]["detail"]
    assert by_invoice[failing]["data"]["reason"]["status"] == 500
    assert "[redacted]" in by_invoice[info_failing]["data"]["emailInfoError"]
    written = _everything_written(bus, events, tmp_path, sentry)
    assert "Authorization" in written  # the echo really travelled this far, masked
    assert "unauthorized" in sentry.text()
    leaked = [form for form in _forms(DEFAULT_API_KEY) if form in written]
    assert leaked == []


def test_abillify_errors_echoing_basic_credentials_leak_them_nowhere(
    start_worker: StartWorker,
    bus: Bus,
    sandbox: Sandbox,
    tmp_path: Path,
    abillify: dict[str, str],
    sentry: SentryCollector,
) -> None:
    """401 and 500 (until given up) echoing the Basic header: neither the password nor
    its base64 token, raw or URL-encoded, is anywhere."""
    start_worker(concurrency=4, SENTRY_DSN=sentry.dsn, **QUICK, **abillify)
    rejected, failing = (f"RE-{uuid.uuid4().hex[:10]}" for _ in range(2))
    sandbox.script(rejected, "resend", [Fault(status=401, echo_headers=True)])
    sandbox.script(failing, "resend", [Fault(status=500, echo_headers=True)] * 2)
    for reference in (rejected, failing):
        bus.reissue(reference, field="invoiceReference")
    events = bus.wait_for(2, timeout=60)
    assert {e["type"] for e in events} == {"invoice.email_failed"}
    assert all("[redacted]" in e["data"]["reason"]["detail"] for e in events)
    written = _everything_written(bus, events, tmp_path, sentry)
    assert "ERR_UNAUTHORIZED" in sentry.text()
    leaked = [form for form in _forms(DEFAULT_ABILLIFY_PASSWORD, BASIC) if form in written]
    assert leaked == []
