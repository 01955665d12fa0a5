"""The sharded transport: each thread keeps to one small pool, and the pools share the load."""

from __future__ import annotations

import threading
import time
from collections import defaultdict

import httpx
import pytest
import respx

from invoice_mailer.billing import HttpConfig, ShardedTransport, build_http_client

URL = "https://cloud.hostup.se/api/v2/ping"


class _Recording(httpx.BaseTransport):
    def __init__(self, name: int, seen: dict[int, set[int]]) -> None:
        self.name, self.seen = name, seen

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.seen[threading.get_ident()].add(self.name)
        return httpx.Response(204)


def test_each_thread_keeps_to_one_shard_and_threads_spread_over_all() -> None:
    seen: dict[int, set[int]] = defaultdict(set)
    transport = ShardedTransport(shards=3, limits=httpx.Limits(max_connections=2))
    transport._shards = [_Recording(n, seen) for n in range(3)]  # type: ignore[assignment]
    client = httpx.Client(transport=transport)
    start = threading.Barrier(6)

    def calls() -> None:
        start.wait()  # all six threads alive at once: six distinct thread ids
        for _ in range(5):
            assert client.get(URL).status_code == 204

    threads = [threading.Thread(target=calls) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(seen) == 6
    assert all(len(shards) == 1 for shards in seen.values())
    assert sorted(next(iter(s)) for s in seen.values()) == [0, 0, 1, 1, 2, 2]


@respx.mock
def test_the_built_client_splits_its_connection_budget_into_shards() -> None:
    respx.get(URL).respond(200, json={})
    with build_http_client(HttpConfig(max_connections=20, shard_size=8)) as http:
        transport = http._transport
        assert isinstance(transport, ShardedTransport)
        assert len(transport._shards) == 3
        assert http.get(URL).json() == {}
    with build_http_client(HttpConfig(max_connections=1)) as http:
        assert len(http._transport._shards) == 1  # type: ignore[attr-defined]


def test_the_shards_share_one_verifying_tls_context() -> None:
    """One context for all shards (each of its own cost 17 ms and 1 MB at start), and
    it still verifies: certificates checked against certifi's bundle, host names too."""
    import ssl

    transport = ShardedTransport(shards=4, limits=httpx.Limits(max_connections=2))
    contexts = {id(shard._pool._ssl_context) for shard in transport._shards}
    assert len(contexts) == 1
    tls = transport._shards[0]._pool._ssl_context
    assert isinstance(tls, ssl.SSLContext)
    assert (tls.verify_mode, tls.check_hostname) == (ssl.CERT_REQUIRED, True)
    assert tls.cert_store_stats()["x509_ca"] > 50


@respx.mock
def test_a_cookie_one_answer_sets_is_not_sent_with_the_next_request() -> None:
    """The APIs keep no session: no cookie jar, nothing carried from invoice to invoice."""
    route = respx.get(URL).mock(
        return_value=httpx.Response(204, headers={"Set-Cookie": "lb=node-3; Path=/"})
    )
    with build_http_client(HttpConfig()) as client:
        client.get(URL)
        client.get(URL)
        assert len(client.cookies) == 0
    assert [call.request.headers.get("cookie") for call in route.calls] == [None, None]


def test_a_trickling_answer_ends_at_the_deadline() -> None:
    """HTTP_TIMEOUT_SECONDS bounds the whole request, not each read: an answer dripped
    over 6 s ends at the 1 s deadline as a timeout (after the request was sent). This
    also notices if httpcore stops using the network backend swapped into its pool."""
    from invoice_mailer.billing._http import send
    from invoice_mailer.errors import TransientError
    from invoice_mailer.untrusted import Redactor
    from sandbox import DEFAULT_API_KEY, Sandbox

    with Sandbox(trickle=6.0) as sb, build_http_client(HttpConfig(timeout_seconds=1)) as http:
        url = f"{sb.hostup_url}/billing/invoices/inv_1/email-info"
        started = time.monotonic()
        with pytest.raises(TransientError) as info:
            send(
                http,
                "GET",
                url,
                headers={"Authorization": f"Bearer {DEFAULT_API_KEY}"},
                redactor=Redactor([]),
            )
        took = time.monotonic() - started
    assert info.value.code == "timeout"
    assert info.value.request_sent
    assert took < 2.0  # one deadline, plus at most one dripped byte's read


def test_outside_a_deadline_the_transport_keeps_httpx_own_timeouts() -> None:
    """Code that calls the client directly (not through send) is not cut short."""
    from sandbox import DEFAULT_API_KEY, Sandbox

    with Sandbox(trickle=0.5) as sb, build_http_client(HttpConfig(timeout_seconds=1)) as http:
        url = f"{sb.hostup_url}/billing/invoices/inv_1/email-info"
        answer = http.get(url, headers={"Authorization": f"Bearer {DEFAULT_API_KEY}"})
    assert answer.json()["emails"] == []


@respx.mock
def test_an_answer_larger_than_the_bound_is_cut_off() -> None:
    from invoice_mailer.billing._http import MAX_ANSWER_BYTES, send
    from invoice_mailer.untrusted import Redactor

    respx.get(URL).respond(200, content=b"x" * (MAX_ANSWER_BYTES * 3))
    with build_http_client(HttpConfig()) as http:
        answer = send(http, "GET", URL, headers={}, redactor=Redactor([]))
    assert len(answer.content) == MAX_ANSWER_BYTES


class _SilentServer:
    """A TCP server on loopback that reads one request and answers per ``answer``;
    ``after_close`` is what its next read saw once the client closed: b"" for a FIN,
    "reset" for an RST."""

    def __init__(self, answer: bytes | None) -> None:
        import socket

        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}/x"
        self._answer = answer
        self.after_close: bytes | str | None = None
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        conn, _ = self._listener.accept()
        with conn:
            conn.recv(65536)
            if self._answer is not None:
                conn.sendall(self._answer)
            conn.settimeout(10)
            try:
                self.after_close = conn.recv(65536)
            except ConnectionResetError:
                self.after_close = "reset"

    def join(self) -> None:
        self._thread.join(timeout=10)
        self._listener.close()


def _post(http: httpx.Client, url: str) -> None:
    from invoice_mailer.billing._http import send
    from invoice_mailer.untrusted import Redactor

    send(http, "POST", url, headers={}, redactor=Redactor([]))


def test_a_request_given_up_on_is_closed_abortively() -> None:
    """A POST whose answer never came is reset, not closed gracefully: the kernel
    drops whatever it had not delivered yet instead of retransmitting it later."""
    from invoice_mailer.errors import TransientError

    server = _SilentServer(answer=None)
    with build_http_client(HttpConfig(timeout_seconds=0.3)) as http, pytest.raises(TransientError):
        _post(http, server.url)
    server.join()
    assert server.after_close == "reset"


def test_a_healthy_connection_is_closed_gracefully() -> None:
    answer = b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n"
    server = _SilentServer(answer=answer)
    with build_http_client(HttpConfig(timeout_seconds=2)) as http:
        _post(http, server.url)
    server.join()
    assert server.after_close == b""
