"""Turning a billing API's error response into a typed error, without I/O.

HostUp answers errors with RFC 7807 problem documents; the ``code`` field is the
stable one to branch on. Waits the server asks for come from three places
(``Retry-After`` in seconds or as an HTTP date, the body's
``recovery.retryAfterSeconds``, ``X-RateLimit-Reset``); the largest wins, since
waiting less than any of them only earns another 429.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import Any

from invoice_mailer.errors import BillingError, RateLimited, Rejected, TransientError

__all__ = ["Problem", "error_for", "parse_problem", "requested_wait"]

# An X-RateLimit-Reset above this is a Unix time, below it a number of seconds.
_EPOCH_THRESHOLD = 1_000_000_000
# Kept whole up to this: the length is bounded after secrets are masked
# (``untrusted.Redactor.text``), so that a cut never leaves half a secret behind.
_MAX_DETAIL = 10_000


@dataclass(frozen=True, slots=True)
class Problem:
    """The parts of an error body that decide what happens next."""

    code: str
    detail: str
    retry_after_seconds: float | None = None
    timestamp: str | None = None
    """When the API made the answer, by its clock (HostUp's ``timestamp``)."""


def parse_problem(status: int, body: bytes) -> Problem:
    """Read a HostUp problem document; degrade to ``http_<status>`` if it is not one.

    A body that is HTML, empty or lacks ``code`` still yields a usable Problem, so
    the retry table applies by status alone.
    """
    doc = _json_object(body)
    code = doc.get("code") if doc else None
    detail = doc.get("detail") if doc else None
    if not isinstance(code, str) or not code:
        code = f"http_{status}"
    if not isinstance(detail, str):
        detail = _describe_body(body) if doc is None else (doc.get("title") or "no detail given")
    recovery = doc.get("recovery") if doc else None
    retry_after = None
    if isinstance(recovery, Mapping):
        retry_after = _non_negative(recovery.get("retryAfterSeconds"))
    stamp = doc.get("timestamp") if doc else None
    return Problem(
        code=code,
        detail=str(detail)[:_MAX_DETAIL],
        retry_after_seconds=retry_after,
        timestamp=stamp if isinstance(stamp, str) else None,
    )


def requested_wait(headers: Mapping[str, str], problem: Problem, now: datetime) -> float | None:
    """The longest wait the server asked for, in seconds, or None if it asked none."""
    candidates = [
        _retry_after_header(headers.get("retry-after"), now),
        _rate_limit_reset(headers.get("x-ratelimit-reset"), now),
        problem.retry_after_seconds,
    ]
    waits = [c for c in candidates if c is not None]
    return max(waits) if waits else None


def error_for(status: int, problem: Problem, retry_after: float | None) -> BillingError:
    """The error for a non-2xx status: the retry table of CONTRACT.md, by status."""
    if status == 429:
        return RateLimited(
            status=status, code=problem.code, detail=problem.detail, retry_after=retry_after
        )
    if status >= 500:
        # The server answered: we take its word that nothing happened.
        return TransientError(
            status=status,
            code=problem.code,
            detail=problem.detail,
            retry_after=retry_after,
            request_sent=False,
        )
    return Rejected(status=status, code=problem.code, detail=problem.detail)


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return None
    return doc if isinstance(doc, dict) else None


def _describe_body(body: bytes) -> str:
    if not body.strip():
        return "empty response body"
    text = body[:_MAX_DETAIL].decode("utf-8", "replace").strip()
    if text.lstrip().startswith("<"):
        return "non-JSON (HTML) response body"
    return f"non-JSON response body: {text[:80]!r}"


def _non_negative(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if not math.isfinite(value) or value < 0:
        return None
    return float(value)


def _retry_after_header(value: str | None, now: datetime) -> float | None:
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, (when - now).total_seconds())


def _rate_limit_reset(value: str | None, now: datetime) -> float | None:
    if value is None:
        return None
    try:
        number = float(value.strip())
    except ValueError:
        return None
    if not math.isfinite(number) or number < 0:
        return None
    if number >= _EPOCH_THRESHOLD:
        return max(0.0, number - now.timestamp())
    return number
