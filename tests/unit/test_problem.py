"""Error responses become typed errors; waits come from every hint the server gives."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest

from invoice_mailer.errors import RateLimited, Rejected, TransientError
from invoice_mailer.problem import Problem, error_for, parse_problem, requested_wait

NOW = datetime(2026, 11, 21, 12, 0, 0, tzinfo=UTC)

# shared/api/hostup-resend-email.md, 429 example.
RESEND_LIMIT = {
    "type": "https://developer.hostup.se/errors/rate_limited",
    "title": "Too many requests",
    "status": 429,
    "detail": "Maximum resend limit reached. Try again later.",
    "code": "rate_limited",
    "instance": "/api/v2/billing/invoices/inv_01hxa3b4c5d6e7f8g9h0j1k2m3/actions/resend-email",
    "recovery": {"action": "retry_after", "retryAfterSeconds": 86400},
}
# shared/api/hostup-email-info.md, 404 example.
NOT_FOUND = {
    "type": "https://developer.hostup.se/errors/not_found",
    "title": "Not found",
    "status": 404,
    "detail": "The requested resource could not be found.",
    "code": "not_found",
    "instance": "/api/v2/resource",
    "requestId": "req_01hxa3b4c5d6e7f8g9h0j1k2m3",
    "timestamp": "2026-04-27T12:34:56.000Z",
}


def test_documented_problem_document_yields_code_and_detail() -> None:
    """The `code` is what we keep to branch on; `detail` is for people."""
    problem = parse_problem(404, json.dumps(NOT_FOUND).encode())
    assert problem == Problem(
        code="not_found",
        detail="The requested resource could not be found.",
        timestamp="2026-04-27T12:34:56.000Z",  # the API's clock (invoice_mailer.clock)
    )


def test_resend_limit_body_carries_its_recovery_wait() -> None:
    """`recovery.retryAfterSeconds` is read from the body."""
    problem = parse_problem(429, json.dumps(RESEND_LIMIT).encode())
    assert problem.code == "rate_limited"
    assert problem.retry_after_seconds == 86400


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        (b"<html><body>502 Bad Gateway</body></html>", "non-JSON (HTML) response body"),
        (b"", "empty response body"),
        (b"   ", "empty response body"),
        (b"oops", "non-JSON response body: 'oops'"),
    ],
)
def test_bodies_that_are_not_problem_documents_fall_back_to_the_status(
    body: bytes, detail: str
) -> None:
    """HTML, empty or plain-text error bodies still give a usable code: http_<status>."""
    problem = parse_problem(502, body)
    assert problem.code == "http_502"
    assert problem.detail == detail


def test_problem_without_code_uses_the_status_and_keeps_the_detail() -> None:
    """A problem document missing `code` is still classified by status."""
    problem = parse_problem(400, json.dumps({"title": "Bad", "detail": "no good"}).encode())
    assert problem == Problem(code="http_400", detail="no good")


@pytest.mark.parametrize("wait", [-1, "86400", None, True, float("nan")])
def test_nonsense_recovery_waits_are_ignored(wait: object) -> None:
    """Only a non-negative number counts as a wait."""
    body = json.dumps({"code": "rate_limited", "recovery": {"retryAfterSeconds": wait}})
    assert parse_problem(429, body.encode()).retry_after_seconds is None


def test_retry_after_in_seconds() -> None:
    """`Retry-After: 3` means three seconds."""
    assert requested_wait({"retry-after": "3"}, Problem("c", "d"), NOW) == 3.0


def test_retry_after_as_http_date() -> None:
    """`Retry-After` may be an HTTP date: the wait is the time until then."""
    when = format_datetime(NOW + timedelta(seconds=120), usegmt=True)
    assert requested_wait({"retry-after": when}, Problem("c", "d"), NOW) == 120.0


def test_retry_after_in_the_past_means_no_wait() -> None:
    """A date already passed asks for zero seconds, never a negative wait."""
    when = format_datetime(NOW - timedelta(seconds=120), usegmt=True)
    assert requested_wait({"retry-after": when}, Problem("c", "d"), NOW) == 0.0


def test_rate_limit_reset_as_unix_time_and_as_seconds() -> None:
    """`X-RateLimit-Reset` as an epoch time or as a number of seconds."""
    epoch = str(int(NOW.timestamp()) + 30)
    assert requested_wait({"x-ratelimit-reset": epoch}, Problem("c", "d"), NOW) == 30.0
    assert requested_wait({"x-ratelimit-reset": "45"}, Problem("c", "d"), NOW) == 45.0


def test_the_longest_requested_wait_wins() -> None:
    """Header, reset and body disagree: waiting the longest avoids another 429."""
    problem = Problem("rate_limited", "d", retry_after_seconds=86400)
    headers = {"retry-after": "10", "x-ratelimit-reset": "60"}
    assert requested_wait(headers, problem, NOW) == 86400


def test_no_hint_means_no_requested_wait() -> None:
    """Unparsable or absent hints give None, not zero."""
    headers = {"retry-after": "soon", "x-ratelimit-reset": "later"}
    assert requested_wait(headers, Problem("c", "d"), NOW) is None


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (429, RateLimited),
        (500, TransientError),
        (502, TransientError),
        (503, TransientError),
        (504, TransientError),
        (400, Rejected),
        (401, Rejected),
        (403, Rejected),
        (404, Rejected),
        (409, Rejected),
        (422, Rejected),
        (301, Rejected),
    ],
)
def test_status_decides_the_error_type(status: int, kind: type) -> None:
    """The retry table: 429 rate limited, 5xx transient, anything else rejected."""
    error = error_for(status, Problem("some_code", "some detail"), None)
    assert type(error) is kind
    assert (error.status, error.code, error.detail) == (status, "some_code", "some detail")


def test_a_503_keeps_its_retry_after() -> None:
    """A Retry-After on a 503 travels with the error, to be honoured."""
    error = error_for(503, Problem("unavailable", "d"), 7.0)
    assert isinstance(error, TransientError)
    assert error.retry_after == 7.0
