"""Past one machine: a three-node RabbitMQ cluster, two worker hosts, one PostgreSQL ledger.

The hosts are network namespaces (``tests/support/hosts.py``); the cluster is three
nodes of the machine's own RabbitMQ (``tests/support/cluster.py``). Each worker lists
the three nodes in its own order, as a fleet spread over a cluster does. Run alone:
``pytest -m cluster -s`` (the figures are printed).
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pytest

from sandbox import Sandbox
from tests.integration.conftest import stop_and_report
from tests.support.broker import Bus, new_invoice, wait_until
from tests.support.cluster import Node, RabbitCluster, require_cluster_tools, running_cluster
from tests.support.gate import TcpGate
from tests.support.hosts import GATEWAY, Host, hosts, require_namespaces
from tests.support.postgres import PG_PORT
from tests.support.worker import RAW_QUEUE, TASK_QUEUE, WorkerProcess, worker_env

pytestmark = [pytest.mark.long, pytest.mark.cluster]

EVENTS = 2000
TWICE_EVERY = 20  # 5% of the events published twice
API_LATENCY = 0.02
WORKERS = 3  # two on the first host, one on the second
NODE_DOWN_SECONDS = 5  # the least a stopped node stays down
CUT_SECONDS = 20
DEAD_LETTER_QUEUE = "invoice-mailer.dead-letter"
QUICK = {
    "HTTP_TIMEOUT_SECONDS": "2",
    "RETRY_SERVER_ERROR_BASE_SECONDS": "1",
    "RETRY_SERVER_ERROR_MAX_SECONDS": "4",
    "METRICS_PORT": "0",
    "DEAD_LETTER_QUEUE_TYPE": "quorum",  # the runbook's: replicated like the others
}


@pytest.fixture(scope="module")
def machine_hosts() -> Iterator[list[Host]]:
    require_namespaces()
    with hosts(2) as made:
        yield made


@pytest.fixture(scope="module")
def cluster() -> Iterator[RabbitCluster]:
    require_cluster_tools()
    with running_cluster(3) as up:
        yield up


@pytest.fixture
def vhost(cluster: RabbitCluster) -> str:
    name = f"cluster-test-{uuid.uuid4().hex[:8]}"
    cluster.add_vhost(name)
    return name


@pytest.fixture
def api(machine_hosts: list[Host]) -> Iterator[Sandbox]:
    with Sandbox(host=GATEWAY, latency=API_LATENCY) as sandbox:
        yield sandbox


@pytest.fixture
def shared_ledger(machine_hosts: list[Host], postgres_url: str) -> Iterator[str]:
    """The test's PostgreSQL database as the hosts reach it: across their links."""
    gate = TcpGate(PG_PORT, listen_host=GATEWAY)
    gate.open()
    try:
        yield postgres_url.replace(f"127.0.0.1:{PG_PORT}/", f"{GATEWAY}:{gate.port}/")
    finally:
        gate.close()


@dataclass
class Fleet:
    cluster: RabbitCluster
    vhost: str
    workers: list[WorkerProcess] = field(default_factory=list)


