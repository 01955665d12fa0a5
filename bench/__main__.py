"""``python -m bench``: invoice-mailer and the minimal baseline, side by side, same run.

Real RabbitMQ (a fresh vhost per system), the billing sandbox in its own process
with a fixed API latency, K worker processes. For each system it measures:

* light load, from the moment the workers consume (no warm-up): events published
  10 per second; end-to-end latency from publishing ``invoice.reissued`` to
  receiving ``invoice.email_queued``, and that of the first event after start;
* a burst of N events: events per second, latency p50/p95/p99, CPU milliseconds per
  event (utime + stime of the worker processes, from /proc), peak RSS (VmHWM);
* optionally a backlog: N events published before any worker starts, then drained.

Then it prints every figure with the ratio project / baseline.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kombu import Connection, Consumer, Exchange, Queue

from sandbox import DEFAULT_API_KEY

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
EXCHANGE = Exchange("billing.events", "topic", durable=True)


@dataclass
class Figures:
    name: str
    processes: int
    events_per_second: float = 0.0
    light_latency: list[float] = field(default_factory=list)
    first_latency: list[float] = field(default_factory=list)
    """Each run's first event after start."""
    burst_latency: list[float] = field(default_factory=list)
    cpu_ms_per_event: float = 0.0
    sys_cpu_ms_per_event: float = 0.0
    peak_rss_mb: list[float] = field(default_factory=list)
    backlog_events_per_second: float | None = None
    others_cpu_ms_per_event: dict[str, float] = field(default_factory=dict)
    machine_busy: float = 0.0
    machine_steal: float = 0.0
    backlog_peak_rss_mb: list[float] = field(default_factory=list)


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--events", type=int, default=3000, help="burst size (default 3000)")
    parser.add_argument(
        "--workers",
        type=int,
        nargs="+",
        default=[1, 2],
        help="worker process counts to run (default: 1 2)",
    )
    parser.add_argument("--latency", type=float, default=0.05, help="API latency, s")
    parser.add_argument(
        "--concurrency",
        type=int,
        default=48,
        help="tasks in flight per process, both systems (default 48, the worker's default)",
    )
    parser.add_argument("--light", type=int, default=100, help="light-load events (10/s)")
    parser.add_argument(
        "--backlog",
        type=int,
        default=0,
        help="also drain a backlog of this many events (e.g. 20000)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="rounds of the two systems, interleaved A B, B A, A B... (default 2: ABBA)",
    )
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument(
        "--baseline-queue-type",
        choices=["classic", "quorum"],
        default="classic",
        help="the baseline's source queue (invoice-mailer's is a quorum queue)",
    )
    parser.add_argument(
        "--loglevel", default="INFO", help="invoice-mailer's log level (DEBUG: every step timed)"
    )
    parser.add_argument("--logs", type=Path, help="copy each run's worker logs into this directory")
    args = parser.parse_args()

    results: list[tuple[Figures, Figures | None]] = []
    with sandbox_process(args.latency) as (api, sandbox_pid):
        others = {"sandbox": sandbox_pid, "RabbitMQ": rabbitmq_pid(), "load generator": os.getpid()}
        for k in args.workers:
            runs: dict[str, list[Figures]] = {"invoice-mailer": [], "baseline": []}
            systems = [("invoice-mailer", start_project)]
            if not args.no_baseline:
                systems.append(("baseline", start_baseline))
            for name, start in interleaved(systems, args.rounds):
                runs[name].append(run_system(name, k, args, api, start, others))
            project = combine(runs["invoice-mailer"])
            baseline = combine(runs["baseline"]) if runs["baseline"] else None
            results.append((project, baseline))
            report(project, baseline, args)
            print_runs(runs)
    if len(results) > 1:
        one, many = results[0][0], results[-1][0]
        print(
            f"\nscaling: {many.processes} processes / {one.processes}: "
            f"{many.events_per_second / one.events_per_second:.2f}x events/s "
            f"(machine busy {one.machine_busy:.0%} -> {many.machine_busy:.0%}; "
            f"the most the machine allows at the cost per event with {one.processes}: "
            f"{1 / one.machine_busy:.2f}x)"
        )


def interleaved(systems: list[Any], rounds: int) -> list[Any]:
    """A B, then B A, then A B...: drift of the machine over the run (a neighbour, the
    CPU's clock, the broker's state) falls on both systems alike."""
    order: list[Any] = []
    for n in range(max(1, rounds)):
        order += systems if n % 2 == 0 else systems[::-1]
    return order


