"""One record of truth per event, one runtime per attempt, tried from outside.

Faults that interleave with each other and with slow answers: a broker restart
while the API is slow, a bus with nothing bound downstream while an event is
given up, a ledger that is down when the worker starts. And what an operator's
Celery tools see of a first attempt: ``inspect active``, ``revoke``, task events.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import pytest
from celery import Celery

from invoice_mailer.job import EventRef
from invoice_mailer.ledger import open_ledger
from sandbox import Fault, Sandbox
from tasks.pipeline import TASK_NAME, task_id_for
from tests.integration.conftest import StartWorker
from tests.support.broker import Bus, new_invoice, restart_rabbitmq, wait_until
from tests.support.gate import TcpGate
from tests.support.postgres import PG_PORT
from tests.support.tasks import TaskWatcher

QUICK = {
    "HTTP_TIMEOUT_SECONDS": "2",
    "RETRY_SERVER_ERROR_BASE_SECONDS": "1",
    "RETRY_SERVER_ERROR_MAX_SECONDS": "4",
}
BROKER_DOWN_SECONDS = 12  # longer than a run's lease (2 x 2 s + 5 s)


def _task_id(event: dict[str, Any]) -> str:
    ref = EventRef(id=event["id"], source=event["source"], invoice=event["data"]["invoiceId"])
    return task_id_for(ref)


def _counts(ledger_url: str) -> dict[str, int]:
    ledger = open_ledger(ledger_url)
    try:
        return ledger.counts()
    finally:
        ledger.close()


def test_a_broker_restart_mid_burst_with_slow_answers_sends_no_second_post(
    start_worker: StartWorker, broker_url: str, sandbox: Sandbox, ledger_url: str
) -> None:
    """600 events, 100 ms API answers, the broker down 12 s mid-burst (past every lease):
    every invoice one POST and one email-info GET (no run had to look for a resend it
    did not know the fate of), every event exactly one outgoing event id."""
    bus = Bus(broker_url, capture="test.capture.durable")  # survives the restart
    sandbox.configure(latency=0.1)
    worker = start_worker(concurrency=48, **QUICK)
    invoices = [new_invoice() for _ in range(600)]
    for invoice in invoices:
        bus.reissue(invoice)
    bus.wait_for(60, timeout=60)
    before = bus.all_received()
    bus.close()

    restart_rabbitmq(down_seconds=BROKER_DOWN_SECONDS)

    wait_until(
        lambda: _counts(ledger_url).get("published", 0) >= len(invoices),
        timeout=300,
        what="600 events published in the ledger",
    )
    worker.stop()
    events = before + Bus.drained(broker_url, "test.capture.durable")
    assert len(before) < len(invoices)  # the restart really came mid-burst
    posts = Counter(r.path for r in sandbox.requests(endpoint="resend"))
    assert len(posts) == len(invoices)
    assert {path: n for path, n in posts.items() if n > 1} == {}
    gets = Counter(r.path for r in sandbox.requests(endpoint="email_info"))
    assert len(gets) == len(invoices)
    assert {path: n for path, n in gets.items() if n > 1} == {}
    ids: dict[str, set[str]] = {}
    for event in events:
        assert event["type"] == "invoice.email_queued"
        ids.setdefault(event["data"]["invoiceId"], set()).add(event["id"])
    assert set(ids) == set(invoices)
    assert all(len(v) == 1 for v in ids.values())
    print(f"events out before the restart: {len(before)}; copies of one id: {len(events) - 600}")


def test_with_nothing_bound_downstream_a_given_up_event_has_one_dead_letter_and_one_get(
    start_worker: StartWorker, broker_url: str, sandbox: Sandbox, broker_watcher: TaskWatcher
) -> None:
    """Nothing bound to the outgoing keys while one event is given up (404) and another
    is done: each retries its publication, yet one dead letter in all and one email-info
    GET; once a queue is bound both come out."""
    upstream = Bus(broker_url, listen=False)
    start_worker(concurrency=4, **QUICK)
    gone, fine = new_invoice(), new_invoice()
    sandbox.script(gone, "resend", [Fault(status=404)])
    events = [upstream.reissue(gone), upstream.reissue(fine)]
    task_ids = [_task_id(e) for e in events]
    wait_until(
        lambda: all(broker_watcher.retried[t] >= 3 for t in task_ids),
        timeout=60,
        what="three publish retries of each event",
    )
    downstream = Bus(broker_url)
    try:
        out = downstream.wait_for(2, timeout=60)
        letters = downstream.dead_letters()
    finally:
        downstream.close()
        upstream.close()
    assert sorted(e["type"] for e in out) == ["invoice.email_failed", "invoice.email_queued"]
    assert [letter.headers["x-invoice-mailer-reason-code"] for letter in letters] == ["not_found"]
    assert len(sandbox.requests(invoice=gone, endpoint="resend")) == 1
    assert len(sandbox.requests(invoice=fine, endpoint="resend")) == 1
    assert len(sandbox.requests(invoice=fine, endpoint="email_info")) == 1
    assert len(sandbox.requests(invoice=gone, endpoint="email_info")) == 0


def test_a_ledger_down_when_the_worker_starts_makes_events_wait_then_complete(
    start_worker: StartWorker, bus: Bus, sandbox: Sandbox, postgres_url: str
) -> None:
    """PostgreSQL unreachable for 15 s as the worker takes its first 20 events: they wait
    (in the broker), and once it is back each is done once: no email_failed, no dead
    letter, one POST per invoice; and the outage is a few log lines, not one per event."""
    gate = TcpGate(PG_PORT)
    gated_url = postgres_url.replace(f":{PG_PORT}/", f":{gate.port}/")
    worker = start_worker(concurrency=8, LEDGER_URL=gated_url, **QUICK)
    invoices = [new_invoice() for _ in range(20)]
    for invoice in invoices:
        bus.reissue(invoice)
    wait_until(
        lambda: "ledger unavailable" in worker.whole_log(), timeout=60, what="the ledger seen down"
    )
    time.sleep(15)  # the outage itself: how long the ledger stays away
    assert sandbox.requests(endpoint="resend") == []  # nothing is sent without the ledger
    gate.open()
    try:
        out = bus.wait_for(20, timeout=120)
    finally:
        gate.close()
    assert {e["type"] for e in out} == {"invoice.email_queued"}
    assert sorted(e["data"]["invoiceId"] for e in out) == sorted(invoices)
    assert len(sandbox.requests(endpoint="resend")) == 20
    assert bus.dead_letters() == []
    log = worker.whole_log()
    assert "unexpected error" not in log
    about = [line for line in log.splitlines() if "ledger" in line and "unavailable" in line]
    loud = [line for line in log.splitlines() if "WARNING/" in line or "ERROR/" in line]
    print(f"ledger down 15 s, 20 events: {len(about)} lines say so, {len(loud)} warnings in all")
    assert 1 <= len(about) <= 3
    assert len(loud) <= 20  # psycopg_pool's reconnect attempts, a pause and a resume
    assert "ledger available again" in log


def _inspect(broker_url: str, what: str) -> dict[str, list[dict[str, Any]]]:
    control = Celery(broker=broker_url, set_as_current=False)
    try:
        replies = getattr(control.control.inspect(timeout=1), what)()
    finally:
        control.close()
    return replies or {}


def test_celery_inspect_active_lists_a_first_attempt_in_flight(
    start_worker: StartWorker, bus: Bus, sandbox: Sandbox, broker_url: str
) -> None:
    """While the API holds a first attempt's POST, `celery inspect active` shows it, by the
    task name and the id derived from its event."""
    start_worker(concurrency=4, **QUICK)
    invoice = new_invoice()
    sandbox.script(invoice, "resend", [Fault(status=None, delay=1.5)])
    task_id = _task_id(bus.reissue(invoice))

    def listed() -> bool:
        active = [t for ts in _inspect(broker_url, "active").values() for t in ts]
        return any(t["id"] == task_id and t["name"] == TASK_NAME for t in active)

    wait_until(listed, timeout=30, what="the first attempt in `inspect active`")
    assert bus.wait_for(1, timeout=30)[0]["type"] == "invoice.email_queued"


def test_a_revoked_event_is_not_run(
    start_worker: StartWorker, bus: Bus, sandbox: Sandbox, broker_url: str
) -> None:
    """`celery control revoke` of an event's task id before it arrives: the worker drops
    it (task-revoked) and the API hears nothing; the next event flows."""
    start_worker(concurrency=4, **QUICK)
    watcher = TaskWatcher(broker_url)
    try:
        revoked, other = new_invoice(), new_invoice()
        event = {"id": f"evt_{revoked}", "source": "/billing"}
        task_id = task_id_for(EventRef(invoice=revoked, **event))
        control = Celery(broker=broker_url, set_as_current=False)
        try:
            replies = control.control.revoke(task_id, reply=True, timeout=2)
        finally:
            control.close()
        assert replies, "no worker answered the revoke"
        bus.reissue(revoked, event_id=event["id"])
        bus.reissue(other)
        assert bus.wait_for(1, timeout=30)[0]["data"]["invoiceId"] == other
        wait_until(
            lambda: watcher.latest.get(task_id) == "task-revoked",
            timeout=30,
            what="task-revoked for the revoked event",
        )
    finally:
        watcher.close()
    assert sandbox.requests(invoice=revoked) == []


def test_a_given_up_event_is_a_failed_task_and_a_retry_says_what_it_waits_for(
    start_worker: StartWorker, bus: Bus, sandbox: Sandbox, broker_watcher: TaskWatcher
) -> None:
    """Celery's own task events: a 404 give-up is task-failed naming the step, status and
    code; a 503 then success is task-retried saying what it waits for, then succeeded."""
    start_worker(concurrency=4, **QUICK)
    gone, flaky = new_invoice(), new_invoice()
    sandbox.script(gone, "resend", [Fault(status=404)])
    sandbox.script(flaky, "resend", [Fault(status=503)])
    gone_id, flaky_id = _task_id(bus.reissue(gone)), _task_id(bus.reissue(flaky))
    bus.wait_for(2, timeout=60)
    broker_watcher.wait_settled(2, timeout=60)
    assert broker_watcher.latest[gone_id] == "task-failed"
    (failure,) = broker_watcher.exceptions[gone_id]
    assert failure.startswith("EventGaveUp('resend 404 not_found:")
    assert broker_watcher.latest[flaky_id] == "task-succeeded"
    (retry,) = broker_watcher.exceptions[flaky_id]
    assert retry.startswith("Waiting('resend 503 ")
    assert ", retry in " in retry


@pytest.fixture
def broker_watcher(broker_url: str) -> Any:
    watcher = TaskWatcher(broker_url)
    yield watcher
    watcher.close()
