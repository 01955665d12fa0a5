"""The worker's metrics: what step records count, and the server that serves them."""

from __future__ import annotations

import httpx
from prometheus_client import REGISTRY, CollectorRegistry

from invoice_mailer.observe import StepRecord
from tasks._metrics import MetricsObserver, serve_metrics


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
