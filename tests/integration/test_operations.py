"""Operations from the outside: Flower, the metrics endpoint, JSON logs, `status`."""

from __future__ import annotations

import contextlib
import json
import re
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from sandbox import DEFAULT_API_KEY, Fault, Sandbox
from tests.integration.conftest import MakeEnv, StartWorker
from tests.support.broker import Bus, new_invoice, wait_until
from tests.support.browser import rendered
from tests.support.worker import RAW_QUEUE

TASK = "invoice_mailer.resend_invoice_email"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _mixed_run(bus: Bus, sandbox: Sandbox) -> dict[str, str]:
    """Success, 429 then success, 503 then success, 404, and one invalid event."""
    invoices = {
        "ok": new_invoice(),
        "limited": new_invoice(),
        "flaky": new_invoice(),
        "gone": new_invoice(),
    }
    sandbox.script(invoices["limited"], "resend", [Fault(status=429, retry_after="1")])
    sandbox.script(invoices["flaky"], "resend", [Fault(status=503)])
    sandbox.script(invoices["gone"], "resend", [Fault(status=404)])
    for invoice in invoices.values():
        bus.reissue(invoice)
    bus.publish_raw(b"{not json")
    bus.wait_for(5, timeout=60)
    return invoices


@pytest.fixture
def flower(env: MakeEnv, tmp_path: Path) -> Iterator[str]:
    port = _free_port()
    log = (tmp_path / "flower.log").open("wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "tasks",
            "flower",
            f"--port={port}",
            "--address=127.0.0.1",
        ],
        env=env(FLOWER_BASIC_AUTH="ops:s3cret"),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _answers(f"{url}/healthcheck"), timeout=60, what="Flower to start")
        yield url
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_flower_shows_the_tasks_behind_basic_auth(
    start_worker: StartWorker, bus: Bus, sandbox: Sandbox, flower: str
) -> None:
    """Flower lists the pipeline tasks by name and outcome: a done event is a success, a
    given-up one a failure naming its reason; its API needs the password."""
    worker = start_worker()
    auth = ("ops", "s3cret")
    online = f'flower_worker_online{{worker="{worker.name}"}} 1.0'
    wait_until(
        lambda: online in httpx.get(f"{flower}/metrics").text,
        timeout=60,
        what="Flower to see the worker",
    )
    gone = new_invoice()
    sandbox.script(gone, "resend", [Fault(status=404)])
    bus.reissue(new_invoice())
    bus.reissue(gone)
    bus.wait_for(2)

    def tasks() -> dict[str, dict[str, object]]:
        return httpx.get(f"{flower}/api/tasks", auth=auth).json()  # type: ignore[no-any-return]

    wait_until(
        lambda: sorted(str(t["state"]) for t in tasks().values()) == ["FAILURE", "SUCCESS"],
        timeout=30,
        what="Flower to list one succeeded and one failed task",
    )
    listed = list(tasks().values())
    assert {t["name"] for t in listed} == {TASK}
    [done] = [t for t in listed if t["state"] == "SUCCESS"]
    [failed] = [t for t in listed if t["state"] == "FAILURE"]
    assert "'outcome': 'email_queued'" in str(done["result"])
    assert str(failed["exception"]).startswith("EventGaveUp('resend 404 not_found:")
    assert httpx.get(f"{flower}/api/tasks").status_code == 401
    assert httpx.get(f"{flower}/api/tasks", auth=("ops", "wrong")).status_code == 401
    metrics = httpx.get(f"{flower}/metrics").text
    for kind in ("task-succeeded", "task-failed"):
        counted = f'flower_events_total{{task="{TASK}",type="{kind}",worker="{worker.name}"}}'
        assert f"{counted} 1.0" in metrics

    # As an operator sees it: the pages, in a real browser (their tables are drawn by
    # the pages' scripts from Flower's API).
    signed_in = flower.replace("http://", "http://ops:s3cret@")
    page = rendered(f"{signed_in}/tasks")
    rows = re.findall(r"<tr[^>]*>(.*?)</tr>", page, flags=re.DOTALL)
    shown = [re.sub(r"<[^>]+>", " ", row) for row in rows if TASK in row]
    assert len(shown) == 2, page[-3000:]
    assert any("SUCCESS" in row for row in shown)
    assert any("FAILURE" in row for row in shown)
    detail = re.sub(r"<[^>]+>", " ", rendered(f"{signed_in}/task/{failed['uuid']}"))
    assert TASK in detail
    assert "FAILURE" in detail
    assert "resend 404 not_found" in detail


