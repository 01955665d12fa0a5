"""The HostUp client against respx: requests as documented, responses as typed results."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest
import respx

from invoice_mailer.billing import HostUpClient, HttpConfig, build_http_client
from invoice_mailer.errors import BillingError, RateLimited, Rejected, TransientError

BASE = "https://cloud.hostup.se/api/v2"
KEY = "hk_live_s3cr3t"
INVOICE = "inv_01hxa3b4c5d6e7f8g9h0j1k2m3"
RESEND = f"{BASE}/billing/invoices/{INVOICE}/actions/resend-email"
EMAIL_INFO = f"{BASE}/billing/invoices/{INVOICE}/email-info"
EMAIL_INFO_BODY = {
    "emails": [
        {
            "to": "owner@example.com",
            "ccRecipients": ["finance@example.com"],
            "status": "sent",
            "deliveryStatus": "delivered",
            "sentAt": "2026-04-18T10:00:00.000Z",
            "createdAt": "2026-04-18T09:59:00.000Z",
        }
    ],
    "currentTargets": {"to": "billing@example.com", "ccRecipients": ["finance@example.com"]},
}


@pytest.fixture
def client() -> Iterator[HostUpClient]:
    with build_http_client(HttpConfig(timeout_seconds=2)) as http:
        yield HostUpClient(http=http, base_url=BASE, api_key=KEY)


def _problem(status: int, code: str, **extra: object) -> httpx.Response:
    doc = {
        "type": f"https://developer.hostup.se/errors/{code}",
        "status": status,
        "code": code,
        "detail": f"{code} happened",
        **extra,
    }
    return httpx.Response(status, json=doc, headers={"Content-Type": "application/problem+json"})


@respx.mock
def test_resend_posts_an_empty_body_with_bearer_auth_and_idempotency_key(
    client: HostUpClient,
) -> None:
    """The documented request: POST, empty body, Bearer key, Accept JSON."""
    route = respx.post(RESEND).respond(
        200, json={"queuedAt": "2026-04-27T12:34:56.000Z", "email": "billing@example.com"}
    )
    result = client.resend(INVOICE, idempotency_key="key-1")
    request = route.calls.last.request
    assert request.content == b""
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert request.headers["accept"] == "application/json"
    assert request.headers["idempotency-key"] == "key-1"
    assert "content-type" not in request.headers
    assert result.email == "billing@example.com"
    assert result.queued_at == "2026-04-27T12:34:56.000Z"
    assert result.job_id is None


@respx.mock
def test_email_info_returns_emails_and_current_targets(client: HostUpClient) -> None:
    """GET email-info with the same auth; the body comes back as documented."""
    route = respx.get(EMAIL_INFO).respond(200, json=EMAIL_INFO_BODY)
    assert client.email_info(INVOICE) == EMAIL_INFO_BODY
    assert route.calls.last.request.headers["authorization"] == f"Bearer {KEY}"


@respx.mock
def test_the_invoice_id_is_percent_encoded_as_one_segment() -> None:
    """Even an id that slipped past validation cannot add path segments."""
    with build_http_client(HttpConfig()) as http:
        client = HostUpClient(http=http, base_url=BASE + "/", api_key=KEY)
        route = respx.post(f"{BASE}/billing/invoices/a%2F..%2Fb/actions/resend-email").respond(
            200, json={"queuedAt": "t", "email": "e"}
        )
        client.resend("a/../b", idempotency_key="k")
    assert route.called


@respx.mock
@pytest.mark.parametrize(
    ("status", "code"),
    [(400, "invalid_request"), (401, "unauthorized"), (403, "forbidden"), (404, "not_found")],
)
def test_client_errors_are_rejections_carrying_the_problem_code(
    client: HostUpClient, status: int, code: str
) -> None:
    """4xx problem documents become Rejected with status, code and detail."""
    respx.post(RESEND).mock(return_value=_problem(status, code))
    with pytest.raises(Rejected) as info:
        client.resend(INVOICE, idempotency_key="k")
    assert (info.value.status, info.value.code) == (status, code)
    assert info.value.detail == f"{code} happened"


@respx.mock
def test_resend_limit_is_rate_limited_for_a_day(client: HostUpClient) -> None:
    """The documented resend-limit 429 asks for 86400 seconds in its body."""
    respx.post(RESEND).mock(
        return_value=_problem(
            429, "rate_limited", recovery={"action": "retry_after", "retryAfterSeconds": 86400}
        )
    )
    with pytest.raises(RateLimited) as info:
        client.resend(INVOICE, idempotency_key="k")
    assert info.value.retry_after == 86400
    assert info.value.code == "rate_limited"


@respx.mock
def test_rate_limit_headers_give_the_wait(client: HostUpClient) -> None:
    """Other 429s carry Retry-After seconds plus X-RateLimit-* headers."""
    response = _problem(429, "rate_limit_exceeded")
    response.headers.update({"Retry-After": "3", "X-RateLimit-Remaining": "0"})
    respx.get(EMAIL_INFO).mock(return_value=response)
    with pytest.raises(RateLimited) as info:
        client.email_info(INVOICE)
    assert info.value.retry_after == 3


@respx.mock
@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_server_errors_are_transient(client: HostUpClient, status: int) -> None:
    """5xx is worth retrying."""
    respx.post(RESEND).mock(return_value=_problem(status, "internal_error"))
    with pytest.raises(TransientError) as info:
        client.resend(INVOICE, idempotency_key="k")
    assert info.value.status == status


@respx.mock
def test_html_error_page_is_still_classified_by_status(client: HostUpClient) -> None:
    """A proxy's HTML 502 is transient, with a readable reason."""
    respx.post(RESEND).respond(502, text="<html>Bad Gateway</html>")
    with pytest.raises(TransientError) as info:
        client.resend(INVOICE, idempotency_key="k")
    assert info.value.code == "http_502"
    assert "HTML" in info.value.detail


