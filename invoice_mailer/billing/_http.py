"""The one place where httpx's exceptions and responses become our errors."""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import httpcore
import httpx

from invoice_mailer.clock import MILLISECOND, ApiClock, parse_http_date, parse_iso
from invoice_mailer.errors import TransientError
from invoice_mailer.pacing import RateBudget
from invoice_mailer.patching import original
from invoice_mailer.problem import Problem, error_for, parse_problem, requested_wait
from invoice_mailer.untrusted import Redactor

__all__ = [
    "MAX_ANSWER_BYTES",
    "HttpConfig",
    "ShardedTransport",
    "build_http_client",
    "deadline",
    "send",
]

MAX_ANSWER_BYTES = 1024 * 1024
"""An answer is read up to this and cut off there: no billing answer is anywhere near."""

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

    The shards share one TLS context: ``httpx.HTTPTransport`` builds its own by
    default, loading certifi's bundle each time, 17 ms and about 1 MB apiece; for
    13 shards that was 230 ms of a worker's start, paid by its first event.
    """

    def __init__(self, *, shards: int, limits: httpx.Limits) -> None:
        tls = httpx.create_ssl_context()
        self._shards = [
            _with_deadlines(httpx.HTTPTransport(limits=limits, verify=tls))
            for _ in range(max(1, shards))
        ]
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


# -- a deadline per request ---------------------------------------------------------------
#
# httpx's timeouts bound each socket operation, not the request: an API that trickles
# its answer a byte at a time holds the thread for as long as it likes
# (encode/httpx#1450, open). httpcore reads each timeout once per phase (headers, body),
# not per receive, so no timeout value can bound it. What can: its network backend,
# the documented seam under the connection pool, whose every read and write takes a
# timeout. Ours clamps each to what is left of the calling thread's deadline, and
# refuses once none is left. httpx builds the pool itself and offers no parameter for
# the backend, so it is swapped in on the pool (``_with_deadlines``); the test
# ``test_a_trickling_answer_ends_at_the_deadline`` notices if that stops working.

_deadlines = threading.local()


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Everything this thread sends or receives within the block ends by then."""
    previous = getattr(_deadlines, "at", None)
    _deadlines.at = time.monotonic() + seconds
    try:
        yield
    finally:
        _deadlines.at = previous


def _left(timeout: float | None, error: type[Exception]) -> float | None:
    at: float | None = getattr(_deadlines, "at", None)
    if at is None:
        return timeout
    left = at - time.monotonic()
    if left <= 0:
        raise error("the request's deadline has passed")
    return left if timeout is None else min(timeout, left)


_ABORTIVE = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() resets, sends nothing more


