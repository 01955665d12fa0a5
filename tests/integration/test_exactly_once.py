"""One event, one email: duplicates, races between workers, and kill -9 at every point.

Real worker processes, the real RabbitMQ, the sandbox, and both ledger backends.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sandbox import Fault, Sandbox
from tests.integration.conftest import StartWorker
from tests.support.broker import Bus, new_invoice, wait_until
from tests.support.tasks import TaskWatcher
from tests.support.worker import RAW_QUEUE, TASK_QUEUE, WorkerProcess

# Short HTTP timeout: a killed worker's lease (2 x timeout + 5 s) then ends in 7 s.
QUICK = {"HTTP_TIMEOUT_SECONDS": "1", "RETRY_SERVER_ERROR_BASE_SECONDS": "1"}


@pytest.fixture
def ledger_url(any_ledger_url: str) -> str:
    return any_ledger_url


@pytest.fixture
def tasks(broker_url: str) -> Iterator[TaskWatcher]:
    watcher = TaskWatcher(broker_url)
    yield watcher
    watcher.close()


def settle(
    bus: Bus,
    tasks: TaskWatcher,
    workers: list[WorkerProcess],
    *,
    taken_up: int,
    timeout: float = 120,
) -> list[dict[str, Any]]:
    """Wait until every published event was taken up by a worker and its task ran to the end (no
    retry left parked), stop the workers, and return every event that came out.

    Once the workers are stopped nothing more can be published, so what the
    capture queue holds then is final: the place to count duplicates.
    """
    tasks.wait_settled(taken_up, timeout=timeout)
    for worker in workers:
        assert worker.stop() == 0, worker.log()
    assert bus.queue_depth(RAW_QUEUE) == 0
    assert bus.queue_depth(TASK_QUEUE) == 0
    assert bus.delayed_messages() == 0
    return bus.drain()


def test_the_same_event_twice_makes_one_post_and_one_event(
    start_worker: StartWorker, bus: Bus, sandbox: Sandbox, tasks: TaskWatcher
) -> None:
    """A duplicate upstream publish, after the first was done: skipped, not resent."""
    worker = start_worker(**QUICK)
    invoice = new_invoice()
    event = bus.reissue(invoice)
    bus.wait_for(1)
    bus.publish_event(event)

    events = settle(bus, tasks, [worker], taken_up=2)

    assert [e["type"] for e in events] == ["invoice.email_queued"]
    assert len(sandbox.requests(invoice=invoice, endpoint="resend")) == 1
    assert len(sandbox.emails(invoice)) == 1
    assert sorted(r["outcome"] for r in _results(tasks)) == ["duplicate", "email_queued"]


def test_the_same_event_to_two_workers_at_once_makes_one_post(
    start_worker: StartWorker, bus: Bus, sandbox: Sandbox, tasks: TaskWatcher
) -> None:
    """Two workers get the same event at the same moment: one wins the claim, one waits."""
    workers = [start_worker(**QUICK), start_worker(**QUICK)]
    invoice = new_invoice()
    sandbox.script(invoice, "resend", [Fault(status=None, delay=0.8)])  # keep them overlapping
    event = bus.reissue(invoice)
    bus.publish_event(event)

    events = settle(bus, tasks, workers, taken_up=2)

    assert [e["type"] for e in events] == ["invoice.email_queued"]
    assert len(sandbox.requests(invoice=invoice, endpoint="resend")) == 1
    assert len(sandbox.emails(invoice)) == 1


@pytest.mark.parametrize("point", ["claimed", "resent", "published"])
def test_kill_9_at_each_point_ends_with_one_email_and_one_event(
    start_worker: StartWorker,
    bus: Bus,
    sandbox: Sandbox,
    tasks: TaskWatcher,
    tmp_path: Path,
    point: str,
) -> None:
    """Killed before the POST, after it, or after publishing (before the ack): after a
    restart the event ends with exactly one email_queued and one POST."""
    crashing = start_worker(
        app="tests.support.crashing_app",
        CRASH_AT=point,
        CRASH_MARKER=str(tmp_path / "crashed"),
        **QUICK,
    )
    invoice = new_invoice()
    bus.reissue(invoice)
    assert crashing.proc is not None
    assert crashing.proc.wait(timeout=60) == -9
    restarted = start_worker(**QUICK)

    events = settle(bus, tasks, [restarted], taken_up=1)

    assert (tmp_path / "crashed").exists()
    assert [e["type"] for e in events] == ["invoice.email_queued"]
    assert len(sandbox.requests(invoice=invoice, endpoint="resend")) == 1
    assert len(sandbox.emails(invoice)) == 1


def test_kill_9_while_the_api_holds_the_post_open_sends_no_second_post(
    start_worker: StartWorker, bus: Bus, sandbox: Sandbox, tasks: TaskWatcher
) -> None:
    """The worker dies mid-request; the API queued the email anyway. The next run finds
    it in email-info instead of sending again."""
    worker = start_worker(HTTP_TIMEOUT_SECONDS="3")
    invoice = new_invoice()
    sandbox.script(invoice, "resend", [Fault(status=None, delay=2.0, then_succeed=True)])
    bus.reissue(invoice)
    wait_until(
        lambda: len(sandbox.requests(invoice=invoice)) == 1, timeout=30, what="the POST to arrive"
    )
    worker.kill()
    restarted = start_worker(HTTP_TIMEOUT_SECONDS="3")

    events = settle(bus, tasks, [restarted], taken_up=1)

    assert [e["type"] for e in events] == ["invoice.email_queued"]
    assert len(sandbox.requests(invoice=invoice, endpoint="resend")) == 1
    assert len(sandbox.emails(invoice)) == 1
    assert events[0]["data"]["queuedAt"] == sandbox.emails(invoice)[0]["createdAt"]


def test_a_dropped_connection_after_the_email_was_queued_is_not_resent(
    start_worker: StartWorker, bus: Bus, sandbox: Sandbox
) -> None:
    """The API queued the email but the answer was lost: email-info shows it, no resend."""
    start_worker(**QUICK)
    invoice = new_invoice()
    sandbox.script(invoice, "resend", [Fault(status=None, drop=True, then_succeed=True)])
    bus.reissue(invoice)

    [event] = bus.wait_for(1)

    assert event["type"] == "invoice.email_queued"
    assert len(sandbox.requests(invoice=invoice, endpoint="resend")) == 1
    assert len(sandbox.emails(invoice)) == 1


def test_a_dropped_connection_before_anything_happened_is_resent_with_the_same_key(
    start_worker: StartWorker, bus: Bus, sandbox: Sandbox
) -> None:
    """Nothing in email-info after a lost answer: the resend goes again, same Idempotency-Key."""
    start_worker(**QUICK)
    invoice = new_invoice()
    sandbox.script(invoice, "resend", [Fault(status=None, drop=True)])
    bus.reissue(invoice)

    [event] = bus.wait_for(1)

    posts = sandbox.requests(invoice=invoice, endpoint="resend")
    assert len(posts) == 2
    assert posts[0].headers["idempotency-key"] == posts[1].headers["idempotency-key"]
    assert len(sandbox.emails(invoice)) == 1
    assert event["type"] == "invoice.email_queued"


def test_three_workers_on_one_postgres_ledger_600_events_10_percent_twice(
    start_worker: StartWorker, bus: Bus, sandbox: Sandbox, tasks: TaskWatcher, postgres_url: str
) -> None:
    """600 events, 60 of them published twice, 3 workers: 600 POSTs, 600 events out."""
    workers = [start_worker(LEDGER_URL=postgres_url, **QUICK) for _ in range(3)]
    invoices = [new_invoice() for _ in range(600)]
    events_in = [bus.reissue(invoice) for invoice in invoices]
    for event in events_in[::10]:
        bus.publish_event(event)

    bus.wait_for(600, timeout=240)
    events = settle(bus, tasks, workers, taken_up=660, timeout=240)

    counts = Counter(e["data"]["invoiceId"] for e in events)
    assert len(events) == 600
    assert set(counts) == set(invoices)
    assert len(sandbox.requests(endpoint="resend")) == 600
    assert all(len(sandbox.emails(invoice)) == 1 for invoice in invoices)


def _results(tasks: TaskWatcher) -> list[dict[str, Any]]:
    """What each finished task returned (Celery events carry the result's repr)."""
    import ast

    return [ast.literal_eval(r) for r in tasks.results]
