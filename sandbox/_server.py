"""A local, faithful stand-in for the billing APIs of ../shared/api/, with fault injection.

It is a real HTTP/1.1 server (keep-alive, Content-Length, problem documents) so the
service's HTTP stack is exercised for real. Faults are scripted per invoice and
endpoint, consumed in order, then the endpoint behaves normally again:

    sandbox.script("inv_1", "resend", [Fault(status=503), Fault(status=429, retry_after=3)])

Random faults (``failure_rates``) and a fixed ``latency`` serve long runs and benchmarks.
Every request is recorded (method, path, headers, body, time) for tests to assert on.
Control endpoints under ``/_sandbox/`` let another process script and read it.

As the docs describe it, email-info lists the emails that resend-email queued:
``createdAt`` (= the resend's ``queuedAt``) at the POST, ``status`` ``queued`` and then,
``send_after`` seconds later, ``sent`` with its ``sentAt``. What real APIs do beyond their
docs has a switch each: ``clock_offset`` (the API's clock against ours: its ``Date``
header, ``createdAt``, ``queuedAt`` and problem ``timestamp`` all read it),
``email_info_lag`` (an email shows in email-info only this long after it was queued),
``trickle`` (every answer's body dripped over this many seconds), ``rate_limit`` (an
account budget of so many HostUp requests per second, fixed one-second windows, told in
``X-RateLimit-Limit/Remaining/Reset`` on every answer, 429 ``rate_limit_exceeded`` over
it) and, per fault, ``echo_headers`` (an error body that echoes the request's headers).
"""

from __future__ import annotations

import base64
import json
import math
import random
import re
import socket
import threading
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlencode

__all__ = [
    "DEFAULT_ABILLIFY_PASSWORD",
    "DEFAULT_ABILLIFY_USER",
    "DEFAULT_API_KEY",
    "Fault",
    "RecordedRequest",
    "Sandbox",
]

DEFAULT_API_KEY = "sandbox-api-key"
DEFAULT_ABILLIFY_USER = "sandbox"
DEFAULT_ABILLIFY_PASSWORD = "sandbox-password"
HOSTUP_PREFIX = "/api/v2"
ABILLIFY_PREFIX = "/abillify/api"
DEFAULT_TARGETS = {"to": "billing@example.com", "ccRecipients": ["finance@example.com"]}

_HOSTUP_RESEND = re.compile(r"^/api/v2/billing/invoices/([^/]+)/actions/resend-email$")
_HOSTUP_EMAIL_INFO = re.compile(r"^/api/v2/billing/invoices/([^/]+)/email-info$")
_ABILLIFY_RESEND = re.compile(r"^/abillify/api/invoices/([^/]+)/resendInvoice$")
_INVOICE_ID = re.compile(r"^inv_[A-Za-z0-9]+$")
# What email-info shows of an email (shared/api/hostup-email-info.md); the rest is ours.
_EMAIL_INFO_FIELDS = ("to", "ccRecipients", "status", "deliveryStatus", "sentAt", "createdAt")


@dataclass(frozen=True)
class Fault:
    """One scripted answer: an error status, a delay, a dropped connection, or a mix."""

    status: int | None = 500
    """The error to answer with; None answers as the endpoint normally would."""
    retry_after: str | None = None
    """``Retry-After`` header value (seconds or an HTTP date)."""
    retry_after_seconds: float | None = None
    """``recovery.retryAfterSeconds`` in the body (HostUp's resend limit)."""
    rate_limit_reset: str | None = None
    code: str | None = None
    """Problem ``code`` (HostUp) or ``type`` (Abillify); None picks the documented one."""
    body: str | None = None
    """A raw body instead of the documented problem document (HTML, empty, wrong shape)."""
    content_type: str | None = None
    delay: float = 0.0
    """Seconds to wait before answering (beyond the sandbox's latency)."""
    drop: bool = False
    """Close the connection after reading the request, sending nothing."""
    then_succeed: bool = False
    """Queue the email at once, then delay, drop or answer with ``status``."""
    echo_headers: bool = False
    """Echo the request's headers (``Authorization`` included) in the error's detail or
    message, as JSON and URL-encoded, as a careless API or proxy does."""
    trickle: float = 0.0
    """Drip the answer's body a byte at a time over this many seconds."""


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    at: float
    endpoint: str
    invoice: str | None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["body"] = self.body.decode("utf-8", "replace")
        return data


