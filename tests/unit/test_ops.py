"""What operators deploy beside the service: the Prometheus alert rules (tested with
promtool) and the Grafana dashboard (every metric it reads is one the service exports)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.exposition import generate_latest

from broker import Topology
from tasks import _metrics  # noqa: F401  (registers the service's metrics)
from tasks._metrics import QueueDepthCollector

OPS = Path(__file__).resolve().parents[2] / "ops"
# Read from RabbitMQ's own prometheus plugin, where it says it better (unacked counts).
EXTERNAL = ("rabbitmq_",)
SUFFIXES = ("_bucket", "_count", "_sum", "_total", "_created")


def _promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is needed (Debian: apt-get install prometheus)")
        pytest.skip("promtool not installed (Debian: apt-get install prometheus)")
    return found


def test_the_alert_rules_are_valid_and_pass_their_tests() -> None:
    promtool = _promtool()
    checked = subprocess.run(
        [promtool, "check", "rules", "alerts.yml"],
        cwd=OPS / "prometheus", capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = subprocess.run(
        [promtool, "test", "rules", "alerts_test.yml"],
        cwd=OPS / "prometheus", capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


def _exported() -> set[str]:
    """Every metric family the worker serves (the queue collector answers broker_up 0
    when the broker cannot be reached, with its families all the same)."""
    scraped = CollectorRegistry()
    scraped.register(QueueDepthCollector("amqp://guest:guest@127.0.0.1:1//", Topology(), "t"))
    text = (generate_latest(REGISTRY) + generate_latest(scraped)).decode()
    return set(re.findall(r"^# TYPE (\S+) ", text, flags=re.MULTILINE))


def _family(name: str) -> str:
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return name.removesuffix(suffix)
    return name


def _referenced(text: str) -> set[str]:
    return set(re.findall(r"\b((?:invoice_mailer|rabbitmq)_[a-z0-9_]+)", text))


def test_the_dashboard_reads_only_metrics_the_service_exports() -> None:
    dashboard = json.loads((OPS / "grafana" / "invoice-mailer.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    ours = {n for e in exprs for n in _referenced(e) if not n.startswith(EXTERNAL)}
    exported = {_family(n) for n in _exported()}
    assert ours, "the dashboard reads no metric of the service"
    assert {n for n in ours if _family(n) not in exported} == set()
    # Each of the service's families is on the dashboard, or said why not here.
    shown = {_family(n) for n in ours}
    assert {f for f in exported if f.startswith("invoice_mailer_")} - shown == set()


def test_the_alert_rules_read_only_metrics_the_service_exports() -> None:
    rules = (OPS / "prometheus" / "alerts.yml").read_text()
    exported = {_family(n) for n in _exported()}
    ours = {n for n in _referenced(rules) if not n.startswith(EXTERNAL)}
    assert ours
    assert {n for n in ours if _family(n) not in exported} == set()
