"""Resilience and scale: shutdown mid-burst, a broker restart, many workers, poison,
a misbehaving API, and a long run. Nothing lost, nothing doubled.

Completion is read from the ledger: once every event is *published* there, no run
can publish for it again, so stopping the workers and draining the capture queue
gives the final count.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from broker import Topology
from invoice_mailer.ledger import open_ledger
from sandbox import Fault, Sandbox
from tests.integration.conftest import MakeEnv, StartWorker
from tests.support.broker import Bus, new_invoice, restart_rabbitmq, wait_until
from tests.support.worker import WorkerProcess

REPO = Path(__file__).resolve().parents[2]
QUICK = {
    "HTTP_TIMEOUT_SECONDS": "2",
    "RETRY_SERVER_ERROR_BASE_SECONDS": "1",
    "RETRY_SERVER_ERROR_MAX_SECONDS": "4",
}


def _published(ledger_url: str) -> int:
    ledger = open_ledger(ledger_url)
    try:
        return ledger.counts().get("published", 0)
    finally:
        ledger.close()


def _wait_published(ledger_url: str, n: int, timeout: float) -> None:
    wait_until(
        lambda: _published(ledger_url) >= n,
        timeout=timeout,
        what=f"{n} events published in the ledger",
    )


def _exactly_once(
    events: list[dict[str, Any]],
    invoices: list[str],
    sandbox: Sandbox,
    *,
    same_id_copies_allowed: bool = False,
) -> None:
    """One email per invoice, one outgoing event per invoice.

    ``same_id_copies_allowed``: across a broker restart a publish whose confirm was
    lost is published again, with the same id (CONTRACT.md: downstream deduplicates
    on it); and a capture-queue ack lost in the restart redelivers to the test. Then
    an invoice may show copies, but never two different events.
    """
    queued = [e for e in events if e["type"] == "invoice.email_queued"]
    counts = Counter(e["data"]["invoiceId"] for e in queued)
    assert set(counts) == set(invoices)
    ids: dict[str, set[str]] = {}
    for e in queued:
        ids.setdefault(e["data"]["invoiceId"], set()).add(e["id"])
    assert {k: v for k, v in ids.items() if len(v) > 1} == {}
    duplicates = {k: v for k, v in counts.items() if v > 1}
    if same_id_copies_allowed:
        print(f"same-id copies after the broker restart: {len(duplicates)} of {len(invoices)}")
    else:
        assert duplicates == {}
    assert len(sandbox.requests(endpoint="resend")) >= len(invoices)
    assert all(len(sandbox.emails(invoice)) == 1 for invoice in invoices)


def test_sigterm_mid_burst_finishes_or_returns_work_and_exits_in_time(
    start_worker: StartWorker, bus: Bus, sandbox: Sandbox, ledger_url: str
) -> None:
    """SIGTERM while tasks run: the worker exits 0 within 20 s; afterwards every event of
    the burst has exactly one invoice.email_queued."""
    sandbox.configure(latency=0.2)
    worker = start_worker(concurrency=8, **QUICK)
    invoices = [new_invoice() for _ in range(120)]
    for invoice in invoices:
        bus.reissue(invoice)
    bus.wait_for(20, timeout=60)

    assert worker.proc is not None
    started = time.monotonic()
    worker.proc.send_signal(signal.SIGTERM)
    assert worker.proc.wait(timeout=30) == 0
    took = time.monotonic() - started
    assert took < 20, f"shutdown took {took:.1f}s"
    assert _published(ledger_url) < len(invoices)  # it really stopped mid-burst

    restarted = start_worker(concurrency=8, **QUICK)
    _wait_published(ledger_url, len(invoices), timeout=120)
    restarted.stop()
    _exactly_once(bus.drain(), invoices, sandbox)


def test_a_broker_restart_mid_burst_loses_and_doubles_nothing(
    start_worker: StartWorker, broker_url: str, sandbox: Sandbox, ledger_url: str
) -> None:
    """`rabbitmqctl stop_app` / `start_app` during 300 events: the worker reconnects on its
    own, the raw-event consumer resumes, all 300 come out, each as exactly one event id,
    and each customer gets exactly one email."""
    bus = Bus(broker_url, capture="test.capture.durable")  # survives the restart
    sandbox.configure(latency=0.05)
    worker = start_worker(concurrency=8, **QUICK)
    invoices = [new_invoice() for _ in range(300)]
    for invoice in invoices:
        bus.reissue(invoice)
    bus.wait_for(30, timeout=60)
    before = bus.all_received()
    bus.close()

    restart_rabbitmq()

    _wait_published(ledger_url, len(invoices), timeout=240)
    worker.stop()
    after = Bus.drained(broker_url, "test.capture.durable")
    _exactly_once(before + after, invoices, sandbox, same_id_copies_allowed=True)
    log = worker.log_path.read_text()
    assert "Connection to broker lost" in log or "Cannot connect" in log  # it really went away


def test_lost_answers_parked_across_a_broker_restart_with_the_api_clock_behind(
    start_worker: StartWorker, broker_url: str, sandbox: Sandbox, ledger_url: str
) -> None:
    """Interleaved: the API's clock a quarter second behind ours, every invoice reissued
    twice, the second resend's answer lost for a third of them, and the broker stopped
    while those events' retries wait in it. After the restart each such retry looks for
    its email in email-info, judged in the API's clock beside the first reissue's email
    a moment older, and finds it: no blind second resend, two emails per invoice, and
    each outgoing event carries its own reissue's email."""
    bus = Bus(broker_url, capture="test.capture.durable")  # survives the restart
    sandbox.configure(clock_offset=-0.25, latency=0.05)
    worker = start_worker(
        concurrency=8,
        **{**QUICK, "RETRY_SERVER_ERROR_BASE_SECONDS": "3", "EMAIL_INFO_LAG_SECONDS": "0"},
    )
    invoices = [new_invoice() for _ in range(30)]
    first = {invoice: bus.reissue(invoice)["id"] for invoice in invoices}
    _wait_published(ledger_url, len(invoices), timeout=60)
    lost = invoices[::3]
    for invoice in lost:
        sandbox.script(invoice, "resend", [Fault(status=None, then_succeed=True, drop=True)])
    second = {invoice: bus.reissue(invoice)["id"] for invoice in invoices}
    wait_until(
        lambda: bus.delayed_messages() >= len(lost),
        timeout=60,
        what="every lost resend's retry parked in the broker",
    )
    assert all(len(sandbox.requests(invoice=i, endpoint="resend")) == 2 for i in lost)
    before = bus.all_received()
    bus.close()

    restart_rabbitmq()

    _wait_published(ledger_url, 2 * len(invoices), timeout=240)
    worker.stop()
    events = before + Bus.drained(broker_url, "test.capture.durable")
    queued = {
        (e["data"]["invoiceId"], e["data"]["reissuedEvent"]["id"]): e
        for e in events
        if e["type"] == "invoice.email_queued"
    }
    assert len(queued) == 2 * len(invoices)
    for invoice in invoices:
        emails = sandbox.emails(invoice)
        assert len(emails) == 2, invoice
        assert queued[invoice, first[invoice]]["data"]["queuedAt"] == emails[0]["createdAt"]
        assert queued[invoice, second[invoice]]["data"]["queuedAt"] == emails[1]["createdAt"]
    assert all(len(sandbox.requests(invoice=i, endpoint="resend")) == 2 for i in lost)
    ids = Counter(e["id"] for e in queued.values())
    assert len(ids) == len(queued)  # one event id per reissue, copies aside
    log = worker.log_path.read_text()
    assert "Connection to broker lost" in log or "Cannot connect" in log  # it really went away