def combine(runs: list[Figures]) -> Figures:
    """One system's runs as one: rates and costs averaged, latencies pooled, RSS kept."""
    first = runs[0]

    def mean(value: Callable[[Figures], float]) -> float:
        return statistics.fmean(value(f) for f in runs)

    backlog = [f.backlog_events_per_second for f in runs if f.backlog_events_per_second]
    return Figures(
        name=first.name,
        processes=first.processes,
        events_per_second=mean(lambda f: f.events_per_second),
        light_latency=[x for f in runs for x in f.light_latency],
        first_latency=[x for f in runs for x in f.first_latency],
        burst_latency=[x for f in runs for x in f.burst_latency],
        cpu_ms_per_event=mean(lambda f: f.cpu_ms_per_event),
        sys_cpu_ms_per_event=mean(lambda f: f.sys_cpu_ms_per_event),
        peak_rss_mb=[x for f in runs for x in f.peak_rss_mb],
        backlog_events_per_second=statistics.fmean(backlog) if backlog else None,
        others_cpu_ms_per_event={
            name: statistics.fmean(f.others_cpu_ms_per_event.get(name, 0.0) for f in runs)
            for name in first.others_cpu_ms_per_event
        },
        machine_busy=mean(lambda f: f.machine_busy),
        machine_steal=mean(lambda f: f.machine_steal),
        backlog_peak_rss_mb=[x for f in runs for x in f.backlog_peak_rss_mb],
    )


def print_runs(runs: dict[str, list[Figures]]) -> None:
    """Each run's events/s and CPU per event, in the order they ran."""
    for name, figures in runs.items():
        if figures:
            each = ", ".join(
                f"{f.events_per_second:.0f}/s {f.cpu_ms_per_event:.2f} ms" for f in figures
            )
            print(f"runs of {name}: {each}")


# -- the systems ----------------------------------------------------------------------------


def start_project(
    broker: str, api: str, k: int, args: argparse.Namespace, workdir: Path
) -> tuple[list[subprocess.Popen[bytes]], str]:
    env = {
        **os.environ,
        "CELERY_BROKER_URL": broker,
        "HOSTUP_API_BASE_URL": api + "/api/v2",
        "HOSTUP_API_KEY": DEFAULT_API_KEY,
        "LEDGER_URL": f"sqlite:///{workdir}/ledger.sqlite3",
        "METRICS_PORT": "0",
    }
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "tasks",
                "worker",
                "--pool",
                "gevent",
                "--concurrency",
                str(args.concurrency),
                "--loglevel",
                args.loglevel,
                "--without-gossip",
                "--without-mingle",
                "--hostname",
                f"bench{n}@%h",
            ],
            env=env,
            stdout=(workdir / f"worker{n}.log").open("wb"),
            stderr=subprocess.STDOUT,
        )
        for n in range(k)
    ]
    return procs, "invoice-mailer.reissued"


def start_baseline(
    broker: str, api: str, k: int, args: argparse.Namespace, workdir: Path
) -> tuple[list[subprocess.Popen[bytes]], str]:
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.baseline",
                broker,
                api + "/api/v2",
                DEFAULT_API_KEY,
                "--threads",
                str(args.concurrency),
                "--queue-type",
                args.baseline_queue_type,
            ],
            stdout=(workdir / f"baseline{n}.log").open("wb"),
            stderr=subprocess.STDOUT,
        )
        for n in range(k)
    ]
    return procs, "baseline.reissued"


Starter = Callable[..., tuple[list[subprocess.Popen[bytes]], str]]