@dataclass
class _State:
    api_key: str
    abillify_user: str
    abillify_password: str
    latency: float
    failure_rates: dict[int, float]
    resend_limit: int | None
    clock_offset: float = 0.0
    email_info_lag: float = 0.0
    send_after: float = 1.0
    trickle: float = 0.0
    rate_limit: int | None = None
    window: tuple[int, int] = (0, 0)
    """(second of the sandbox's clock, requests counted in it) for ``rate_limit``."""
    rate_limited: int = 0
    missing: set[str] = field(default_factory=set)
    scopes: set[str] = field(default_factory=lambda: {"read:billing", "write:billing"})
    scripts: dict[tuple[str, str], list[Fault]] = field(default_factory=dict)
    requests: list[RecordedRequest] = field(default_factory=list)
    emails: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    idempotency: dict[str, tuple[float, int, bytes]] = field(default_factory=dict)
    jobs: int = 0


class Sandbox:
    """The billing APIs on a free loopback port, in a background thread."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        api_key: str = DEFAULT_API_KEY,
        abillify_user: str = DEFAULT_ABILLIFY_USER,
        abillify_password: str = DEFAULT_ABILLIFY_PASSWORD,
        latency: float = 0.0,
        failure_rates: dict[int, float] | None = None,
        resend_limit: int | None = None,
        seed: int | None = None,
        clock_offset: float = 0.0,
        email_info_lag: float = 0.0,
        send_after: float = 1.0,
        trickle: float = 0.0,
        rate_limit: int | None = None,
    ) -> None:
        self._lock = threading.Lock()
        self._rng = random.Random(seed)
        self._state = _State(
            api_key=api_key,
            abillify_user=abillify_user,
            abillify_password=abillify_password,
            latency=latency,
            failure_rates=dict(failure_rates or {}),
            resend_limit=resend_limit,
            clock_offset=clock_offset,
            email_info_lag=email_info_lag,
            send_after=send_after,
            trickle=trickle,
            rate_limit=rate_limit,
        )
        handler = type("_BoundHandler", (_Handler,), {"sandbox": self})
        self._server = _Server((host, port), handler)
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def hostup_url(self) -> str:
        """What HOSTUP_API_BASE_URL should be."""
        return self.url + HOSTUP_PREFIX

    @property
    def abillify_url(self) -> str:
        """What ABILLIFY_API_BASE_URL should be."""
        return self.url + ABILLIFY_PREFIX

    def start(self) -> Sandbox:
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},  # shutdown() waits up to one poll
            name="billing-sandbox",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:  # shutdown() waits for serve_forever, if it ever ran
            self._server.shutdown()
            self._thread.join(timeout=5)
        self._server.server_close()

    def __enter__(self) -> Sandbox:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- scripting and inspection --------------------------------------------------------

    def script(self, invoice: str, endpoint: str, faults: Iterable[Fault]) -> None:
        """Answer the next requests for ``invoice`` at ``endpoint`` with ``faults``, in order.

        ``endpoint`` is ``resend`` (either provider's resend) or ``email_info``.
        """
        with self._lock:
            self._state.scripts.setdefault((invoice, endpoint), []).extend(faults)

    def mark_missing(self, invoice: str) -> None:
        """Make ``invoice`` unknown: 404 from every endpoint."""
        with self._lock:
            self._state.missing.add(invoice)

    def configure(
        self,
        *,
        latency: float | None = None,
        failure_rates: dict[int, float] | None = None,
        scopes: set[str] | None = None,
        resend_limit: int | None = None,
        clock_offset: float | None = None,
        email_info_lag: float | None = None,
        send_after: float | None = None,
        trickle: float | None = None,
        rate_limit: int | None = None,
    ) -> None:
        with self._lock:
            for name, value in (
                ("clock_offset", clock_offset),
                ("email_info_lag", email_info_lag),
                ("send_after", send_after),
                ("trickle", trickle),
                ("rate_limit", rate_limit),
            ):
                if value is not None:
                    setattr(self._state, name, value)
            if latency is not None:
                self._state.latency = latency
            if failure_rates is not None:
                self._state.failure_rates = dict(failure_rates)
            if scopes is not None:
                self._state.scopes = set(scopes)
            if resend_limit is not None:
                self._state.resend_limit = resend_limit

    def requests(
        self, *, invoice: str | None = None, endpoint: str | None = None
    ) -> list[RecordedRequest]:
        with self._lock:
            return [
                r
                for r in self._state.requests
                if (invoice is None or r.invoice == invoice)
                and (endpoint is None or r.endpoint == endpoint)
            ]

    def rate_limited(self) -> int:
        """How many requests the account's ``rate_limit`` refused with a 429."""
        with self._lock:
            return self._state.rate_limited

    def now(self) -> float:
        """The sandbox API's clock (Unix time): ours plus ``clock_offset``."""
        return time.time() + self._state.clock_offset

    def iso_now(self) -> str:
        return _iso(self.now())

    def emails(self, invoice: str) -> list[dict[str, Any]]:
        """Emails actually queued for ``invoice`` (what a customer would receive)."""
        with self._lock:
            return list(self._state.emails.get(invoice, []))

    def reset(self) -> None:
        with self._lock:
            self._state.scripts.clear()
            self._state.requests.clear()
            self._state.emails.clear()
            self._state.idempotency.clear()
            self._state.missing.clear()

    # -- request handling (called from handler threads) ----------------------------------

    def _handle(self, handler: _Handler, method: str) -> None:
        path = handler.path.split("?", 1)[0]
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else b""
        handler.trickle = 0.0  # the handler lives as long as its keep-alive connection
        handler.budget_headers = {}
        if path.startswith("/_sandbox/"):
            self._control(handler, method, path, body)
            return
        endpoint, invoice = _route(method, path)
        with self._lock:
            self._state.requests.append(
                RecordedRequest(
                    method=method,
                    path=path,
                    headers={k.lower(): v for k, v in handler.headers.items()},
                    body=body,
                    at=time.time(),
                    endpoint=endpoint or "unknown",
                    invoice=invoice,
                )
            )
            fault = self._next_fault(invoice, endpoint)
            latency = self._state.latency
            handler.budget_headers, over = self._count_in_budget(path)
            handler.trickle = fault.trickle if fault and fault.trickle else self._state.trickle
        effect = None
        if fault is not None and fault.then_succeed:
            effect = self._effect(endpoint, invoice, handler)  # the email goes out now...
        if latency or (fault and fault.delay):
            time.sleep(latency + (fault.delay if fault else 0.0))  # ...the answer comes later
        if fault is not None and fault.drop:
            handler.close_connection = True
            handler.connection.shutdown(socket.SHUT_RDWR)
            return
        if over and fault is None:
            headers = {"Retry-After": handler.budget_headers["X-RateLimit-Reset"]}
            _problem(handler, 429, "rate_limit_exceeded", _TITLES[429], headers=headers)
        elif fault is not None and fault.status is not None:
            self._send_fault(handler, endpoint, invoice, fault)
        elif effect is not None:
            _json(handler, 200, _resend_answer(effect, handler.path))
        else:
            self._answer_normally(handler, endpoint, invoice, body)

    def _count_in_budget(self, path: str) -> tuple[dict[str, str], bool]:
        """The account's fixed one-second window (under the lock): its X-RateLimit-*
        headers for this answer, and whether this request is over the budget."""
        limit = self._state.rate_limit
        if limit is None or not path.startswith(HOSTUP_PREFIX):
            return {}, False
        now = self.now()
        second, used = self._state.window
        if int(now) != second:
            second, used = int(now), 0
        used += 1
        self._state.window = (second, used)
        over = used > limit
        if over:
            self._state.rate_limited += 1
        reset = max(1, math.ceil(second + 1 - now))
        return {
            "X-RateLimit-Limit": str(limit),
            "X-RateLimit-Remaining": str(max(0, limit - used)),
            "X-RateLimit-Reset": str(reset),
        }, over

    def _next_fault(self, invoice: str | None, endpoint: str | None) -> Fault | None:
        if invoice is None or endpoint is None:
            return None
        script = self._state.scripts.get((invoice, endpoint))
        if script:
            return script.pop(0)
        roll = self._rng.random()
        for status, rate in sorted(self._state.failure_rates.items()):
            if roll < rate:
                return Fault(status=status, retry_after="1" if status == 429 else None)
            roll -= rate
        return None

    def _answer_normally(
        self, handler: _Handler, endpoint: str | None, invoice: str | None, body: bytes
    ) -> None:
        if endpoint in ("resend", "email_info") and handler.path.startswith(HOSTUP_PREFIX):
            self._hostup(handler, endpoint, invoice, body)
        elif endpoint == "resend" and handler.path.startswith(ABILLIFY_PREFIX):
            self._abillify(handler, invoice)
        else:
            _problem(handler, 404, "not_found", "The requested resource could not be found.")

    def _hostup(self, handler: _Handler, endpoint: str, invoice: str | None, body: bytes) -> None:
        auth = handler.headers.get("Authorization", "")
        if auth != f"Bearer {self._state.api_key}":
            _problem(handler, 401, "unauthorized", "Authentication is required.")
            return
        scope = "write:billing" if endpoint == "resend" else "read:billing"
        if scope not in self._state.scopes:
            _problem(
                handler,
                403,
                "forbidden",
                "The caller lacks a required scope or does not own the resource.",
            )
            return
        if invoice is None or not _INVOICE_ID.match(invoice) or invoice in self._state.missing:
            _problem(handler, 404, "not_found", "The requested resource could not be found.")
            return
        if endpoint == "resend":
            if body:
                _problem(
                    handler,
                    400,
                    "invalid_request",
                    "The request body failed validation.",
                    errors=[
                        {
                            "pointer": "/",
                            "detail": "The request body must be empty.",
                            "code": "invalid_request",
                        }
                    ],
                )
                return
            with self._lock:
                sent = len(self._state.emails.get(invoice, []))
                limit = self._state.resend_limit
            if limit is not None and sent >= limit:
                _send_rate_limited_resend(handler, invoice, 86400)
                return
            email = self._effect("resend", invoice, handler)
            _json(handler, 200, _resend_answer(email, handler.path))
            return
        now = time.time()
        with self._lock:
            lag, send_after = self._state.email_info_lag, self._state.send_after
            emails = [
                _as_listed(e, now, send_after)
                for e in self._state.emails.get(invoice, [])
                if now - e["queuedAtLocal"] >= lag
            ]
        _json(handler, 200, {"emails": emails, "currentTargets": DEFAULT_TARGETS})

    def _abillify(self, handler: _Handler, invoice: str | None) -> None:
        expected = base64.b64encode(
            f"{self._state.abillify_user}:{self._state.abillify_password}".encode()
        ).decode()
        if handler.headers.get("Authorization", "") != f"Basic {expected}":
            _abillify_error(handler, 401, "ERR_UNAUTHORIZED", "Unauthorized")
            return
        if invoice is None or invoice in self._state.missing:
            _abillify_error(handler, 404, "ERR_NOT_FOUND", "Invoice not found")
            return
        key = handler.headers.get("Idempotency-Key")
        now = time.time()
        if key:
            with self._lock:
                kept = self._state.idempotency.get(key)
            if kept is not None and now - kept[0] < 24 * 3600:
                _raw(handler, kept[1], kept[2], "application/json")
                return
        email = self._effect("resend", invoice, handler)
        payload = json.dumps(_resend_answer(email, handler.path)).encode()
        if key:
            with self._lock:
                self._state.idempotency[key] = (now, 200, payload)
        _raw(handler, 200, payload, "application/json")

    def _effect(
        self, endpoint: str | None, invoice: str | None, handler: _Handler
    ) -> dict[str, Any]:
        """Queue an email: the thing a customer notices, counted per invoice."""
        now = self.iso_now()
        with self._lock:
            self._state.jobs += 1
            email = {
                "to": DEFAULT_TARGETS["to"],
                "ccRecipients": list(DEFAULT_TARGETS["ccRecipients"]),
                "status": "queued",
                "deliveryStatus": None,
                "sentAt": None,
                "createdAt": now,
                "jobId": str(self._state.jobs),
                "idempotencyKey": handler.headers.get("Idempotency-Key"),
                "queuedAtLocal": time.time(),
            }
            self._state.emails.setdefault(invoice or "", []).append(email)
        return email

    def _send_fault(
        self, handler: _Handler, endpoint: str | None, invoice: str | None, fault: Fault
    ) -> None:
        status = fault.status or 500
        headers: dict[str, str] = {}
        if fault.retry_after is not None:
            headers["Retry-After"] = fault.retry_after
        if fault.rate_limit_reset is not None:
            headers["X-RateLimit-Reset"] = fault.rate_limit_reset
        if status == 429:  # the account's budget, when one is set, else a documented one
            headers.setdefault(
                "X-RateLimit-Limit", handler.budget_headers.get("X-RateLimit-Limit", "60")
            )
            headers.setdefault("X-RateLimit-Remaining", "0")
        if fault.body is not None:
            _raw(handler, status, fault.body.encode(), fault.content_type or "text/html", headers)
            return
        title = _TITLES.get(status, "Error")
        if fault.echo_headers:
            echoed = dict(handler.headers.items())
            title = f"{title}; request headers {json.dumps(echoed)}; as sent: {urlencode(echoed)}"
        if handler.path.startswith(ABILLIFY_PREFIX):
            _abillify_error(
                handler,
                status,
                fault.code or _ABILLIFY_TYPES.get(status, "ERR_INTERNAL"),
                title,
                headers,
            )
            return
        if status == 429 and endpoint == "resend" and fault.retry_after_seconds is not None:
            _send_rate_limited_resend(handler, invoice or "", fault.retry_after_seconds, headers)
            return
        code = fault.code or _CODES.get(status, "internal_error")
        _problem(handler, status, code, title, headers=headers)

    def _control(self, handler: _Handler, method: str, path: str, body: bytes) -> None:
        if method == "GET" and path == "/_sandbox/requests":
            _json(handler, 200, [r.to_dict() for r in self.requests()])
        elif method == "POST" and path == "/_sandbox/script":
            doc = json.loads(body)
            self.script(doc["invoice"], doc["endpoint"], [Fault(**f) for f in doc["faults"]])
            _json(handler, 200, {"ok": True})
        elif method == "POST" and path == "/_sandbox/configure":
            doc = json.loads(body)
            rates = doc.get("failure_rates")
            self.configure(
                latency=doc.get("latency"),
                failure_rates={int(k): v for k, v in rates.items()} if rates is not None else None,
                clock_offset=doc.get("clock_offset"),
                email_info_lag=doc.get("email_info_lag"),
                send_after=doc.get("send_after"),
                trickle=doc.get("trickle"),
                rate_limit=doc.get("rate_limit"),
            )
            _json(handler, 200, {"ok": True})
        elif method == "POST" and path == "/_sandbox/reset":
            self.reset()
            _json(handler, 200, {"ok": True})
        else:
            _json(handler, 404, {"error": "unknown control endpoint"})


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # socketserver listens with a backlog of 5: a burst of new connections (several
    # workers starting their pools at once) overflows it, and the kernel drops them
    # until the client retries seconds later, after its timeout. A real API's front
    # door does not; an answer that late turns a resend uncertain for no reason.
    request_queue_size = socket.SOMAXCONN

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that went away mid-answer (killed, timed out) is expected here."""
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body in one segment, sent at once: unbuffered writes plus Nagle and
    # the client's delayed ACK would add ~40 ms to every answer, which no real API has.
    wbufsize = 64 * 1024
    disable_nagle_algorithm = True
    sandbox: Sandbox
    trickle: float = 0.0
    budget_headers: dict[str, str] = {}  # noqa: RUF012 (replaced per request, never mutated)

    def date_time_string(self, timestamp: float | None = None) -> str:
        """The ``Date`` header, in the sandbox API's clock."""
        return super().date_time_string(self.sandbox.now() if timestamp is None else timestamp)

    def do_GET(self) -> None:
        self.sandbox._handle(self, "GET")

    def do_POST(self) -> None:
        self.sandbox._handle(self, "POST")

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: tests and the demo read the recorded requests instead."""


_CODES = {
    400: "invalid_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    429: "rate_limit_exceeded",
    500: "internal_error",
    502: "bad_gateway",
    503: "service_unavailable",
    504: "gateway_timeout",
}
_TITLES = {
    400: "The request body failed validation.",
    401: "Authentication is required.",
    403: "The caller lacks a required scope or does not own the resource.",
    404: "The requested resource could not be found.",
    429: "Too many requests. Retry after the limit resets.",
    500: "An unexpected error occurred. Retry later or contact support if the issue persists.",
    502: "Bad gateway.",
    503: "Service unavailable.",
    504: "Gateway timeout.",
}
_ABILLIFY_TYPES = {
    400: "ERR_INVALID_VALUE",
    401: "ERR_UNAUTHORIZED",
    403: "ERR_FORBIDDEN",
    404: "ERR_NOT_FOUND",
    429: "ERR_RATE_LIMIT",
    500: "ERR_INTERNAL",
    503: "ERR_UNAVAILABLE",
}


def _iso(when: float) -> str:
    return (
        datetime.fromtimestamp(when, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    )


def _as_listed(email: dict[str, Any], now: float, send_after: float) -> dict[str, Any]:
    """An email as email-info shows it: queued, then sent ``send_after`` seconds later."""
    listed = {k: v for k, v in email.items() if k in _EMAIL_INFO_FIELDS}
    if now - email["queuedAtLocal"] >= send_after:
        sent = datetime.fromisoformat(email["createdAt"]).timestamp() + send_after
        listed.update(status="sent", deliveryStatus="delivered", sentAt=_iso(sent))
    return listed


def _resend_answer(email: dict[str, Any], path: str) -> dict[str, Any]:
    """The documented success body of either provider's resend."""
    if path.startswith(ABILLIFY_PREFIX):
        return {"job": email["jobId"], "result": "OK", "resultcode": "0"}
    return {"queuedAt": email["createdAt"], "email": email["to"]}


def _route(method: str, path: str) -> tuple[str | None, str | None]:
    for pattern, endpoint, verb in (
        (_HOSTUP_RESEND, "resend", "POST"),
        (_HOSTUP_EMAIL_INFO, "email_info", "GET"),
        (_ABILLIFY_RESEND, "resend", "POST"),
    ):
        match = pattern.match(path)
        if match and method == verb:
            return endpoint, unquote(match.group(1))
    return None, None


def _problem(
    handler: _Handler,
    status: int,
    code: str,
    detail: str,
    *,
    headers: dict[str, str] | None = None,
    errors: list[dict[str, str]] | None = None,
) -> None:
    doc: dict[str, Any] = {
        "type": f"https://developer.hostup.se/errors/{code}",
        "title": detail.split(".")[0],
        "status": status,
        "detail": detail,
        "code": code,
        "instance": handler.path,
        "requestId": f"req_{random.getrandbits(64):016x}",
        "timestamp": handler.sandbox.iso_now(),
    }
    if errors:
        doc["errors"] = errors
    _raw(handler, status, json.dumps(doc).encode(), "application/problem+json", headers)


def _send_rate_limited_resend(
    handler: _Handler, invoice: str, seconds: float, headers: dict[str, str] | None = None
) -> None:
    doc = {
        "type": "https://developer.hostup.se/errors/rate_limited",
        "title": "Too many requests",
        "status": 429,
        "detail": "Maximum resend limit reached. Try again later.",
        "code": "rate_limited",
        "instance": f"/api/v2/billing/invoices/{invoice}/actions/resend-email",
        "recovery": {"action": "retry_after", "retryAfterSeconds": seconds},
    }
    _raw(handler, 429, json.dumps(doc).encode(), "application/problem+json", headers)


# shared/api/abillify-resend-invoice.txt, the documented 400.
_ABILLIFY_INVALID_VALUE = {
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


def _abillify_error(
    handler: _Handler,
    status: int,
    error_type: str,
    message: str,
    headers: dict[str, str] | None = None,
) -> None:
    if error_type == "ERR_INVALID_VALUE":
        body = json.dumps(_ABILLIFY_INVALID_VALUE).encode()
        _raw(handler, 400, body, "application/json", headers)
        return
    doc = {
        "code": status,
        "details": [{"error": message, "fields": [], "hint": ""}],
        "message": message,
        "name": "ClientError" if status < 500 else "ServerError",
        "type": error_type,
    }
    _raw(handler, status, json.dumps(doc).encode(), "application/json", headers)


def _json(handler: _Handler, status: int, doc: Any) -> None:
    _raw(handler, status, json.dumps(doc).encode(), "application/json")


def _raw(
    handler: _Handler,
    status: int,
    body: bytes,
    content_type: str,
    headers: dict[str, str] | None = None,
) -> None:
    handler.send_response(status)
    handler.send_header("Content-Type", content_type)
    handler.send_header("Content-Length", str(len(body)))
    for name, value in {**handler.budget_headers, **(headers or {})}.items():
        handler.send_header(name, value)
    handler.end_headers()
    if not handler.trickle or not body:
        handler.wfile.write(body)
        return
    handler.wfile.flush()  # the headers now, then the body a byte at a time
    pause = handler.trickle / len(body)
    for i in range(len(body)):
        time.sleep(pause)
        handler.wfile.write(body[i : i + 1])
        handler.wfile.flush()