@pytest.fixture
def fleet(
    cluster: RabbitCluster,
    vhost: str,
    machine_hosts: list[Host],
    api: Sandbox,
    shared_ledger: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> Iterator[Fleet]:
    """Three workers on two hosts, each with the cluster's nodes in its own order."""
    made = Fleet(cluster, vhost)
    placement = [machine_hosts[0], machine_hosts[0], machine_hosts[1]]
    try:
        for index, host in enumerate(placement[:WORKERS]):
            nodes = cluster.nodes[index:] + cluster.nodes[:index]
            url = ";".join(cluster.url(node, host=GATEWAY, vhost=vhost) for node in nodes)
            worker = WorkerProcess(
                worker_env(url, api.url, shared_ledger, **QUICK),
                tmp_path,
                concurrency=24,
                name=f"w{index + 1}",
                host=host.namespace,
                prefix=host.command(),
            )
            made.workers.append(worker.start(raw_consumers=index + 1))
        yield made
    finally:
        stop_and_report(made.workers, request)


class Timeline:
    """Outgoing events and raw-queue consumers sampled as the burst runs."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.start = time.monotonic()
        self.samples: list[tuple[float, int, int]] = []  # (t, events out, consumers)

    def sample(self) -> tuple[int, int]:
        self.bus.all_received()
        try:
            consumers = self.bus.consumers(RAW_QUEUE)
        except Exception:
            consumers = 0
        out = len({e["data"]["invoiceId"] for e in self.bus.received})
        self.samples.append((time.monotonic(), out, consumers))
        return out, consumers

    def until(self, condition: Callable[[int, int], bool], *, timeout: float, what: str) -> float:
        """Sample (every 0.2 s of the bus's own wait) until ``condition(out, consumers)``."""
        deadline = time.monotonic() + timeout
        while not condition(*self.sample()):
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out after {timeout}s waiting for {what}: {self.samples[-1]}"
                )
            self.bus.listen(0.2)
        return time.monotonic()

    def rate(self, t0: float, t1: float) -> float:
        """Distinct invoices out per second between two instants."""

        def out_at(t: float) -> int:
            return max((n for at, n, _ in self.samples if at <= t), default=0)

        return (out_at(t1) - out_at(t0)) / max(t1 - t0, 1e-9)


class Upstream:
    """The burst, published as upstream would while the service runs: from
    ``PUBLISHERS`` connections at once (one confirmed publish at a time each is
    slower than three workers), so that a fault lands mid-burst."""

    PUBLISHERS = 3

    def __init__(self, url: str) -> None:
        self.invoices = [new_invoice() for _ in range(EVENTS)]
        self.errors: list[BaseException] = []
        shares = [self.invoices[i :: self.PUBLISHERS] for i in range(self.PUBLISHERS)]
        self._threads = [
            threading.Thread(target=self._publish, args=(url, share), daemon=True)
            for share in shares
        ]
        for thread in self._threads:
            thread.start()

    def _publish(self, url: str, invoices: list[str]) -> None:
        bus = Bus(url, listen=False)
        try:
            for n, invoice in enumerate(invoices):
                event = bus.reissue(invoice)
                if n % TWICE_EVERY == 0:
                    bus.publish_event(event)
        except BaseException as exc:
            self.errors.append(exc)
        finally:
            bus.close()

    def join(self) -> list[str]:
        for thread in self._threads:
            thread.join(timeout=120)
        assert not self.errors, self.errors
        assert not any(thread.is_alive() for thread in self._threads)
        return self.invoices


def _check_once_each(bus: Bus, invoices: list[str], api: Sandbox) -> None:
    events = bus.all_received()
    assert {e["type"] for e in events} == {"invoice.email_queued"}
    ids: dict[str, set[str]] = {}
    for event in events:
        ids.setdefault(event["data"]["invoiceId"], set()).add(event["id"])
    assert set(ids) == set(invoices)
    assert {invoice: v for invoice, v in ids.items() if len(v) > 1} == {}
    resends = api.requests(endpoint="resend")
    posts = Counter(r.path for r in resends)
    assert len(posts) == len(invoices)
    twice = {
        path: [datetime.fromtimestamp(r.at, UTC).isoformat() for r in resends if r.path == path]
        for path, n in posts.items()
        if n > 1
    }
    assert twice == {}  # each with the times its POSTs arrived, to read beside the logs


# RabbitMQ refreshes a quorum queue's counts in ``list_queues`` on its leader's tick
# (every 5 s): a message moving between delay levels, or a retry parked a moment ago,
# can be missed by one reading. Settled means every count read zero for this long.
SETTLED_FOR_SECONDS = 6.0


def _check_settled(fleet: Fleet, bus: Bus) -> None:
    """Nothing unacknowledged or parked (a retry still waiting in a delay queue is waited
    for: it is late, not stuck), and every worker consuming."""
    cluster, vhost = fleet.cluster, fleet.vhost
    quiet_since: list[float] = []
    last: dict[str, object] = {}

    def settled() -> bool:
        bus.all_received()  # a late copy must not sit unacknowledged in the capture queue
        counts = cluster.queue_counts(vhost)
        busy = {name: c for name, c in counts.items() if c != (0, 0)}
        last.update(
            busy=busy,
            delayed=bus.delayed_messages(),  # passive declares: the leaders' own counts
            ready=bus.queue_depth(RAW_QUEUE) + bus.queue_depth(TASK_QUEUE),
            consumers=bus.consumers(RAW_QUEUE),
        )
        quiet = (
            not busy
            and last["delayed"] == 0
            and last["ready"] == 0
            and last["consumers"] == len(fleet.workers)
        )
        if not quiet:
            quiet_since.clear()
            return False
        if not quiet_since:
            quiet_since.append(time.monotonic())
        return time.monotonic() - quiet_since[0] >= SETTLED_FOR_SECONDS

    try:
        wait_until(settled, timeout=180, what="empty queues and every worker consuming")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last reading: {last}") from None
    for worker in fleet.workers:
        assert worker.proc is not None
        assert worker.proc.poll() is None, worker.log()


def _log_times(worker: WorkerProcess, marker: str) -> list[float]:
    """When the worker logged a line containing ``marker`` (epoch seconds, from its
    log's RFC 3339 UTC times)."""
    times = []
    for line in worker.whole_log().splitlines():
        if marker in line and line.startswith("[20"):
            stamp = line[1:].split(" ", 1)[0].rstrip("Z")
            times.append(datetime.fromisoformat(stamp).replace(tzinfo=UTC).timestamp())
    return times


def _consuming_again(fleet: Fleet, fault_at: float) -> dict[str, str]:
    """Per worker: how long after the fault its consumer was connected again (Celery's
    own "Connected to" line), or "kept" if it never lost its connection."""
    seen = {}
    for worker in fleet.workers:
        lost = [t for t in _log_times(worker, "Connection to broker lost") if t >= fault_at - 1]
        back = [t for t in _log_times(worker, "consumer.connection: Connected to") if t > fault_at]
        seen[worker.name] = (
            "kept" if not lost else f"{back[0] - fault_at:.1f}s" if back else "never"
        )
    return seen


def _every_worker_takes_events(fleet: Fleet, bus: Bus, url: str) -> None:
    """Once all is settled, a second, small burst: each worker takes some of it (the
    raw queue hands events round robin over its consumers), so each one consumes."""
    upstream = Bus(url, listen=False)
    try:
        invoices = [new_invoice() for _ in range(20 * WORKERS)]
        for invoice in invoices:
            upstream.reissue(invoice)
    finally:
        upstream.close()
    wait_until(
        lambda: {e["data"]["invoiceId"] for e in bus.all_received()} >= set(invoices),
        timeout=120,
        what="the second burst out",
    )
    for worker in fleet.workers:
        log = worker.whole_log()
        assert any(invoice in log for invoice in invoices), f"{worker.name} took none"


def _afterwards(
    fleet: Fleet, bus: Bus, upstream: Upstream, api: Sandbox, fault_at: float, url: str
) -> tuple[dict[str, str], int]:
    """Everything the two scenarios must show once the burst is out: settled, once each,
    every worker consuming. Returns when each consumer was back, and same-id copies."""
    invoices = upstream.join()
    _check_settled(fleet, bus)
    _check_once_each(bus, invoices, api)
    again = _consuming_again(fleet, fault_at)
    copies = len(bus.received) - EVENTS
    _every_worker_takes_events(fleet, bus, url)
    return again, copies


def _other_node(cluster: RabbitCluster, than: Node) -> Node:
    return next(node for node in cluster.nodes if node != than)


def test_the_node_leading_the_queue_stopped_mid_burst_loses_and_doubles_nothing(
    fleet: Fleet, api: Sandbox
) -> None:
    """2,000 events (5% twice) over 3 workers on 2 hosts; mid-burst the node leading
    invoice-mailer.reissued stops, later starts again: one event id and one POST per
    invoice, nothing unacknowledged or parked, every worker consuming."""
    cluster, vhost = fleet.cluster, fleet.vhost
    every_node = sorted(node.name for node in cluster.nodes)
    for queue in (RAW_QUEUE, TASK_QUEUE, DEAD_LETTER_QUEUE, "celery_delayed_0"):
        assert cluster.members(queue, vhost=vhost) == every_node, queue  # replicated thrice
    leader = cluster.leader(RAW_QUEUE, vhost=vhost)
    watch = _other_node(cluster, leader)
    bus = Bus(cluster.url(watch, vhost=vhost), capture="test.capture.cluster", quorum=True)
    try:
        timeline = Timeline(bus)
        upstream = Upstream(cluster.url(watch, vhost=vhost))
        t_stop = timeline.until(lambda out, _: out >= EVENTS // 5, timeout=120, what="a fifth")
        stopped_at = time.time()
        cluster.stop_node(leader)
        new_leader = _wait_new_leader(cluster, watch, vhost, leader)
        t_restart = timeline.until(  # down for a while, and then until half are out
            lambda out, _: (
                out == EVENTS
                or (out >= EVENTS // 2 and time.monotonic() - t_stop >= NODE_DOWN_SECONDS)
            ),
            timeout=240,
            what="half of the events out",
        )
        cluster.start_node(leader)
        t_done = timeline.until(lambda out, _: out == EVENTS, timeout=300, what="every event")
        again, copies = _afterwards(
            fleet, bus, upstream, api, stopped_at, cluster.url(watch, vhost=vhost)
        )
        print(
            f"\ncluster node loss: leader {leader.short} stopped at {t_stop - timeline.start:.1f}s "
            f"(new leader {new_leader.short}), started again at "
            f"{t_restart - timeline.start:.1f}s; events/s before "
            f"{timeline.rate(timeline.start, t_stop):.0f}, while down "
            f"{timeline.rate(t_stop, t_restart):.0f}, "
            f"after {timeline.rate(t_restart, t_done):.0f}; "
            f"consumers connected again after the loss: {again}; "
            f"same-id copies {copies}"
        )
    finally:
        bus.close()


def _wait_new_leader(cluster: RabbitCluster, via: Node, vhost: str, old: Node) -> Node:
    found: list[Node] = []

    def elected() -> bool:
        try:
            leader = cluster.leader(RAW_QUEUE, vhost=vhost, via=via)
        except Exception:
            return False
        found[:] = [leader]
        return leader != old

    wait_until(elected, timeout=60, what="a new leader of invoice-mailer.reissued")
    return found[0]


def test_a_worker_host_cut_off_for_20_s_mid_burst_loses_and_doubles_nothing(
    fleet: Fleet, api: Sandbox, machine_hosts: list[Host]
) -> None:
    """The same burst; mid-burst the first host (two of the three workers) loses its
    link for 20 s: the other host carries on, the cut-off workers come back, and still
    one event id and one POST per invoice."""
    cluster, vhost = fleet.cluster, fleet.vhost
    bus = Bus(cluster.url(cluster.nodes[0], vhost=vhost), capture="test.capture.cut", quorum=True)
    cut_host = machine_hosts[0]
    try:
        timeline = Timeline(bus)
        upstream = Upstream(cluster.url(cluster.nodes[0], vhost=vhost))
        t_cut = timeline.until(lambda out, _: out >= EVENTS // 5, timeout=120, what="a fifth")
        cut_at = time.time()
        cut_host.cut()
        try:
            t_mend = timeline.until(
                lambda *_: time.monotonic() - t_cut >= CUT_SECONDS, timeout=60, what="the cut's end"
            )
        finally:
            cut_host.mend()
        t_done = timeline.until(lambda out, _: out == EVENTS, timeout=300, what="every event")
        again, copies = _afterwards(
            fleet, bus, upstream, api, cut_at, cluster.url(cluster.nodes[0], vhost=vhost)
        )
        print(
            f"\nhost cut off: {cut_host.namespace} cut at {t_cut - timeline.start:.1f}s for "
            f"{t_mend - t_cut:.0f}s; events/s before {timeline.rate(timeline.start, t_cut):.0f}, "
            f"while cut {timeline.rate(t_cut, t_mend):.0f}, after "
            f"{timeline.rate(t_mend, t_done):.0f}; consumers connected again after the cut "
            f"began: {again}; same-id copies {copies}"
        )
    finally:
        bus.close()


_LEDGER_PROBE = """
import sys, time
from invoice_mailer.ledger import open_ledger
ledger = open_ledger(sys.argv[1])
ledger.counts()
print("ready", flush=True)
sys.stdin.readline()
started = time.monotonic()
try:
    ledger.counts()
    print("answered", flush=True)
except Exception as exc:
    print(f"failed {time.monotonic() - started:.1f} {type(exc).__name__}", flush=True)
"""


def test_a_ledger_statement_on_a_silent_link_fails_within_seconds(
    machine_hosts: list[Host], shared_ledger: str
) -> None:
    """A host's link goes silent under an open PostgreSQL connection: the next statement
    fails (LedgerError) in seconds, well inside a run's lease, instead of hanging until
    TCP gives up or the link returns."""
    host = machine_hosts[1]
    probe = subprocess.Popen(
        host.command(sys.executable, "-c", _LEDGER_PROBE, shared_ledger),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert probe.stdout is not None
        assert probe.stdout.readline().strip() == "ready"
        host.cut()
        try:
            out, _ = probe.communicate(input="\n", timeout=60)
        finally:
            host.mend()
    finally:
        probe.kill()
    told = [line for line in out.splitlines() if line.startswith(("failed", "answered"))]
    assert told, out
    verdict, seconds, error = [*told[-1].split(), "", ""][:3]
    assert (verdict, error) == ("failed", "LedgerError"), out
    assert float(seconds) < 8, out
    print(f"\nledger statement on a silent link: LedgerError after {seconds} s")
