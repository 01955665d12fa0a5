"""The billing sandbox answers as ../shared/api/ documents, and faults as scripted."""

from __future__ import annotations

import base64
import socket
from collections.abc import Iterator
from contextlib import ExitStack

import httpx
import pytest

from sandbox import DEFAULT_API_KEY, Fault, Sandbox

AUTH = {"Authorization": f"Bearer {DEFAULT_API_KEY}", "Accept": "application/json"}


@pytest.fixture
def sandbox() -> Iterator[Sandbox]:
    with Sandbox() as sb:
        yield sb


def _resend(sb: Sandbox, invoice: str = "inv_1", **kwargs: object) -> httpx.Response:
    url = f"{sb.hostup_url}/billing/invoices/{invoice}/actions/resend-email"
    return httpx.post(url, **{"headers": AUTH, **kwargs})  # type: ignore[arg-type]


def test_resend_then_email_info_shows_the_queued_email(sandbox: Sandbox) -> None:
    """A resend is recorded and visible through email-info, in the documented shape."""
    queued = _resend(sandbox).json()
    assert set(queued) == {"queuedAt", "email"}
    info = httpx.get(f"{sandbox.hostup_url}/billing/invoices/inv_1/email-info", headers=AUTH)
    body = info.json()
    assert set(body) == {"emails", "currentTargets"}
    assert body["emails"][0]["createdAt"] == queued["queuedAt"]
    assert set(body["emails"][0]) == {
        "to",
        "ccRecipients",
        "status",
        "deliveryStatus",
        "sentAt",
        "createdAt",
    }


def test_wrong_key_is_a_401_problem_document(sandbox: Sandbox) -> None:
    """Authentication failures are RFC 7807 documents with code unauthorized."""
    response = _resend(sandbox, headers={"Authorization": "Bearer nope"})
    assert response.status_code == 401
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["code"] == "unauthorized"


def test_missing_scope_is_a_403(sandbox: Sandbox) -> None:
    """A key without write:billing cannot resend."""
    sandbox.configure(scopes={"read:billing"})
    assert _resend(sandbox).json()["code"] == "forbidden"


def test_a_request_body_is_refused(sandbox: Sandbox) -> None:
    """resend-email's body must be empty: 400 invalid_request with field errors."""
    response = _resend(sandbox, json={"email": "someone@example.com"})
    assert response.status_code == 400
    assert response.json()["errors"][0]["code"] == "invalid_request"
    assert sandbox.emails("inv_1") == []


def test_unknown_invoice_is_a_404(sandbox: Sandbox) -> None:
    """A missing invoice answers not_found from both endpoints."""
    sandbox.mark_missing("inv_gone")
    assert _resend(sandbox, "inv_gone").json()["code"] == "not_found"


def test_resend_limit_answers_the_documented_429(sandbox: Sandbox) -> None:
    """Past the resend limit: 429 rate_limited with recovery.retryAfterSeconds 86400."""
    sandbox.configure(resend_limit=1)
    assert _resend(sandbox).status_code == 200
    response = _resend(sandbox)
    assert response.status_code == 429
    assert response.json()["recovery"] == {"action": "retry_after", "retryAfterSeconds": 86400}


def test_scripted_faults_come_in_order_then_normal_service(sandbox: Sandbox) -> None:
    """A script of 503 (Retry-After) then 429 is played once, then the endpoint works."""
    sandbox.script(
        "inv_1", "resend", [Fault(status=503, retry_after="4"), Fault(status=429, retry_after="2")]
    )
    first, second, third = (_resend(sandbox) for _ in range(3))
    assert (first.status_code, first.headers["retry-after"]) == (503, "4")
    assert (second.status_code, second.headers["retry-after"]) == (429, "2")
    assert third.status_code == 200
    assert len(sandbox.emails("inv_1")) == 1


def test_a_dropped_connection_can_still_have_queued_the_email(sandbox: Sandbox) -> None:
    """drop + then_succeed: the email goes out but the answer never arrives."""
    sandbox.script("inv_1", "resend", [Fault(status=None, drop=True, then_succeed=True)])
    with pytest.raises(httpx.RemoteProtocolError):
        _resend(sandbox)
    assert len(sandbox.emails("inv_1")) == 1


def test_abillify_needs_basic_auth_and_honours_idempotency_keys(sandbox: Sandbox) -> None:
    """Same Idempotency-Key, same answer, one email; wrong credentials, 401."""
    url = f"{sandbox.abillify_url}/invoices/RE-1/resendInvoice"
    token = base64.b64encode(b"sandbox:sandbox-password").decode()
    headers = {"Authorization": f"Basic {token}", "Idempotency-Key": "k1"}
    first = httpx.post(url, headers=headers, json={})
    again = httpx.post(url, headers=headers, json={})
    assert first.json() == again.json()
    assert first.json()["result"] == "OK"
    assert len(sandbox.emails("RE-1")) == 1
    refused = httpx.post(url, headers={"Authorization": "Basic eDp5"}, json={})
    assert refused.status_code == 401
    assert refused.json()["type"] == "ERR_UNAUTHORIZED"


def test_control_endpoints_script_and_read_from_another_process(sandbox: Sandbox) -> None:
    """/_sandbox/ lets the benchmark or a shell script drive a sandbox it did not start."""
    httpx.post(
        f"{sandbox.url}/_sandbox/script",
        json={"invoice": "inv_1", "endpoint": "resend", "faults": [{"status": 500}]},
    )
    assert _resend(sandbox).status_code == 500
    recorded = httpx.get(f"{sandbox.url}/_sandbox/requests").json()
    assert [r["endpoint"] for r in recorded] == ["resend"]


def test_a_burst_of_new_connections_is_not_dropped() -> None:
    """Many clients connecting at once all get in, as behind a real API's front door.

    socketserver's default listen backlog is 5: the kernel then drops further
    connections until accept() catches up and the client retries seconds later,
    after its timeout. A request that reaches the sandbox after the client gave up
    makes an "uncertain" resend that email-info cannot see yet: a second email.
    """
    sandbox = Sandbox()  # not started: nothing accepts, the backlog alone holds them
    host, port = sandbox.url.removeprefix("http://").split(":")
    try:
        with ExitStack() as stack:
            for _ in range(200):
                stack.enter_context(socket.create_connection((host, int(port)), timeout=1))
    finally:
        sandbox.stop()
