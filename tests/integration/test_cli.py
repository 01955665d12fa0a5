"""The `invoice-mailer` command as an operator runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

from sandbox import Sandbox
from tests.integration.conftest import MakeEnv, StartWorker
from tests.support.broker import Bus


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from cli import main; main()", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_publish_reissued_puts_one_event_through_the_pipeline(
    start_worker: StartWorker, bus: Bus, env: MakeEnv
) -> None:
    """publish-reissued INVOICE: a real event on the broker, processed by a real worker."""
    start_worker()
    invoice = f"inv_{uuid.uuid4().hex[:12]}"
    result = _cli(
        "publish-reissued",
        invoice,
        "--event-id",
        "evt_cli_1",
        env=env(),
    )
    assert result.returncode == 0, result.stderr
    published = json.loads(result.stdout)
    assert published["data"] == {"invoiceId": invoice}
    [event] = bus.wait_for(1)
    assert event["data"]["reissuedEvent"] == {"id": "evt_cli_1", "source": "/billing"}


def test_publish_reissued_without_a_worker_leaves_the_event_queued(bus: Bus, env: MakeEnv) -> None:
    """With no worker yet, the event waits in its durable queue instead of vanishing."""
    result = _cli("publish-reissued", "inv_waiting1", env=env())
    assert result.returncode == 0, result.stderr
    assert bus.queue_depth("invoice-mailer.reissued") == 1


def test_publish_reissued_publishes_many_in_one_process(bus: Bus, env: MakeEnv) -> None:
    """Several invoices, a count each, and more from standard input: one connection, a
    JSON line per event, each id its own; --event-id with more than one is refused."""
    result = subprocess.run(
        [sys.executable, "-c", "from cli import main; main()", "publish-reissued",
         "inv_many1", "inv_many2", "--count", "3", "--from-file", "-"],
        env=env(), input="inv_many3\n\ninv_many4\n", capture_output=True, text=True,
        timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    invoices = [e["data"]["invoiceId"] for e in events]
    assert invoices == ["inv_many1"] * 3 + ["inv_many2"] * 3 + ["inv_many3"] * 3 + ["inv_many4"] * 3
    assert len({e["id"] for e in events}) == 12
    assert "published 12 event(s) in " in result.stderr
    assert bus.queue_depth("invoice-mailer.reissued") == 12
    refused = _cli("publish-reissued", "inv_a", "inv_b", "--event-id", "evt_1", env=env())
    assert refused.returncode == 2
    assert "--event-id names one event" in refused.stderr


def test_check_passes_against_a_reachable_broker_and_api(env: MakeEnv, sandbox: Sandbox) -> None:
    """All three checks pass: exit 0, and no invoice was resent."""
    result = _cli("check", env=env())
    assert result.returncode == 0, result.stdout + result.stderr
    assert [line.split()[:2] for line in result.stdout.splitlines()] == [
        ["settings", "ok"],
        ["broker", "ok"],
        ["billing", "ok"],
        ["ledger", "ok"],
    ]
    assert sandbox.requests(endpoint="resend") == []


def test_check_json_is_one_object_for_scripts(env: MakeEnv, sandbox: Sandbox) -> None:
    passed = _cli("check", "--json", env=env())
    assert passed.returncode == 0, passed.stdout + passed.stderr
    report = json.loads(passed.stdout)
    assert (report["ok"], report["exit"], report["unhealthy"]) == (True, 0, [])
    assert list(report["checks"]) == ["settings", "broker", "billing", "ledger"]
    assert all(c["ok"] for c in report["checks"].values())
    failed = _cli("check", "--json", env=env(CELERY_BROKER_URL="amqp://guest:sekret@127.0.0.1:1//"))
    assert failed.returncode == 2
    report = json.loads(failed.stdout)
    assert (report["ok"], report["exit"], report["checks"]["broker"]["ok"]) == (False, 2, False)
    assert "sekret" not in failed.stdout


def test_check_exits_2_when_the_broker_is_unreachable(env: MakeEnv) -> None:
    """A broker that does not answer: exit 2, the URL shown without its password."""
    result = _cli("check", env=env(CELERY_BROKER_URL="amqp://guest:sekret@127.0.0.1:1//"))
    assert result.returncode == 2
    assert "broker     FAILED" in result.stdout
    assert "sekret" not in result.stdout + result.stderr


def test_check_exits_3_when_the_api_rejects_the_key(env: MakeEnv) -> None:
    """Wrong API key: exit 3, credentials named as the problem, the key not printed."""
    result = _cli("check", env=env(HOSTUP_API_KEY="wrong-key-123"))
    assert result.returncode == 3
    assert "credentials rejected (401)" in result.stdout
    assert "wrong-key-123" not in result.stdout + result.stderr


def test_check_exits_3_when_the_api_is_down(env: MakeEnv) -> None:
    """Nothing listening at the API's address: exit 3."""
    result = _cli("check", env=env(HOSTUP_API_BASE_URL="http://127.0.0.1:9/api/v2"))
    assert result.returncode == 3
    assert "billing    FAILED" in result.stdout