@pytest.mark.parametrize("processes", [1, 2, 4])
def test_scale_out_with_the_procfile_line(
    processes: int, bus: Bus, sandbox: Sandbox, env: MakeEnv, ledger_url: str, tmp_path: Path
) -> None:
    """`honcho start -c worker=N`: N worker processes share the queues and the ledger;
    200 events, 10% published twice: 200 POSTs, 200 events out."""
    environment = env(**QUICK)  # the virtualenv not activated: the Procfile finds it
    venv_bin = str(Path(sys.executable).parent)
    environment["PATH"] = os.pathsep.join(
        p for p in environment["PATH"].split(os.pathsep) if p != venv_bin
    )
    log = (tmp_path / "honcho.log").open("wb")
    honcho = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "honcho",
            "-f",
            str(REPO / "Procfile"),
            "start",
            "-c",
            f"worker={processes}",
            "worker",
        ],
        cwd=REPO,
        env=environment,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_until(
            lambda: bus.consumers("invoice-mailer.reissued") == processes,
            timeout=90,
            what=f"{processes} workers consuming",
        )
        invoices = [new_invoice() for _ in range(200)]
        events = [bus.reissue(invoice) for invoice in invoices]
        for event in events[::10]:
            bus.publish_event(event)
        _wait_published(ledger_url, len(invoices), timeout=180)
    finally:
        os.killpg(honcho.pid, signal.SIGTERM)
        honcho.wait(60)
        log.close()
    assert len(sandbox.requests(endpoint="resend")) == 200
    _exactly_once(bus.drain(), invoices, sandbox)