def test_metrics_count_a_mixed_run(start_worker: StartWorker, bus: Bus, sandbox: Sandbox) -> None:
    """After success, 429, 5xx, 404 and an invalid event each counter has its value."""
    port = _free_port()
    start_worker(METRICS_PORT=port, RETRY_SERVER_ERROR_BASE_SECONDS="1")
    _mixed_run(bus, sandbox)
    url = f"http://127.0.0.1:{port}"
    expected = {
        "invoice_mailer_events_received_total": 4,
        'invoice_mailer_events_invalid_total{code="not_json"}': 1,
        'invoice_mailer_resends_total{outcome="done",provider="hostup"}': 3,
        'invoice_mailer_resends_total{outcome="rate_limited",provider="hostup"}': 1,
        'invoice_mailer_resends_total{outcome="server_error",provider="hostup"}': 1,
        'invoice_mailer_resends_total{outcome="gave_up",provider="hostup"}': 1,
        'invoice_mailer_retries_total{class="429",step="resend"}': 1,
        'invoice_mailer_retries_total{class="5xx",step="resend"}': 1,
        'invoice_mailer_give_ups_total{code="not_found",step="resend"}': 1,
        'invoice_mailer_dead_letters_total{code="not_found"}': 1,
        'invoice_mailer_dead_letters_total{code="not_json"}': 1,
        'invoice_mailer_events_published_total{type="invoice.email_queued"}': 3,
        'invoice_mailer_events_published_total{type="invoice.email_failed"}': 2,
        'invoice_mailer_step_duration_seconds_count{step="resend"}': 6,
        'invoice_mailer_step_duration_seconds_count{step="email_info"}': 3,
        'invoice_mailer_wait_seconds_count{kind="rate_limited"}': 1,
        'invoice_mailer_queue_messages{queue="dead_letter",state="ready"}': 2,
        'invoice_mailer_queue_messages{queue="reissued",state="ready"}': 0,
        "invoice_mailer_broker_up": 1,
    }

    def scraped() -> dict[str, float]:
        text = httpx.get(f"{url}/metrics").text
        return {
            line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line and not line.startswith("#")
        }

    wait_until(
        lambda: all(scraped().get(k) == v for k, v in expected.items()),
        timeout=30,
        what="the counters to reach their values",
    )
    values = scraped()
    assert {k: values.get(k) for k in expected} == expected
    assert httpx.get(f"{url}/livez").status_code == 200
    assert httpx.get(f"{url}/readyz").status_code == 200


def test_json_logs_one_line_per_event_without_addresses_or_keys(
    start_worker: StartWorker, bus: Bus
) -> None:
    """LOG_FORMAT=json: an event that goes well is one INFO JSON line with its fields."""
    worker = start_worker(LOG_FORMAT="json")
    invoice = new_invoice()
    event = bus.reissue(invoice)
    bus.wait_for(1)
    worker.stop()
    lines = [
        json.loads(line)
        for line in worker.log_path.read_text().splitlines()
        if line.startswith("{")
    ]
    mine = [r for r in lines if r.get("event_id") == event["id"]]
    assert [(r["step"], r["outcome"], r["level"]) for r in mine] == [
        ("publish", "published", "INFO")
    ]
    assert mine[0]["invoice"] == invoice
    assert mine[0]["provider"] == "hostup"
    assert "duration_seconds" in mine[0]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", mine[0]["time"])
    assert mine[0]["task_id"]  # the Celery task execution it belongs to
    text = worker.log_path.read_text()
    assert "billing@example.com" not in text
    assert DEFAULT_API_KEY not in text
    # Celery's banner is one JSON line, not 29 plain ones.
    assert [r["logger"] for r in lines if r["message"] == "worker starting"] == [
        "invoice_mailer.startup"
    ]
    assert "[queues]" not in text
    assert "-------------- " not in text


def test_console_logs_name_the_event_invoice_and_task_in_utc(
    start_worker: StartWorker, bus: Bus
) -> None:
    """The default format: each line a person greps for carries the event id, the
    invoice and the Celery task id, stamped in RFC 3339 UTC."""
    worker = start_worker()
    invoice = new_invoice()
    event = bus.reissue(invoice)
    bus.wait_for(1)
    worker.stop()
    (line,) = [x for x in worker.log_path.read_text().splitlines() if event["id"] in x]
    assert re.match(r"\[\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z INFO/", line), line
    assert "publish published" in line
    assert f"event_id={event['id']} invoice={invoice} task_id=" in line


