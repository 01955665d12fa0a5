"""A stand-in Sentry: an HTTP server that keeps every envelope a worker sends it.

Point ``SENTRY_DSN`` at ``collector.dsn``; the SDK posts envelopes (gzip-compressed
without brotli installed, or plain) to ``/api/<project>/envelope/``. Tests read what
arrived as text.
"""

from __future__ import annotations

import gzip
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["SentryCollector"]


class SentryCollector:
    def __init__(self) -> None:
        self.envelopes: list[bytes] = []
        self._lock = threading.Lock()
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                encoding = (self.headers.get("Content-Encoding") or "").lower()
                if encoding == "gzip":
                    body = gzip.decompress(body)
                elif encoding == "deflate":
                    body = zlib.decompress(body)
                elif encoding:
                    raise ValueError(f"unexpected Content-Encoding {encoding!r}")
                with collector._lock:
                    collector.envelopes.append(body)
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def dsn(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://publickey@{host}:{port}/1"

    def text(self) -> str:
        with self._lock:
            return "\n".join(e.decode("utf-8", "replace") for e in self.envelopes)

    def __enter__(self) -> SentryCollector:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
