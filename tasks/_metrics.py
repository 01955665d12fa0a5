"""Prometheus metrics, the worker's adapter to prometheus_client.

Counters fed by ``StepRecord``s, queue depths read at scrape time.

With several worker processes on one host, set ``PROMETHEUS_MULTIPROC_DIR`` (an
empty directory shared by them) and every process's counters are added up by
whichever process serves the port.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from broker import QueueDepths, Topology
from invoice_mailer.observe import StepRecord

__all__ = [
    "IN_FLIGHT",
    "MetricsObserver",
    "QueueDepthCollector",
    "record_health",
    "registry_for_export",
    "serve_metrics",
]

_P = "invoice_mailer"
EVENTS_RECEIVED = Counter(
    f"{_P}_events_received_total", "Raw invoice.reissued accepted for processing"
)
EVENTS_INVALID = Counter(f"{_P}_events_invalid_total", "Events refused at the door", ["code"])
DUPLICATES = Counter(f"{_P}_duplicates_skipped_total", "Deliveries of already finished events")
RESENDS = Counter(f"{_P}_resends_total", "Resend attempts by outcome", ["provider", "outcome"])
RETRIES = Counter(
    f"{_P}_retries_total", "Retries scheduled, by class (429, 5xx, transport)", ["step", "class"]
)
WAITS = Histogram(
    f"{_P}_wait_seconds",
    "Waits parked in the broker",
    ["kind"],
    buckets=(1, 2, 5, 10, 30, 60, 300, 900, 3600, 21600, 86400, 172800),
)
GIVE_UPS = Counter(f"{_P}_give_ups_total", "Events given up", ["step", "code"])
DEAD_LETTERS = Counter(f"{_P}_dead_letters_total", "Events dead-lettered", ["code"])
PUBLISHED = Counter(f"{_P}_events_published_total", "Events published", ["type"])
PUBLISH_FAILURES = Counter(
    f"{_P}_publish_failures_total",
    "Publishes the bus did not take (the event waits and tries again), by reason",
    ["reason"],
)
STEP_SECONDS = Histogram(
    f"{_P}_step_duration_seconds",
    "Duration of one step",
    ["step"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
IN_FLIGHT = Gauge(
    f"{_P}_in_flight",
    "Messages this process holds unacknowledged",
    ["kind"],
    multiprocess_mode="livesum",
)

DEPENDENCY_HEALTHY = Gauge(
    f"{_P}_dependency_healthy",
    "1 while the dependency is healthy for the fleet (shared health), 0 while events wait",
    ["dependency"],
    multiprocess_mode="livemin",
)
DEPENDENCY_UNHEALTHY_SECONDS = Gauge(
    f"{_P}_dependency_unhealthy_seconds",
    "How long the dependency has been unhealthy (0 while healthy)",
    ["dependency"],
    multiprocess_mode="livemax",
)
PAUSED = Counter(
    f"{_P}_paused_total",
    "Attempts held back in the broker by an unhealthy dependency (no try used up)",
    ["dependency"],
)
BUDGET_RATE = Gauge(
    f"{_P}_budget_requests_per_second",
    "The request rate the fleet keeps to (learned from X-RateLimit-* or configured)",
    ["provider"],
    multiprocess_mode="livemin",
)
BUDGET_REMAINING = Gauge(
    f"{_P}_budget_remaining",
    "Requests left in the API's current window, as its last answer told",
    ["provider"],
    multiprocess_mode="livemin",
)
INTAKE_PAUSED = Gauge(
    f"{_P}_intake_paused",
    "1 while a dependency is unhealthy for the fleet: this process takes no new raw events, "
    "but for a second or two when a probe is due",
    multiprocess_mode="livemax",
)

_TIMED_STEPS = frozenset({"resend", "email_info", "publish"})
# Outcomes of a step that made no call: neither an attempt nor a duration.
_NO_CALL = frozenset({"paused", "paced", "invoice_busy", "lease_lost"})


def record_health(
    states: dict[str, tuple[bool, float]],
    paused: bool,
    budget: tuple[str, float | None, float | None] | None = None,
) -> None:
    """Set the dependency gauges: ``states`` maps a dependency to (healthy, unhealthy for);
    ``budget`` is (provider, requests/s kept to, requests left in the window)."""
    for dependency, (ok, lasted) in states.items():
        DEPENDENCY_HEALTHY.labels(dependency).set(1 if ok else 0)
        DEPENDENCY_UNHEALTHY_SECONDS.labels(dependency).set(0 if ok else lasted)
    INTAKE_PAUSED.set(1 if paused else 0)
    if budget is not None:
        provider, rate, remaining = budget
        if rate is not None:
            BUDGET_RATE.labels(provider).set(rate)
        if remaining is not None:
            BUDGET_REMAINING.labels(provider).set(remaining)


class MetricsObserver:
    """Turns step records into counters and histograms."""

    def on_step(self, r: StepRecord) -> None:
        if r.step == "receive":
            EVENTS_RECEIVED.inc()
        elif r.step == "validate":
            EVENTS_INVALID.labels(r.code or "unknown").inc()
            DEAD_LETTERS.labels(r.code or "unknown").inc()
            PUBLISHED.labels("invoice.email_failed").inc()
        elif r.outcome == "duplicate":
            DUPLICATES.inc()
        if r.step == "resend" and r.outcome not in _NO_CALL:
            RESENDS.labels(r.provider, r.outcome).inc()
        if r.outcome in ("rate_limited", "server_error"):
            kind = "429" if r.outcome == "rate_limited" else ("5xx" if r.status else "transport")
            RETRIES.labels(r.step, kind).inc()
        if r.wait_seconds is not None:
            WAITS.labels(r.outcome).observe(r.wait_seconds)
        if r.outcome == "paused":
            PAUSED.labels(r.code or r.step).inc()
        if r.outcome == "gave_up":
            GIVE_UPS.labels(r.step, r.code or "unknown").inc()
        if r.outcome == "published":
            PUBLISHED.labels("invoice.email_queued").inc()
        if r.outcome == "publish_failed":
            PUBLISH_FAILURES.labels(r.code or "unknown").inc()
        if r.outcome == "published_failure":
            PUBLISHED.labels("invoice.email_failed").inc()
            DEAD_LETTERS.labels(r.code or "unknown").inc()
        if r.step in _TIMED_STEPS and r.duration_seconds is not None and r.outcome not in _NO_CALL:
            STEP_SECONDS.labels(r.step).observe(r.duration_seconds)


class QueueDepthCollector(Collector):
    """Ready and parked messages per queue, asked of the broker (at most every 5 s)."""

    def __init__(self, url: str, topology: Topology, task_queue: str) -> None:
        self._depths = QueueDepths(url, topology.watched_queues(task_queue))

    def collect(self) -> Iterator[GaugeMetricFamily]:
        depth = GaugeMetricFamily(
            f"{_P}_queue_messages", "Messages waiting in the broker", labels=["queue", "state"]
        )
        up = GaugeMetricFamily(f"{_P}_broker_up", "Whether the broker answered the scrape")
        try:
            counts = self._depths.read()
        except Exception:
            up.add_metric([], 0)
        else:
            up.add_metric([], 1)
            for (queue, state), value in counts.items():
                depth.add_metric([queue, state], value)
        yield depth
        yield up


def forget_dead_processes(directory: str | None = None) -> list[int]:
    """Multiprocess mode: the gauge files of processes that are gone (killed, or stopped
    without ``mark_process_dead``), removed, so that a dead worker's last "unhealthy" or
    "paused" is not served for ever. Counters stay: their sums must not go down."""
    directory = directory or os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not directory:
        return []
    dead = set()
    for path in Path(directory).glob("gauge_live*_*.db"):
        pid = int(path.stem.rsplit("_", 1)[1])
        if not _alive(pid):
            dead.add(pid)
    for pid in dead:
        multiprocess.mark_process_dead(pid, directory)
    return sorted(dead)


def forget_process() -> None:
    """At a worker's shutdown: its gauges leave the multiprocess sums at once."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.mark_process_dead(os.getpid())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def registry_for_export(extra: list[Collector]) -> CollectorRegistry:
    """The registry to serve: this process's, or every process's in multiprocess mode."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        from prometheus_client import REGISTRY

        registry = REGISTRY
    for collector in extra:
        registry.register(collector)
    return registry


class _Server(ThreadingHTTPServer):
    request_queue_size = 128
    daemon_threads = True


def serve_metrics(
    port: int,
    *,
    registry: CollectorRegistry,
    ready: Callable[[], bool],
    host: str = "0.0.0.0",  # noqa: S104  (scraped and probed from outside the container)
) -> ThreadingHTTPServer:
    """``/metrics``, ``/livez`` (the process answers) and ``/readyz`` (``ready()``) on
    ``host`` (``METRICS_HOST``), with a listen backlog of 128, not socketserver's 5:
    probes and scrapes arriving together are not refused."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.startswith("/metrics"):
                forget_dead_processes()  # a worker killed since the last scrape
                body, status, kind = generate_latest(registry), 200, CONTENT_TYPE_LATEST
            elif self.path == "/livez":
                body, status, kind = b"ok\n", 200, "text/plain"
            elif self.path == "/readyz":
                ok = ready()
                body, status = (b"ready\n", 200) if ok else (b"not ready\n", 503)
                kind = "text/plain"
            else:
                body, status, kind = b"not found\n", 404, "text/plain"
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            """Probes every few seconds would drown the logs."""

    server = _Server((host, port), Handler)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server