def test_status_shows_queues_dead_letters_ledger_and_workers(
    start_worker: StartWorker, bus: Bus, sandbox: Sandbox, env: MakeEnv
) -> None:
    """One screen: queue depths, dead letters by reason, ledger counts, live workers."""
    worker = start_worker(RETRY_SERVER_ERROR_BASE_SECONDS="1")
    _mixed_run(bus, sandbox)
    result = subprocess.run(
        [sys.executable, "-c", "from cli import main; main()", "status"],
        env=env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert re.search(r"dead_letter\s+ready\s+2", out)
    assert re.search(r"not_found\s+1", out)
    assert re.search(r"not_json\s+1", out)
    assert re.search(r"published\s+3", out)
    assert re.search(r"failed\s+1", out)
    assert re.search(rf"{re.escape(worker.name)}\s+pong", out)


def test_status_json_and_watch_show_tasks_in_flight_per_worker(
    start_worker: StartWorker, bus: Bus, sandbox: Sandbox, env: MakeEnv
) -> None:
    """``status --json`` is one object a script reads; ``--watch`` redraws; a task held up
    by a slow API shows as in flight on its worker."""
    worker = start_worker()
    invoice, limited = new_invoice(), new_invoice()
    sandbox.script(invoice, "resend", [Fault(status=None, delay=15.0)])
    sandbox.script(limited, "resend", [Fault(status=429, retry_after="30")])
    bus.reissue(invoice)
    bus.reissue(limited)
    wait_until(lambda: len(sandbox.requests()) == 2, timeout=30, what="both POSTs")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", "from cli import main; main()", "status", *args],
            env=env(), capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip

    snapshots: list[dict[str, Any]] = []

    def parked() -> bool:
        shown = run("--json")
        assert shown.returncode == 0, shown.stderr
        snapshots.append(json.loads(shown.stdout))
        return bool(snapshots[-1]["parked"])

    wait_until(parked, timeout=30, what="status to show the parked retry")
    snapshot = snapshots[-1]
    assert snapshot["workers"] == {worker.name: {"in_flight": 1}}
    assert snapshot["parked"] == {"resend rate_limited": 1}  # its 429 parks it 30 s
    assert snapshot["queues"]["dead_letter ready"] == 0
    assert {d["dependency"]: d["state"] for d in snapshot["dependencies"]}["bus"] == "healthy"
    watched = run("--watch", "0.5", "--times", "2")
    assert watched.returncode == 0, watched.stderr
    assert watched.stdout.count("every 0.5 s, Ctrl-C to stop") == 2
    assert re.search(rf"{re.escape(worker.name)}\s+pong\s+1", watched.stdout)
    assert re.search(r"resend\s+rate_limited\s+1", watched.stdout)


def test_a_backlog_stays_in_the_broker_beyond_two_events_per_thread(
    start_worker: StartWorker, bus: Bus, sandbox: Sandbox
) -> None:
    """Prefetch is bounded by the pool: with its 2 threads held up by a slow API, a
    worker holds 4 raw events and the rest of 12 stays ready in RabbitMQ."""
    start_worker(concurrency=2)
    for _ in range(12):
        invoice = new_invoice()
        sandbox.script(invoice, "resend", [Fault(status=None, delay=20.0)])
        bus.reissue(invoice)

    wait_until(lambda: len(sandbox.requests()) == 2, timeout=30, what="two POSTs in flight")
    wait_until(lambda: bus.queue_depth(RAW_QUEUE) == 8, timeout=30, what="4 events taken, 8 ready")
    assert len(sandbox.requests()) == 2  # the two taken beyond them wait for a thread


def test_a_dead_letter_queue_of_another_type_stops_the_worker_naming_the_setting(
    start_worker: StartWorker, broker_url: str
) -> None:
    """The dead-letter queue exists classic (as 0.3 declared it); a worker configured for
    quorum cannot redeclare it: it stops at once, exit 78, one line naming the queue
    and DEAD_LETTER_QUEUE_TYPE, instead of crashing with a traceback or running on."""
    from kombu import Connection

    from broker import Topology

    with Connection(broker_url) as conn:
        Topology().declare(conn)  # classic, the default
    worker = start_worker(wait=False, DEAD_LETTER_QUEUE_TYPE="quorum")
    assert worker.proc is not None
    assert worker.proc.wait(timeout=60) == 78
    told = [line for line in worker.whole_log().splitlines() if "invalid setting" in line]
    assert len(told) == 1, worker.log()
    assert "'invoice-mailer.dead-letter'" in told[0]
    assert "DEAD_LETTER_QUEUE_TYPE" in told[0]
    assert "Traceback" not in worker.whole_log()


def test_a_worker_takes_raw_events_only_once_it_is_prepared(
    start_worker: StartWorker, broker_url: str, ledger_url: str
) -> None:
    """The first events after start wait for nothing: the moment the raw-event queue has
    the worker as its consumer, the delay queues its retries need are declared and its
    ledger is open and migrated (issue 23: light-load latency from the first event)."""
    from kombu import Connection

    from tests.support.worker import _raw_consumers

    worker = start_worker(wait=False)
    with Connection(broker_url) as conn:

        def consuming() -> bool:
            assert worker.proc is not None
            assert worker.proc.poll() is None, worker.log()
            return _raw_consumers(conn) > 0

        wait_until(consuming, timeout=60, what="the raw-event consumer")
        with conn.channel() as channel:  # passive: fails if it is not there
            channel.queue_declare("celery_delayed_27", passive=True)
    ledger = Path(ledger_url.removeprefix("sqlite:///"))
    with contextlib.closing(sqlite3.connect(ledger)) as db:
        tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master")}
    assert "invoice_mailer_ledger" in tables
