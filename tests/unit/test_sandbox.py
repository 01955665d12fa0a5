"""The billing sandbox answers as ../shared/api/ documents, and faults as scripted."""

from __future__ import annotations

import base64
import socket
import time
from collections.abc import Callable, Iterator
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


def _info(sb: Sandbox, invoice: str = "inv_1") -> httpx.Response:
    return httpx.get(f"{sb.hostup_url}/billing/invoices/{invoice}/email-info", headers=AUTH)


@pytest.mark.parametrize("offset", [-30.0, -0.25, 30.0])
def test_the_clock_offset_is_read_by_every_time_the_api_tells(offset: float) -> None:
    """Date header, queuedAt/createdAt and problem timestamps: all in the API's clock."""
    from invoice_mailer.clock import parse_http_date, parse_iso

    with Sandbox(clock_offset=offset) as sb:
        before = time.time()
        answer = _resend(sb)
        after = time.time()
        queued = parse_iso(answer.json()["queuedAt"])
        date = parse_http_date(answer.headers["date"])
        stamp = parse_iso(_resend(sb, "inv_nope!").json()["timestamp"])
    assert queued is not None
    assert date is not None
    assert stamp is not None
    assert before + offset - 0.001 <= queued <= after + offset
    assert before + offset - 1 <= date <= after + offset
    assert before + offset - 0.001 <= stamp


def test_email_info_lags_behind_the_resend_and_the_email_moves_to_sent() -> None:
    with Sandbox(email_info_lag=0.3, send_after=0.6) as sb:
        _resend(sb)
        assert _info(sb).json()["emails"] == []
        shown = _wait_for(lambda: _info(sb).json()["emails"])
        assert shown[0]["status"] == "queued"
        assert shown[0]["sentAt"] is None
        sent = _wait_for(lambda: [e for e in _info(sb).json()["emails"] if e["sentAt"]])
    assert sent[0]["status"] == "sent"
    assert sent[0]["deliveryStatus"] == "delivered"
    assert sent[0]["sentAt"] > sent[0]["createdAt"]


def test_an_answer_can_trickle() -> None:
    """The body arrives a byte at a time, spread over the switch's seconds."""
    with Sandbox(trickle=0.5) as sb, httpx.stream("GET", _info_url(sb), headers=AUTH) as r:
        chunks = list(r.iter_raw())
    assert len(chunks) > 10
    assert b"".join(chunks).startswith(b'{"emails"')


def test_help_documents_the_keys_and_every_switch() -> None:
    """``python -m sandbox --help`` names each credential and each switch of configure."""
    from sandbox.__main__ import parser

    text = parser().format_help()
    for switch in ("clock-offset", "email-info-lag", "send-after", "trickle", "latency"):
        assert f"--{switch}" in text
    for name in ("HOSTUP_API_KEY", "ABILLIFY_USERNAME", "ABILLIFY_PASSWORD", DEFAULT_API_KEY):
        assert name in text


def _info_url(sb: Sandbox) -> str:
    return f"{sb.hostup_url}/billing/invoices/inv_1/email-info"


def _wait_for(probe: Callable[[], list[dict[str, object]]]) -> list[dict[str, object]]:
    """Poll ``probe`` until it returns something (the sandbox moves by its own clock)."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        found = probe()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError("the sandbox never got there")
