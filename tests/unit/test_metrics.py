"""The worker's metrics: what step records count, and the server that serves them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
from prometheus_client import REGISTRY, CollectorRegistry, Gauge

from invoice_mailer.observe import StepRecord
from tasks import _metrics
from tasks._metrics import MetricsObserver, forget_dead_processes, serve_metrics


def _value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_a_publish_the_bus_refused_is_counted_by_its_reason() -> None:
    before = _value("invoice_mailer_publish_failures_total", reason="blocked")
    record = StepRecord(
        event_id="e", invoice="inv_1", provider="hostup", step="publish",
        outcome="publish_failed", code="blocked", wait_seconds=2,
    )  # fmt: skip
    MetricsObserver().on_step(record)
    assert _value("invoice_mailer_publish_failures_total", reason="blocked") == before + 1


def test_the_server_binds_the_host_it_is_given_with_a_real_backlog() -> None:
    server = serve_metrics(0, host="127.0.0.1", registry=CollectorRegistry(), ready=lambda: False)
    try:
        host, port = server.server_address[:2]
        assert host == "127.0.0.1"
        assert server.request_queue_size == 128
        assert httpx.get(f"http://127.0.0.1:{port}/livez").status_code == 200
        assert httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 503
    finally:
        server.shutdown()
        server.server_close()


def test_a_dead_workers_gauges_leave_the_multiprocess_directory(tmp_path: Path) -> None:
    """A worker killed while it saw the API unhealthy must not keep the fleet's gauge at
    0: its live-gauge files go; its counters stay (their sums never go down)."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    for name in (
        f"gauge_livemin_{gone.pid}.db",
        f"counter_{gone.pid}.db",
        f"gauge_livemin_{os.getpid()}.db",
    ):
        (tmp_path / name).write_bytes(b"")
    assert forget_dead_processes(str(tmp_path)) == [gone.pid]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"counter_{gone.pid}.db", f"gauge_livemin_{os.getpid()}.db"]
    )


def test_every_gauge_is_live_in_multiprocess_mode() -> None:
    """A gauge whose mode is not a live one would keep a dead process's value."""
    gauges = [m for m in vars(_metrics).values() if isinstance(m, Gauge)]
    assert gauges
    assert all(g._multiprocess_mode.startswith("live") for g in gauges)