def run_system(
    name: str,
    k: int,
    args: argparse.Namespace,
    api: str,
    start: Starter,
    others: dict[str, int | None],
) -> Figures:
    """``others``: the processes that share the machine with the workers, by name."""
    figures = Figures(name=name, processes=k)
    with vhost() as broker, tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        with Harness(broker) as harness:
            if args.backlog:
                declare_source(broker, start, k, args, api, workdir)
                harness.publish_burst(args.backlog)
                procs, _ = start(broker, api, k, args, workdir)
                started = time.monotonic()
                harness.wait_all(timeout=1800)
                figures.backlog_events_per_second = args.backlog / (time.monotonic() - started)
                figures.backlog_peak_rss_mb = [peak_rss_mb(p.pid) for p in procs]
                stop(procs)
                harness.reset()
            procs, raw_queue = start(broker, api, k, args, workdir)
            try:
                wait_consumers(broker, raw_queue, k)
                # No warm-up: the light load's first events are the first after start,
                # and what a cold worker makes them wait counts (issue 23).
                harness.publish_paced(args.light, rate=10)
                harness.wait_all(timeout=120)
                figures.light_latency = harness.latencies()
                figures.first_latency = harness.latencies(first=1)
                harness.reset()
                cpu_before = [cpu_seconds(p.pid) for p in procs]
                seen = {n: pid for n, pid in others.items() if pid is not None}
                others_before = {n: sum(cpu_seconds(pid)) for n, pid in seen.items()}
                machine_before = machine_ticks()
                first = time.monotonic()
                harness.publish_burst(args.events)
                last = harness.wait_all(timeout=900)
                cpu_after = [cpu_seconds(p.pid) for p in procs]
                figures.machine_busy, figures.machine_steal = machine_shares(
                    machine_before, machine_ticks()
                )
                figures.others_cpu_ms_per_event = {
                    n: (sum(cpu_seconds(pid)) - others_before[n]) * 1000 / args.events
                    for n, pid in seen.items()
                }
                figures.events_per_second = args.events / (last - first)
                figures.burst_latency = harness.latencies()
                user, system = (
                    sum(
                        after[i] - before[i]
                        for after, before in zip(cpu_after, cpu_before, strict=True)
                    )
                    for i in (0, 1)
                )
                figures.cpu_ms_per_event = (user + system) * 1000 / args.events
                figures.sys_cpu_ms_per_event = system * 1000 / args.events
                figures.peak_rss_mb = [peak_rss_mb(p.pid) for p in procs]
            finally:
                stop(procs)
                if args.logs:
                    args.logs.mkdir(parents=True, exist_ok=True)
                    for log in workdir.glob("*.log"):
                        shutil.copy(log, args.logs / f"{name}-{uuid.uuid4().hex[:6]}-{log.name}")
    return figures


def declare_source(
    broker: str, start: Starter, k: int, args: argparse.Namespace, api: str, workdir: Path
) -> None:
    """Start the system once so it declares its queues, then stop it: a backlog can build."""
    procs, raw_queue = start(broker, api, k, args, workdir)
    wait_consumers(broker, raw_queue, k)
    stop(procs)


# -- the harness: upstream and downstream ------------------------------------------------


class Harness:
    """Upstream (publishes ``invoice.reissued``) and downstream (captures ``email_queued``).

    It shares the machine with the workers, so it is kept cheap: no publisher confirms
    (``wait_all`` proves every event came out, or the run fails) and no polling.
    """

    def __init__(self, broker: str) -> None:
        self._conn = Connection(broker)
        self._done = threading.Condition()
        self.sent: dict[str, float] = {}
        self.received: dict[str, float] = {}
        capture = Queue(
            f"bench.capture.{uuid.uuid4().hex[:6]}",
            EXCHANGE,
            routing_key="invoice.email_queued",
            exclusive=True,
        )
        self._listen_conn = Connection(broker)
        channel = self._listen_conn.channel()
        self._consumer = Consumer(
            channel, queues=[capture], on_message=self._on_message, no_ack=True, prefetch_count=1000
        )
        self._consumer.consume()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()
        self._producer = self._conn.Producer()

    def __enter__(self) -> Harness:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self._conn.close()
        self._listen_conn.close()

    def _drain(self) -> None:
        while not self._stop.is_set():
            with suppress(TimeoutError):
                self._listen_conn.drain_events(timeout=0.1)

    def _on_message(self, message: Any) -> None:
        now = time.monotonic()
        body = message.body if isinstance(message.body, bytes) else message.body.encode()
        cause = json.loads(body)["data"]["reissuedEvent"]["id"]
        with self._done:
            if cause in self.sent and cause not in self.received:
                self.received[cause] = now
                if len(self.received) == len(self.sent):
                    self._done.notify_all()

    def _publish(self) -> None:
        event_id = f"evt_{uuid.uuid4().hex}"
        body = json.dumps(
            {
                "specversion": "1.0",
                "id": event_id,
                "source": "/bench",
                "type": "invoice.reissued",
                "data": {"invoiceId": f"inv_{uuid.uuid4().hex[:20]}"},
            }
        ).encode()
        with self._done:
            self.sent[event_id] = time.monotonic()
        self._producer.publish(
            body,
            exchange=EXCHANGE,
            routing_key="invoice.reissued",
            content_type="application/cloudevents+json",
            content_encoding="utf-8",
            delivery_mode=2,
        )

    def publish_burst(self, n: int) -> None:
        for _ in range(n):
            self._publish()

    def publish_paced(self, n: int, *, rate: float) -> None:
        start = time.monotonic()
        for i in range(n):
            time.sleep(max(0.0, start + i / rate - time.monotonic()))  # pacing, not syncing
            self._publish()

    def wait_all(self, timeout: float) -> float:
        """Wait until every event sent has come out; the time the last one did."""
        with self._done:
            if not self._done.wait_for(lambda: len(self.received) == len(self.sent), timeout):
                raise SystemExit(
                    f"bench: {len(self.sent) - len(self.received)} events never came out"
                )
            return max(self.received.values(), default=0.0)

    def latencies(self, first: int | None = None) -> list[float]:
        """Sorted; of the ``first`` events published only, if given."""
        with self._done:
            sent = list(self.sent.items())[:first]
            return sorted(self.received[k] - t for k, t in sent if k in self.received)

    def reset(self) -> None:
        with self._done:
            self.sent.clear()
            self.received.clear()