class _DeadlineStream(httpcore.NetworkStream):
    """A stream whose every read and write ends by the thread's deadline, and whose
    close after a failed read or write is abortive.

    A request given up on (a timeout, a dropped link) must not reach the API later:
    a plain close leaves the unacknowledged bytes to the kernel, which retransmits
    them, then its FIN, for minutes. On a host whose link is down for 20 s, a POST
    its worker gave up on could then arrive after the link came back, after another
    host had taken the event over, looked for that resend in email-info, found none
    and sent its own. With SO_LINGER 0 the kernel drops what it has not delivered:
    the API got the request before the client gave up, or never. Closes of healthy
    connections stay graceful (``test_http_transport.py`` tells the two apart by
    what the server reads: a reset or an end of stream).
    """

    def __init__(self, stream: httpcore.NetworkStream) -> None:
        self._stream = stream
        self._failed = False

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        try:
            return self._stream.read(max_bytes, _left(timeout, httpcore.ReadTimeout))
        except BaseException:
            self._failed = True
            raise

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        try:
            self._stream.write(buffer, _left(timeout, httpcore.WriteTimeout))
        except BaseException:
            self._failed = True
            raise

    def close(self) -> None:
        if self._failed:
            sock = self._stream.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _ABORTIVE)
        self._stream.close()

    def start_tls(
        self,
        ssl_context: Any,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        left = _left(timeout, httpcore.ConnectTimeout)
        return _DeadlineStream(self._stream.start_tls(ssl_context, server_hostname, left))

    def get_extra_info(self, info: str) -> Any:
        if info == "is_readable":
            return _is_readable(self._stream.get_extra_info("socket"))
        return self._stream.get_extra_info(info)


def _is_readable(sock: socket.socket | None) -> bool:
    """httpcore's ``is_socket_readable``, with the process's own ``poll``.

    httpcore asks it of every pooled connection on every request, to drop the ones
    the server closed (``httpcore._utils.is_socket_readable``: ``select.poll()``,
    looked up at each call). Under gevent's patching that poll is gevent's, which
    builds watchers and goes through the hub even for a zero timeout: 7.7% of a
    worker's CPU (py-spy under ``python -m bench``). A poll with a zero timeout
    never blocks, so the unpatched one is as cooperative and a plain system call.
    ``tests/unit/test_upstream.py`` notices if httpcore stops asking this way.
    """
    fd = -1 if sock is None else sock.fileno()
    if fd < 0:
        return True  # as httpcore: a socket gone reads as its end
    poll = _unpatched_poll()()
    poll.register(fd, select.POLLIN)
    return bool(poll.poll(0))


@functools.cache
def _unpatched_poll() -> Callable[[], Any]:
    poll: Callable[[], Any] = original("select", "poll")
    return poll


class _DeadlineBackend(httpcore.NetworkBackend):
    def __init__(self, backend: httpcore.NetworkBackend) -> None:
        self._backend = backend

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        left = _left(timeout, httpcore.ConnectTimeout)
        stream = self._backend.connect_tcp(host, port, left, local_address, socket_options)
        return _DeadlineStream(stream)

    def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        left = _left(timeout, httpcore.ConnectTimeout)
        return _DeadlineStream(self._backend.connect_unix_socket(path, left, socket_options))

    def sleep(self, seconds: float) -> None:
        self._backend.sleep(seconds)


def _with_deadlines(transport: httpx.HTTPTransport) -> httpx.HTTPTransport:
    pool = transport._pool
    if not isinstance(getattr(pool, "_network_backend", None), httpcore.NetworkBackend):
        raise RuntimeError("httpcore's pool no longer has _network_backend: see _http.py")
    pool._network_backend = _DeadlineBackend(pool._network_backend)
    return transport


def send(
    http: httpx.Client,
    method: str,
    url: str,
    *,
    headers: Mapping[str, str],
    redactor: Redactor,
    clock: ApiClock | None = None,
    budget: RateBudget | None = None,
    json_body: Any = None,
    parse_problem_body: ProblemParser = parse_problem,
) -> httpx.Response:
    """Send one request; return a 2xx response or raise a BillingError.

    The whole request (connect, send, the answer to its last byte) ends within the
    client's timeout, and an answer is cut off at ``MAX_ANSWER_BYTES``. Every answer's
    ``Date`` (and a problem's ``timestamp``) goes to ``clock``, its ``X-RateLimit-*`` to
    ``budget``. The error never carries
    the request, so a credential in its headers cannot leak through it; and what the
    API says is untrusted: ``redactor`` masks the credentials in the body before it is
    parsed (an API may echo the request), and cleans the problem's code and detail
    after (``invoice_mailer.untrusted``).
    """
    limit = _timeout_of(http)
    sent = time.time()
    try:
        with (
            deadline(limit or math.inf),
            http.stream(method, url, headers=headers, json=json_body) as streamed,
        ):
            received = time.time()
            response = _read_capped(streamed)
    except httpx.TimeoutException as exc:
        raise TransientError(
            status=None,
            code="timeout",
            detail=f"{type(exc).__name__} after {limit}s",
            request_sent=not isinstance(exc, httpx.ConnectTimeout | httpx.PoolTimeout),
        ) from None
    except httpx.TransportError as exc:
        raise TransientError(
            status=None,
            code="connection_error",
            detail=type(exc).__name__,
            request_sent=not isinstance(exc, httpx.ConnectError),
        ) from None
    server_date = parse_http_date(response.headers.get("date"))
    if clock is not None and server_date is not None:
        clock.observe(sent=sent, received=received, server=server_date, resolution=1.0)
    if budget is not None:
        budget.observe(response.headers, server_date or received)
    if response.is_success:
        return response
    body = redactor.secrets(response.content.decode("utf-8", "replace")).encode()
    problem = parse_problem_body(response.status_code, body)
    stamped = parse_iso(problem.timestamp)
    if clock is not None and stamped is not None:
        clock.observe(sent=sent, received=received, server=stamped, resolution=MILLISECOND)
    problem = replace(
        problem,
        code=redactor.text(problem.code, limit=100),
        detail=redactor.text(problem.detail),
    )
    # A Retry-After date is a time at the API: against its Date, not our clock.
    now = server_date if server_date is not None else time.time()
    wait = requested_wait(response.headers, problem, datetime.fromtimestamp(now, UTC))
    raise error_for(response.status_code, problem, wait)


def _read_capped(streamed: httpx.Response) -> httpx.Response:
    """The answer with its body read, up to ``MAX_ANSWER_BYTES`` (the rest unread)."""
    length = streamed.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) <= MAX_ANSWER_BYTES:
        streamed.read()  # the usual answer, of a size it announced: read it whole
        return streamed
    chunks, size = [], 0
    for chunk in streamed.iter_bytes():
        chunks.append(chunk[: MAX_ANSWER_BYTES - size])
        size += len(chunk)
        if size >= MAX_ANSWER_BYTES:
            break
    return httpx.Response(
        streamed.status_code,
        headers=streamed.headers,
        content=b"".join(chunks),
        request=streamed.request,
    )


def _timeout_of(http: httpx.Client) -> float | None:
    return http.timeout.read
