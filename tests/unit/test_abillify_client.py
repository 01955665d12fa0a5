"""The Abillify client against respx: Basic auth, Idempotency-Key, its error shape."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator

import httpx
import pytest
import respx

from invoice_mailer.billing import AbillifyClient, HttpConfig, build_http_client
from invoice_mailer.errors import BillingError, RateLimited, Rejected, TransientError

BASE = "https://staging1.abillify.dev/api"
USER, PASSWORD = "acme", "s3cr3t-pa55"
URL = f"{BASE}/invoices/RE-2026.0042/resendInvoice"
INVALID_VALUE = {
    "code": 400,
    "details": [
        {
            "error": "Value for field 'debtor' is of wrong type, expected bigint.",
            "fields": ["debtor"],
            "hint": "Value must be a number or a string containing only a number.",
        }
    ],
    "message": "InvalidValue, see error details",
    "name": "ClientError",
    "type": "ERR_INVALID_VALUE",
}


@pytest.fixture
def client() -> Iterator[AbillifyClient]:
    with build_http_client(HttpConfig(timeout_seconds=2)) as http:
        yield AbillifyClient(http=http, base_url=BASE, username=USER, password=PASSWORD)


@respx.mock
def test_resend_posts_with_basic_auth_idempotency_key_and_json(client: AbillifyClient) -> None:
    """The documented request: Basic auth, Idempotency-Key, JSON content type, empty object."""
    route = respx.post(URL).respond(200, json={"job": "17", "result": "OK", "resultcode": "0"})
    result = client.resend("RE-2026.0042", idempotency_key="key-1")
    request = route.calls.last.request
    expected = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    assert request.headers["authorization"] == f"Basic {expected}"
    assert request.headers["idempotency-key"] == "key-1"
    assert request.headers["content-type"] == "application/json"
    assert json.loads(request.content) == {}
    assert result.job_id == "17"
    assert result.email is None
    assert result.queued_at.endswith("Z")


@respx.mock
def test_the_reference_is_one_percent_encoded_segment(client: AbillifyClient) -> None:
    """A reference can never add path segments."""
    route = respx.post(f"{BASE}/invoices/a%2F..%2Fb/resendInvoice").respond(
        200, json={"job": "1", "result": "OK", "resultcode": "0"}
    )
    client.resend("a/../b", idempotency_key="k")
    assert route.called


@respx.mock
def test_invalid_value_is_rejected_with_its_type_as_code(client: AbillifyClient) -> None:
    """The documented 400 becomes Rejected, code ERR_INVALID_VALUE, with message and hint."""
    respx.post(URL).respond(400, json=INVALID_VALUE)
    with pytest.raises(Rejected) as info:
        client.resend("RE-2026.0042", idempotency_key="k")
    assert (info.value.status, info.value.code) == (400, "ERR_INVALID_VALUE")
    assert info.value.detail.startswith("InvalidValue, see error details: Value for field")


@respx.mock
def test_429_and_5xx_follow_the_same_retry_table(client: AbillifyClient) -> None:
    """Same typed errors as HostUp: the pipeline's retry table applies unchanged."""
    respx.post(URL).mock(
        side_effect=[
            httpx.Response(
                429,
                headers={"Retry-After": "7"},
                json={"code": 429, "type": "ERR_RATE_LIMIT", "message": "slow"},
            ),
            httpx.Response(503, json={"code": 503, "type": "ERR_UNAVAILABLE", "message": "down"}),
        ]
    )
    with pytest.raises(RateLimited) as limited:
        client.resend("RE-2026.0042", idempotency_key="k")
    assert (limited.value.code, limited.value.retry_after) == ("ERR_RATE_LIMIT", 7)
    with pytest.raises(TransientError) as down:
        client.resend("RE-2026.0042", idempotency_key="k")
    assert down.value.code == "ERR_UNAVAILABLE"


@respx.mock
def test_result_not_ok_is_a_rejection(client: AbillifyClient) -> None:
    """A 200 that says the resend did not happen is not a success."""
    respx.post(URL).respond(200, json={"job": "0", "result": "ERROR", "resultcode": "5"})
    with pytest.raises(Rejected) as info:
        client.resend("RE-2026.0042", idempotency_key="k")
    assert info.value.code == "result_5"


@respx.mock
def test_an_unreadable_200_still_counts_as_sent(client: AbillifyClient) -> None:
    """The request was accepted; resending would risk a second email."""
    respx.post(URL).respond(200, text="OK")
    assert client.resend("RE-2026.0042", idempotency_key="k").job_id is None


@respx.mock
def test_non_abillify_error_bodies_fall_back_to_the_status(client: AbillifyClient) -> None:
    """An HTML 502 from a proxy is still a transient error with a readable reason."""
    respx.post(URL).respond(502, text="<html>bad gateway</html>")
    with pytest.raises(TransientError) as info:
        client.resend("RE-2026.0042", idempotency_key="k")
    assert info.value.code == "http_502"


@respx.mock
def test_the_password_never_appears_in_errors_or_repr(client: AbillifyClient) -> None:
    """Neither the password nor the Basic token leaks into what we raise or print."""
    token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    respx.post(URL).respond(
        401, json={"code": 401, "type": "ERR_UNAUTHORIZED", "message": "bad credentials"}
    )
    with pytest.raises(BillingError) as info:
        client.resend("RE-2026.0042", idempotency_key="k")
    for text in (str(info.value), repr(info.value), repr(client)):
        assert PASSWORD not in text
        assert token not in text
