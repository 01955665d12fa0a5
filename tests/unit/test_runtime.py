"""The worker's per-process runtime, prepared at start (issue 23: the first event waits
for nothing it could have had ready)."""

from __future__ import annotations

import time
from pathlib import Path

from prometheus_client import REGISTRY

from invoice_mailer.health import Health, State
from invoice_mailer.ledger import open_ledger
from settings import Settings
from tasks._runtime import Runtime


def _runtime(ledger_url: str) -> Runtime:
    return Runtime(
        Settings(celery_broker_url="memory://", hostup_api_key="k", ledger_url=ledger_url)
    )


def test_warm_builds_the_ledger_client_and_publisher_before_any_event(tmp_path: Path) -> None:
    runtime = _runtime(f"sqlite:///{tmp_path}/ledger.sqlite3")
    try:
        runtime.warm()
        assert (tmp_path / "ledger.sqlite3").exists()
        assert runtime._pipeline is not None
        assert runtime.unhealthy() == []
    finally:
        runtime.close()


def test_warm_with_a_ledger_that_cannot_open_returns_and_reports_it(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")  # a directory cannot be made under a file
    runtime = _runtime(f"sqlite:///{blocker}/ledger.sqlite3")
    try:
        runtime.warm()
        assert runtime._pipeline is None
        [reason] = runtime.unhealthy()
        assert reason.startswith("ledger: cannot open SQLite ledger")
    finally:
        runtime.close()


def test_a_due_probe_opens_intake_but_not_readiness_nor_the_paused_gauge(
    tmp_path: Path,
) -> None:
    """The ledger says the API is down, its probe due: intake takes events (one can be
    the probe), readiness and the intake gauge still say paused."""
    url = f"sqlite:///{tmp_path}/ledger.sqlite3"
    ledger = open_ledger(url)
    now = time.time()
    ledger.put(Health("api:hostup", State.OPEN, since=now - 60, retry_at=now, detail="503"))
    ledger.close()
    runtime = _runtime(url)
    try:
        runtime.warm()
        runtime.watch_health(first_turn_wait=5.0)
        assert runtime.paused_because == []
        assert runtime.unhealthy_because == ["api:hostup: 503"]
        assert REGISTRY.get_sample_value("invoice_mailer_intake_paused") == 1
    finally:
        runtime.close()