def test_check_and_status_say_which_dependency_the_fleet_sees_unhealthy_and_why(
    env: MakeEnv, ledger_url: str
) -> None:
    """The bus opened by a worker (shared health, in the ledger's database): check exits
    5 naming it and why, although its own probes of broker and API pass; status shows it."""
    import time

    from invoice_mailer.health import BreakerPolicy, healthy, opened
    from invoice_mailer.ledger import open_ledger

    ledger = open_ledger(ledger_url)
    now = time.time()
    ledger.put(opened(healthy("bus", now - 42), now - 42, "unroutable: NO_ROUTE", BreakerPolicy()))
    ledger.close()
    checked = _cli("check", env=env())
    assert checked.returncode == 5, checked.stdout + checked.stderr
    assert "bus" in checked.stdout
    assert "OPEN" in checked.stdout
    assert "unroutable: NO_ROUTE" in checked.stdout
    shown = _cli("status", env=env())
    assert shown.returncode == 0, shown.stderr
    [row] = [line for line in shown.stdout.splitlines() if line.split()[:2] == ["bus", "open"]]
    assert "NO_ROUTE" in row
    assert any(line.split()[:2] == ["api:hostup", "healthy"] for line in shown.stdout.splitlines())


def test_demo_runs_every_scenario_to_its_outcome() -> None:
    """The quick-start demo exits 0 and shows each sample event's outcome."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CELERY_", "HOSTUP_"))}
    result = _cli("demo", "--quiet", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = {line.split()[0]: line for line in result.stdout.splitlines() if line.startswith("evt_")}
    assert set(rows) == {f"evt_demo_{n}" for n in range(1, 7)}
    for n in (1, 2, 3, 5):
        assert " email_queued " in rows[f"evt_demo_{n}"]
    assert "resend: not_found (dead-lettered)" in rows["evt_demo_4"]
    assert "validate: invalid_invoice_id (dead-lettered)" in rows["evt_demo_6"]


def test_ledger_show_and_prune(start_worker: StartWorker, bus: Bus, env: MakeEnv) -> None:
    """`ledger show` prints what the ledger knows; `ledger prune` removes finished records."""
    start_worker()
    invoice = f"inv_{uuid.uuid4().hex[:12]}"
    bus.reissue(invoice, event_id="evt_ledger_1")
    [event] = bus.wait_for(1)

    shown = _cli("ledger", "show", "evt_ledger_1", env=env())
    assert shown.returncode == 0, shown.stderr
    [record] = json.loads(shown.stdout)
    assert record["state"] == "published"
    assert record["invoice"] == invoice
    assert record["outcome_event_id"] == event["id"]
    assert record["resend"]["email"] is None  # out in the event, not kept after it
    assert record["resend"]["queuedAt"] == event["data"]["queuedAt"]

    kept = _cli("ledger", "prune", "--older-than", "1d", env=env())
    assert "pruned 0 record(s)" in kept.stdout
    pruned = _cli("ledger", "prune", "--older-than", "0s", env=env())
    assert "pruned 1 record(s)" in pruned.stdout
    assert _cli("ledger", "show", "evt_ledger_1", env=env()).returncode == 1
    assert _cli("ledger", "prune", "--older-than", "soon", env=env()).returncode == 2
