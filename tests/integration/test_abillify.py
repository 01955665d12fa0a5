"""The Abillify provider end to end: real worker, real RabbitMQ, the sandbox's Abillify API."""

from __future__ import annotations

import base64
import uuid
from typing import Any

import pytest

from sandbox import Fault, Sandbox
from tests.integration.conftest import StartWorker
from tests.support.broker import Bus


@pytest.fixture
def abillify(abillify: dict[str, str]) -> dict[str, Any]:
    return {**abillify, "RETRY_SERVER_ERROR_BASE_SECONDS": "1"}


def _reference() -> str:
    return f"RE-{uuid.uuid4().hex[:10]}.2026"


def _reissue(bus: Bus, reference: str) -> dict[str, Any]:
    return bus.reissue(reference, field="invoiceReference")


def test_happy_path_posts_with_basic_auth_and_publishes_the_job(
    start_worker: StartWorker, bus: Bus, sandbox: Sandbox, abillify: dict[str, Any]
) -> None:
    """One POST to resendInvoice (Basic auth, Idempotency-Key), no email-info, one event."""
    start_worker(**abillify)
    reference = _reference()
    cause = _reissue(bus, reference)

    [event] = bus.wait_for(1)

    [post] = sandbox.requests(invoice=reference)
    assert post.path == f"/abillify/api/invoices/{reference}/resendInvoice"
    token = base64.b64encode(b"sandbox:sandbox-password").decode()
    assert post.headers["authorization"] == f"Basic {token}"
    assert post.headers["content-type"] == "application/json"
    assert len(post.headers["idempotency-key"]) == 36
    assert event["type"] == "invoice.email_queued"
    data = event["data"]
    assert data["provider"] == "abillify"
    assert data["invoiceId"] == reference
    assert data["jobId"] == sandbox.emails(reference)[0]["jobId"]
    assert (data["email"], data["emailInfo"]) == (None, None)
    assert "emailInfoError" not in data
    assert data["reissuedEvent"] == {"id": cause["id"], "source": cause["source"]}


def test_a_429_waits_then_succeeds_with_the_same_key(
    start_worker: StartWorker, bus: Bus, sandbox: Sandbox, abillify: dict[str, Any]
) -> None:
    """429 Retry-After: 2, then 200: two POSTs at least 2 s apart, one key, one email."""
    start_worker(**abillify)
    reference = _reference()
    sandbox.script(reference, "resend", [Fault(status=429, retry_after="2")])
    _reissue(bus, reference)

    [event] = bus.wait_for(1)

    posts = sandbox.requests(invoice=reference)
    assert len(posts) == 2
    assert posts[1].at - posts[0].at >= 2.0
    assert posts[0].headers["idempotency-key"] == posts[1].headers["idempotency-key"]
    assert event["type"] == "invoice.email_queued"
    assert len(sandbox.emails(reference)) == 1


def test_server_errors_then_success(
    start_worker: StartWorker, bus: Bus, sandbox: Sandbox, abillify: dict[str, Any]
) -> None:
    """503, 500, then 200: three POSTs, one event with the job id."""
    start_worker(**abillify)
    reference = _reference()
    sandbox.script(reference, "resend", [Fault(status=503), Fault(status=500)])
    _reissue(bus, reference)

    [event] = bus.wait_for(1)

    assert len(sandbox.requests(invoice=reference)) == 3
    assert event["data"]["jobId"] is not None


def test_invalid_value_fails_with_abillifys_type(
    start_worker: StartWorker, bus: Bus, sandbox: Sandbox, abillify: dict[str, Any]
) -> None:
    """400 ERR_INVALID_VALUE: one POST, invoice.email_failed with that code, a dead letter."""
    start_worker(**abillify)
    reference = _reference()
    sandbox.script(reference, "resend", [Fault(status=400, code="ERR_INVALID_VALUE")])
    _reissue(bus, reference)

    [event] = bus.wait_for(1)

    assert len(sandbox.requests(invoice=reference)) == 1
    assert event["type"] == "invoice.email_failed"
    reason = event["data"]["reason"]
    assert (reason["step"], reason["status"], reason["code"]) == (
        "resend",
        400,
        "ERR_INVALID_VALUE",
    )
    assert "expected bigint" in reason["detail"]
    [letter] = bus.dead_letters()
    assert letter.headers["x-invoice-mailer-reason-code"] == "ERR_INVALID_VALUE"


def test_an_event_without_invoice_reference_is_dead_lettered(
    start_worker: StartWorker, bus: Bus, sandbox: Sandbox, abillify: dict[str, Any]
) -> None:
    """With abillify the reference field is required; a HostUp-style event is invalid."""
    start_worker(**abillify)
    bus.reissue("inv_abc123")  # data.invoiceId, not data.invoiceReference

    [event] = bus.wait_for(1)

    assert event["data"]["reason"]["code"] == "invalid_invoice_id"
    assert sandbox.requests() == []