@respx.mock
def test_read_timeout_is_transient_and_maybe_sent(client: HostUpClient) -> None:
    """A read timeout means the POST may have reached the server."""
    respx.post(RESEND).mock(side_effect=httpx.ReadTimeout("slow"))
    with pytest.raises(TransientError) as info:
        client.resend(INVOICE, idempotency_key="k")
    assert (info.value.status, info.value.code, info.value.request_sent) == (None, "timeout", True)


@respx.mock
def test_connect_error_is_transient_and_not_sent(client: HostUpClient) -> None:
    """A refused connection never carried the request."""
    respx.post(RESEND).mock(side_effect=httpx.ConnectError("refused"))
    with pytest.raises(TransientError) as info:
        client.resend(INVOICE, idempotency_key="k")
    assert (info.value.code, info.value.request_sent) == ("connection_error", False)


@respx.mock
def test_dropped_connection_is_transient_and_maybe_sent(client: HostUpClient) -> None:
    """The server hung up mid-response: the effect is unknown."""
    respx.post(RESEND).mock(side_effect=httpx.RemoteProtocolError("dropped"))
    with pytest.raises(TransientError) as info:
        client.resend(INVOICE, idempotency_key="k")
    assert (info.value.code, info.value.request_sent) == ("connection_error", True)


@respx.mock
def test_unreadable_2xx_resend_still_counts_as_queued(client: HostUpClient) -> None:
    """A 200 means the email was queued; retrying would send it twice."""
    respx.post(RESEND).respond(200, text="OK")
    result = client.resend(INVOICE, idempotency_key="k")
    assert result.email is None
    assert result.queued_at.endswith("Z")


@respx.mock
@pytest.mark.parametrize("body", ["[]", "{}", '{"emails": "none"}', "<html/>"])
def test_email_info_with_wrong_shape_is_rejected(client: HostUpClient, body: str) -> None:
    """A 200 email-info without an emails array is not something to publish."""
    respx.get(EMAIL_INFO).respond(200, text=body)
    with pytest.raises(Rejected) as info:
        client.email_info(INVOICE)
    assert info.value.code == "invalid_response"


@respx.mock
def test_redirects_are_not_followed(client: HostUpClient) -> None:
    """A redirect would carry the API key to an unreviewed host: it is an error."""
    respx.post(RESEND).respond(302, headers={"Location": "https://elsewhere.example/"})
    with pytest.raises(Rejected) as info:
        client.resend(INVOICE, idempotency_key="k")
    assert info.value.status == 302


@respx.mock
def test_the_api_key_never_appears_in_errors_or_repr(client: HostUpClient) -> None:
    """Errors are built from responses only; the key stays out of every message."""
    respx.post(RESEND).mock(side_effect=httpx.ReadTimeout(f"timeout with Bearer {KEY}"))
    respx.get(EMAIL_INFO).respond(401, json={"code": "unauthorized", "detail": "no"})
    errors: list[BillingError] = []
    for call in (
        lambda: client.resend(INVOICE, idempotency_key="k"),
        lambda: client.email_info(INVOICE),
    ):
        with pytest.raises(BillingError) as info:
            call()
        errors.append(info.value)
    for error in errors:
        assert KEY not in str(error)
        assert KEY not in repr(error)
        assert error.__cause__ is None or KEY not in str(error.__cause__)
    assert KEY not in repr(client)
    assert json.dumps(vars(errors[0]), default=str).count(KEY) == 0