def test_a_poison_event_is_dead_lettered_and_the_others_keep_flowing(
    start_worker: StartWorker, bus: Bus, sandbox: Sandbox, ledger_url: str
) -> None:
    """An event that kills its worker every time: after 3 dead workers it is given up
    (email_failed, dead letter) instead of looping; 20 others all go through.

    The crashing workers run one thread, so that no other event is in flight when the
    poison kills them: an event that is, at each of the three deaths, is given up with
    it (README, "Poison events"), and which events are depends on the machine's speed.
    """
    poison = new_invoice()
    crashing = {
        "app": "tests.support.crashing_app",
        "CRASH_AT": "claimed",
        "CRASH_INVOICE": poison,
        "HTTP_TIMEOUT_SECONDS": "1",
    }
    others = [new_invoice() for _ in range(20)]
    Topology().declare(bus.conn)  # as the first worker would: the events wait for it
    bus.reissue(poison)
    for invoice in others:
        bus.reissue(invoice)

    def given_up() -> bool:
        bus.drain()
        return any(e["type"] == "invoice.email_failed" for e in bus.received)

    def died_or_given_up(proc: subprocess.Popen[bytes]) -> bool:
        return proc.poll() is not None or given_up()

    deaths = 0
    while not given_up():
        assert deaths <= 3, f"poison not given up after {deaths} deaths"
        # It may die before it answers a ping. A worker that takes the poison after the
        # third death gives it up and lives on, to run the others.
        worker = start_worker(wait=False, concurrency=1, **crashing)
        proc = worker.proc
        assert proc is not None
        wait_until(
            functools.partial(died_or_given_up, proc),
            timeout=60,
            what="the worker to die on the poison, or to give it up",
        )
        if proc.poll() is not None:
            deaths += 1
    [failed] = [e for e in bus.received if e["type"] == "invoice.email_failed"]
    assert failed["data"]["invoiceId"] == poison
    assert failed["data"]["reason"]["code"] == "worker_lost_repeatedly"
    assert deaths == 3
    assert [letter.headers["x-invoice-mailer-reason-code"] for letter in bus.dead_letters()] == [
        "worker_lost_repeatedly"
    ]
    assert sandbox.requests(invoice=poison) == []
    _wait_published(ledger_url, len(others), timeout=60)
    queued = {e["data"]["invoiceId"] for e in bus.drain() if e["type"] == "invoice.email_queued"}
    assert queued == set(others)


