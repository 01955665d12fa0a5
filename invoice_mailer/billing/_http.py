"""The one place where httpx's exceptions and responses become our errors."""

from __future__ import annotations

import itertools
import math
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import httpx

from invoice_mailer.errors import TransientError
from invoice_mailer.problem import Problem, error_for, parse_problem, requested_wait
from invoice_mailer.untrusted import Redactor

__all__ = ["HttpConfig", "ShardedTransport", "build_http_client", "send"]

ProblemParser = Callable[[int, bytes], Problem]


@dataclass(frozen=True, slots=True, kw_only=True)
class HttpConfig:
    """How one worker process talks HTTP: one pool, explicit limits."""

    timeout_seconds: float = 10.0
    max_connections: int = 100
    shard_size: int = 8
    """Connections per pool shard (see ``ShardedTransport``)."""
    user_agent: str = "invoice-mailer/0.1"


def build_http_client(
    config: HttpConfig, *, transport: httpx.BaseTransport | None = None
) -> httpx.Client:
    """One client per worker process; ``transport`` is the test seam."""
    size = min(config.shard_size, config.max_connections)
    return _CookielessClient(
        timeout=httpx.Timeout(config.timeout_seconds),
        headers={"User-Agent": config.user_agent},
        follow_redirects=False,  # a redirect would carry credentials somewhere unreviewed
        transport=transport
        or ShardedTransport(
            shards=math.ceil(config.max_connections / size),
            limits=httpx.Limits(max_connections=size, max_keepalive_connections=size),
        ),
    )


class _NoCookies(httpx.Cookies):
    """Always empty: what an answer sets is dropped."""

    def extract_cookies(self, response: httpx.Response) -> None:
        pass


class _CookielessClient(httpx.Client):
    """An ``httpx.Client`` without a cookie jar.

    The billing APIs authenticate every request by its headers and keep no
    session: a cookie one answer sets (a load balancer's, say) must not ride along
    on the next request, for another invoice. httpx has no switch for that, and
    parsing every answer for cookies was 8% of the CPU of an HTTP call
    (py-spy under ``python -m bench``).
    """

    @property
    def cookies(self) -> httpx.Cookies:
        return _NO_COOKIES

    @cookies.setter
    def cookies(self, cookies: Any) -> None:
        pass  # httpx.Client.__init__ sets its jar here: there is none to set


_NO_COOKIES = _NoCookies()


class ShardedTransport(httpx.BaseTransport):
    """The client's connections split into small pools, each thread keeping to one.

    httpcore 1.0 rescans every connection of a pool, quadratically, under the
    pool's lock, twice per request (encode/httpcore#1035, open). With 32 threads
    on one pool of 32 connections that was a quarter of the CPU of an HTTP call
    (``python -m bench``); with shards of 8 the scan is short and the lock
    rarely contended. Limits apply per shard.
    """

    def __init__(self, *, shards: int, limits: httpx.Limits) -> None:
        self._shards = [httpx.HTTPTransport(limits=limits) for _ in range(max(1, shards))]
        self._next = itertools.count()
        self._local = threading.local()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        shard: httpx.HTTPTransport | None = getattr(self._local, "shard", None)
        if shard is None:
            # Round robin over threads as they first call: pool threads live long.
            shard = self._local.shard = self._shards[next(self._next) % len(self._shards)]
        return shard.handle_request(request)

    def close(self) -> None:
        for shard in self._shards:
            shard.close()


def send(
    http: httpx.Client,
    method: str,
    url: str,
    *,
    headers: Mapping[str, str],
    redactor: Redactor,
    json_body: Any = None,
    parse_problem_body: ProblemParser = parse_problem,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> httpx.Response:
    """Send one request; return a 2xx response or raise a BillingError.

    The error never carries the request, so a credential in its headers cannot
    leak through it; and what the API says is untrusted: ``redactor`` masks the
    credentials in the body before it is parsed (an API may echo the request), and
    cleans the problem's code and detail after (``invoice_mailer.untrusted``).
    """
    try:
        response = http.request(method, url, headers=headers, json=json_body)
    except httpx.TimeoutException as exc:
        raise TransientError(
            status=None,
            code="timeout",
            detail=f"{type(exc).__name__} after {_timeout_of(http)}s",
            request_sent=not isinstance(exc, httpx.ConnectTimeout | httpx.PoolTimeout),
        ) from None
    except httpx.TransportError as exc:
        raise TransientError(
            status=None,
            code="connection_error",
            detail=type(exc).__name__,
            request_sent=not isinstance(exc, httpx.ConnectError),
        ) from None
    if response.is_success:
        return response
    body = redactor.secrets(response.content.decode("utf-8", "replace")).encode()
    problem = parse_problem_body(response.status_code, body)
    problem = replace(
        problem,
        code=redactor.text(problem.code, limit=100),
        detail=redactor.text(problem.detail),
    )
    wait = requested_wait(response.headers, problem, now())
    raise error_for(response.status_code, problem, wait)


def _timeout_of(http: httpx.Client) -> float | None:
    return http.timeout.read
