"""Conditions that are not about one event, against real workers: the API down for a
minute, nothing bound downstream. The fleet pauses and waits; nothing storms, nothing is
given up or dead-lettered, and every event is done once after."""

from __future__ import annotations

import time

import pytest

from sandbox import Sandbox
from tests.integration.conftest import StartWorker
from tests.support.broker import Bus, new_invoice

# A retry table that would give up after about 10 s of 5xx.
IMPATIENT = {
    "HTTP_TIMEOUT_SECONDS": "2",
    "RETRY_SERVER_ERROR_MAX_ATTEMPTS": "3",
    "RETRY_SERVER_ERROR_BASE_SECONDS": "1",
    "RETRY_SERVER_ERROR_MAX_SECONDS": "4",
    "EMAIL_INFO_LAG_SECONDS": "0",
}


def _loud(log: str) -> list[str]:
    return [line for line in log.splitlines() if "WARNING/" in line or "ERROR/" in line]


@pytest.mark.long
def test_an_api_down_for_a_minute_pauses_the_fleet_and_gives_up_nothing(
    start_worker: StartWorker, bus: Bus, sandbox: Sandbox
) -> None:
    """503 on every request for 60 s, 40 events, a retry table that gives up in 10 s:
    the circuit opens, intake pauses, one probe at a time asks the API; after, every
    event is done once, no invoice.email_failed, no dead letter."""
    workers = [start_worker(concurrency=8, **IMPATIENT) for _ in range(2)]
    sandbox.configure(failure_rates={503: 1.0})
    invoices = [new_invoice() for _ in range(40)]
    for invoice in invoices:
        bus.reissue(invoice)
    time.sleep(60)  # the outage itself
    during = len(sandbox.requests())
    sandbox.configure(failure_rates={})
    events = bus.wait_for(40, timeout=120)
    print(f"API down 60 s, 40 events, 2 workers: {during} requests during the outage")
    assert {e["type"] for e in events} == {"invoice.email_queued"}
    assert sorted(e["data"]["invoiceId"] for e in events) == sorted(invoices)
    assert all(len(sandbox.emails(invoice)) == 1 for invoice in invoices)
    assert bus.dead_letters() == []
    # Before the circuit opened: the first tries in flight; after: about one probe per
    # 2, 4, 8, 16, 30, 30 s (the fleet's, not each worker's).
    assert during <= 16 + 12
    logs = [w.log() for w in workers]
    assert any("api:hostup unhealthy" in log for log in logs)
    assert all("intake paused" in log for log in logs)
    loud = sum(len(_loud(log)) for log in logs)
    print(f"{loud} warning and error lines in all")
    assert loud <= 30


@pytest.mark.long
def test_nothing_bound_downstream_pauses_instead_of_storming(
    start_worker: StartWorker, broker_url: str, sandbox: Sandbox
) -> None:
    """A bus with no queue bound to the outgoing keys for 30 s: events wait (one probe
    publish at a time), no dead letter, a bounded log; once a queue is bound, every
    event goes out exactly once."""
    upstream = Bus(broker_url, listen=False)
    worker = start_worker(concurrency=8, **IMPATIENT)
    invoices = [new_invoice() for _ in range(30)]
    for invoice in invoices:
        upstream.reissue(invoice)
    time.sleep(30)  # nothing bound downstream, all that time
    downstream = Bus(broker_url)
    try:
        events = downstream.wait_for(30, timeout=90)
        settled = downstream.drain()
        letters = downstream.dead_letters()
    finally:
        downstream.close()
        upstream.close()
    assert sorted(e["data"]["invoiceId"] for e in settled) == sorted(invoices)
    assert len({e["id"] for e in settled}) == len(settled) == len(events) == 30
    assert letters == []
    assert all(len(sandbox.emails(invoice)) == 1 for invoice in invoices)
    log = worker.log()
    lines, loud = len(log.splitlines()), len(_loud(log))
    print(f"nothing bound 30 s, 30 events: {lines} log lines, {loud} warnings or errors")
    assert "bus unhealthy" in log
    assert loud <= 15
