"""What operators deploy beside the service: the Prometheus alert rules (tested with
promtool) and the Grafana dashboard (every metric it reads is one the service exports)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.exposition import generate_latest

from broker import Topology
from settings import Settings, load
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


def _example() -> dict[str, str]:
    lines = (OPS.parent / ".env.example").read_text().splitlines()
    pairs = [line.split("=", 1) for line in lines if line and not line.startswith("#")]
    return {name: value for name, value in pairs}


def test_the_env_example_names_every_setting_and_nothing_else() -> None:
    """Every setting is documented in .env.example; every name there is read by the
    service (or by prometheus-client, which the README says)."""
    example = _example()
    settings = {name.upper() for name in Settings.model_fields}
    assert set(example) - {"PROMETHEUS_MULTIPROC_DIR"} == settings


def test_the_env_example_loads_as_it_is_once_the_key_is_set(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in _example().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("HOSTUP_API_KEY", "k")
    settings = load(require_provider=True)
    assert (settings.billing_provider, settings.metrics_port) == ("hostup", 9808)


@pytest.mark.parametrize(
    "unit", ["invoice-mailer-worker@.service", "invoice-mailer-flower.service"]
)
def test_the_systemd_units_verify(unit: str, tmp_path: Path) -> None:
    """``systemd-analyze verify`` where it is available, with the venv path pointed at
    this one (verify wants the command to exist)."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not available here")
    bin_dir = Path(sys.executable).parent
    text = (OPS / "systemd" / unit).read_text()
    assert "/opt/invoice-mailer/venv/bin/celery -A tasks" in text
    name = unit.replace("@.", "@1.")
    (tmp_path / name).write_text(text.replace("/opt/invoice-mailer/venv/bin", str(bin_dir)))
    verified = subprocess.run(
        [analyze, "verify", str(tmp_path / name)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    problems = [
        line
        for line in (verified.stdout + verified.stderr).splitlines()
        if name in line or "Unknown" in line or "Invalid" in line
    ]
    assert problems == []
    assert verified.returncode == 0, verified.stdout + verified.stderr