MISBEHAVIOUR = [
    pytest.param(
        "resend",
        Fault(status=502, body="<html><h1>Bad Gateway</h1></html>"),
        "retried",
        id="html-502",
    ),
    pytest.param("resend", Fault(status=500, body=""), "retried", id="empty-500"),
    pytest.param(
        "resend",
        Fault(status=503, body="", content_type="application/problem+json"),
        "retried",
        id="empty-problem-503",
    ),
    pytest.param(
        "resend",
        Fault(
            status=200,
            body='{"unexpected": true}',
            content_type="application/json",
            then_succeed=True,
        ),
        "queued-unknown-recipient",
        id="resend-200-wrong-shape",
    ),
    pytest.param(
        "email_info",
        Fault(status=200, body='{"emails": "none"}', content_type="application/json"),
        "email-info-invalid",
        id="email-info-200-wrong-shape",
    ),
    pytest.param(
        "resend",
        Fault(
            status=400,
            body='{"title": "Bad", "detail": "no code here"}',
            content_type="application/problem+json",
        ),
        "failed-http_400",
        id="problem-without-code",
    ),
    pytest.param(
        "resend",
        Fault(status=422, body="", content_type="text/plain"),
        "failed-http_422",
        id="empty-422",
    ),
]


@pytest.mark.parametrize(("endpoint", "fault", "expect"), MISBEHAVIOUR)
def test_a_misbehaving_api_is_handled_by_the_retry_table(
    start_worker: StartWorker,
    bus: Bus,
    sandbox: Sandbox,
    endpoint: str,
    fault: Fault,
    expect: str,
) -> None:
    """HTML, empty bodies, 200s of the wrong shape, problems without `code`: each ends
    as the retry table says, with a clear reason."""
    start_worker(**QUICK)
    invoice = new_invoice()
    sandbox.script(invoice, endpoint, [fault])
    bus.reissue(invoice)

    [event] = bus.wait_for(1, timeout=30)

    posts = sandbox.requests(invoice=invoice, endpoint="resend")
    data = event["data"]
    if expect == "retried":
        assert len(posts) == 2
        assert event["type"] == "invoice.email_queued"
    elif expect == "queued-unknown-recipient":
        assert len(posts) == 1
        assert event["type"] == "invoice.email_queued"
        assert data["email"] is None
        assert data["emailInfo"]["emails"][0]["to"] == "billing@example.com"
    elif expect == "email-info-invalid":
        assert event["type"] == "invoice.email_queued"
        assert data["emailInfo"] is None
        assert data["emailInfoError"].startswith("invalid_response: ")
    else:
        code = expect.removeprefix("failed-")
        assert len(posts) == 1
        assert event["type"] == "invoice.email_failed"
        assert data["reason"]["code"] == code
        assert data["reason"]["detail"]
    assert len(sandbox.emails(invoice)) == 1 or expect.startswith("failed")


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.long
def test_long_run_10000_events_two_workers_flaky_api(
    start_worker: StartWorker,
    bus: Bus,
    sandbox: Sandbox,
    ledger_url: str,
) -> None:
    """10,000 events, 2 workers, the API failing 10% with 5xx and 5% of invoices meeting
    their resend limit (429 rate_limited, about that invoice): each event ends with exactly
    one invoice.email_queued, and worker memory stays flat. (An account-wide 429 shuts
    the whole fleet's gate: tests/integration/test_health.py.)"""
    sandbox.configure(failure_rates={500: 0.10})
    workers: list[WorkerProcess] = [
        start_worker(concurrency=16, LOG_FORMAT="json", **QUICK) for _ in range(2)
    ]
    invoices = [new_invoice() for _ in range(10_000)]
    for invoice in invoices[::20]:
        sandbox.script(invoice, "resend", [Fault(status=429, retry_after_seconds=1.0)])
    for invoice in invoices[:1000]:
        bus.reissue(invoice)
    _wait_published(ledger_url, 1000, timeout=120)
    rss_start = [_rss_kib(w.proc.pid) for w in workers if w.proc]
    for invoice in invoices[1000:]:
        bus.reissue(invoice)
    _wait_published(ledger_url, len(invoices), timeout=600)
    rss_end = [_rss_kib(w.proc.pid) for w in workers if w.proc]
    for worker in workers:
        worker.stop(timeout=120)

    print(f"worker RSS KiB after 1,000 events {rss_start}, after 10,000 {rss_end}")
    _exactly_once(bus.drain(), invoices, sandbox)
    for start, end in zip(rss_start, rss_end, strict=True):
        assert end < start * 1.25 + 10_000, f"RSS grew from {start} to {end} KiB"