# -- plumbing ----------------------------------------------------------------------------


@contextmanager
def vhost() -> Iterator[str]:
    name = f"invoice-mailer-bench-{uuid.uuid4().hex[:8]}"
    subprocess.run(["rabbitmqctl", "-q", "add_vhost", name], check=True)
    subprocess.run(
        ["rabbitmqctl", "-q", "set_permissions", "-p", name, "guest", ".*", ".*", ".*"], check=True
    )
    try:
        yield f"amqp://guest:guest@127.0.0.1:5672/{name}"
    finally:
        subprocess.run(["rabbitmqctl", "-q", "delete_vhost", name], check=False)


@contextmanager
def sandbox_process(latency: float) -> Iterator[tuple[str, int]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "sandbox", "--port", str(port), "--latency", str(latency)],
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None
    proc.stdout.readline()  # "billing sandbox on ...": it is listening
    try:
        yield f"http://127.0.0.1:{port}", proc.pid
    finally:
        proc.terminate()
        proc.wait(10)


def wait_consumers(broker: str, queue: str, n: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    with Connection(broker) as conn:
        while time.monotonic() < deadline:
            with conn.channel() as channel:
                try:
                    if channel.queue_declare(queue, passive=True).consumer_count >= n:
                        return
                except conn.channel_errors:
                    pass
            time.sleep(0.1)
    raise SystemExit(f"bench: {n} consumers on {queue} never appeared")


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(60)
        except subprocess.TimeoutExpired:
            p.kill()


def rabbitmq_pid() -> int | None:
    """The broker's Erlang VM, when it runs on this machine and we may read it."""
    found = subprocess.run(["pgrep", "-o", "beam.smp"], capture_output=True, text=True)
    return int(found.stdout.split()[0]) if found.returncode == 0 else None


def cpu_seconds(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLOCK_TICKS, int(fields[12]) / CLOCK_TICKS  # utime, stime


def machine_ticks() -> list[int]:
    """The machine's CPU time so far, all cores, by state (the ``cpu`` line of /proc/stat)."""
    return [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]


def machine_shares(before: list[int], after: list[int]) -> tuple[float, float]:
    """Busy and stolen shares of all cores between two readings.

    Busy is everything but idle and iowait: whatever ran (the workers, the broker, the
    sandbox, the load generator, the kernel's network work) and the time the hypervisor
    stole for other machines while ours wanted to run, which it could not use either.
    Steal is also returned on its own.
    """
    delta = [a - b for a, b in zip(after, before, strict=True)]
    total = sum(delta[:8])  # guest time is already counted in user
    idle, iowait, steal = delta[3], delta[4], delta[7]
    return (total - idle - iowait) / total, steal / total


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    return (
        statistics.quantiles(values, n=100, method="inclusive")[int(p) - 1]
        if len(values) > 1
        else values[0]
    )


@dataclass(frozen=True)
class Target:
    """One target of the issues' performance bars, met or not by this run's figures."""

    name: str
    figure: str
    bound: str
    met: bool | None  # None: not measured by this run (say how to measure it)


def targets(project: Figures, baseline: Figures | None, latency: float) -> list[Target]:
    """The bars (issue 18: at least the baseline's events/s at no more than 1.5x its CPU
    per event; issue 23: 1.3x the events/s at 0.75x the CPU, light-load p50 and p99,
    RSS) against this run's figures, as ratios within the one run."""
    found: list[Target] = []
    if baseline is not None and baseline.events_per_second and baseline.cpu_ms_per_event:
        speed = project.events_per_second / baseline.events_per_second
        cpu = project.cpu_ms_per_event / baseline.cpu_ms_per_event
        found += [
            Target("events/s vs baseline (issue 18)", f"{speed:.2f}x", ">= 1.00x", speed >= 1.0),
            Target("CPU/event vs baseline (issue 18)", f"{cpu:.2f}x", "<= 1.50x", cpu <= 1.5),
            Target("events/s vs baseline (issue 23)", f"{speed:.2f}x", ">= 1.30x", speed >= 1.3),
            Target("CPU/event vs baseline (issue 23)", f"{cpu:.2f}x", "<= 0.75x", cpu <= 0.75),
        ]
    else:
        for name in ("events/s vs baseline", "CPU/event vs baseline"):
            found.append(Target(name, "-", "needs the baseline (drop --no-baseline)", None))
    for p, slack in ((50, 0.010), (99, 0.040)):
        bound = 2 * latency + slack
        value = percentile(project.light_latency, p)
        measured = bool(project.light_latency)
        found.append(
            Target(
                f"light-load p{p}",
                f"{value * 1000:.0f} ms" if measured else "-",
                f"<= {bound * 1000:.0f} ms",
                value <= bound if measured else None,
            )
        )
    rss = max(project.peak_rss_mb, default=0.0)
    found.append(Target("peak RSS per process", f"{rss:.0f} MB", "< 100 MB", rss < 100))
    if project.backlog_peak_rss_mb:
        grown = max(project.backlog_peak_rss_mb) - rss
        found.append(
            Target("RSS growth over the backlog", f"{grown:+.0f} MB", "<= +10 MB", grown <= 10)
        )
    else:
        found.append(Target("RSS flat over 20,000 events", "-", "needs --backlog 20000", None))
    return found


def print_targets(found: list[Target]) -> None:
    print(f"\n{'target':36} {'figure':>9} {'bound':>12}  verdict")
    for target in found:
        verdict = {True: "PASS", False: "FAIL", None: "not measured"}[target.met]
        print(f"{target.name:36} {target.figure:>9} {target.bound:>12}  {verdict}")


def report(project: Figures, baseline: Figures | None, args: argparse.Namespace) -> None:
    bound = project.processes * args.concurrency / (2 * args.latency)
    rows: list[tuple[str, float, float | None, str]] = []

    def row(label: str, value: Callable[[Figures], float], fmt: str) -> None:
        rows.append((label, value(project), value(baseline) if baseline else None, fmt))

    row("events/s (burst)", lambda f: f.events_per_second, "{:.0f}")
    for p in (50, 95, 99):
        row(
            f"light-load latency p{p} ms",
            lambda f, p=p: percentile(f.light_latency, p) * 1000,
            "{:.0f}",
        )
    row(
        "first event after start ms (max)",
        lambda f: max(f.first_latency, default=math.nan) * 1000,
        "{:.0f}",
    )
    for p in (50, 95, 99):
        row(
            f"burst latency p{p} ms", lambda f, p=p: percentile(f.burst_latency, p) * 1000, "{:.0f}"
        )
    row("CPU ms / event", lambda f: f.cpu_ms_per_event, "{:.2f}")
    row("  of which system (kernel)", lambda f: f.sys_cpu_ms_per_event, "{:.2f}")
    row("peak RSS MB / process (max)", lambda f: max(f.peak_rss_mb), "{:.0f}")
    for name in project.others_cpu_ms_per_event:
        row(
            f"  {name} CPU ms / event",
            lambda f, name=name: f.others_cpu_ms_per_event.get(name, 0.0),
            "{:.2f}",
        )
    row("machine busy % (all cores, burst)", lambda f: f.machine_busy * 100, "{:.0f}")
    row("  stolen by the hypervisor %", lambda f: f.machine_steal * 100, "{:.1f}")
    if args.backlog:
        row(
            f"backlog {args.backlog}: events/s",
            lambda f: f.backlog_events_per_second or 0,
            "{:.0f}",
        )
        row(f"backlog {args.backlog}: peak RSS MB", lambda f: max(f.backlog_peak_rss_mb), "{:.0f}")
    print(
        f"\n== {project.processes} process(es), {args.concurrency} in flight each, API latency "
        f"{args.latency * 1000:.0f} ms, burst {args.events}, light {args.light} at 10/s =="
    )
    print(
        f"concurrency bound: {project.processes} x {args.concurrency} in flight / "
        f"(2 x {args.latency * 1000:.0f} ms) = {bound:.0f} events/s"
    )
    print(f"{'figure':34} {'invoice-mailer':>15} {'baseline':>10} {'ratio':>7}")
    for label, mine, theirs, fmt in rows:
        ratio = f"{mine / theirs:.2f}" if theirs else "-"
        theirs_text = fmt.format(theirs) if theirs is not None else "-"
        print(f"{label:34} {fmt.format(mine):>15} {theirs_text:>10} {ratio:>7}")
    print_targets(targets(project, baseline, args.latency))


if __name__ == "__main__":
    main()
