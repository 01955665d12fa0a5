"""A three-node RabbitMQ cluster of the machine's own RabbitMQ, for tests.

Each node is the installed ``rabbitmq-server`` run as the ``rabbitmq`` user (so all
share that user's Erlang cookie and the machine's epmd) under a node name, AMQP and
distribution ports, config, plugins file and data directory of its own, in a
temporary directory. The machine's own node (``rabbit@localhost``, 5672) is never
touched. Nodes listen on every interface, so that workers in network namespaces
reach them over a veth link (``tests/support/hosts.py``); ``loopback_users = none``
lets ``guest`` in from there.

Run alone: ``python -m tests.support.cluster up`` (prints the broker URLs; Ctrl-C
stops the nodes and removes their directories).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.support.services import unavailable

RABBITMQ_SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"
RABBITMQ_HOME = "/var/lib/rabbitmq"  # the rabbitmq user's home: its Erlang cookie


def _port_free(port: int) -> bool:
    with socket.socket() as probe:
        # As the nodes bind: a port in TIME_WAIT from a cluster just stopped is free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("0.0.0.0", port))  # noqa: S104 (the nodes bind there too)
        except OSError:
            return False
        return True


@dataclass(frozen=True)
class Node:
    name: str  # imc1@localhost
    amqp_port: int
    dist_port: int
    root: Path

    @property
    def short(self) -> str:
        return self.name.split("@")[0]

    def env(self) -> dict[str, str]:
        return {
            "HOME": RABBITMQ_HOME,
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_PORT": str(self.amqp_port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_CONFIG_FILE": str(self.root / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.root / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(self.root / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.root / "log"),
            "RABBITMQ_PID_FILE": str(self.root / "pid"),
        }


class RabbitCluster:
    """Start, cluster, stop and tear down ``size`` nodes; every step bounded in time."""

    def __init__(self, size: int = 3, *, base_port: int = 5681) -> None:
        self.size = size
        self.root = Path(tempfile.mkdtemp(prefix="invoice-mailer-cluster-"))
        self.nodes = [
            Node(f"imc{i + 1}@localhost", base_port + i, base_port + 20000 + i, self.root / f"n{i}")
            for i in range(size)
        ]

    # -- URLs ------------------------------------------------------------------------

    def url(self, node: Node, *, host: str = "127.0.0.1", vhost: str = "") -> str:
        return f"amqp://guest:guest@{host}:{node.amqp_port}/{vhost}"

    def failover_url(self, *, host: str = "127.0.0.1", vhost: str = "") -> str:
        """Every node, ``;``-separated: Celery and kombu fail over along the list."""
        return ";".join(self.url(node, host=host, vhost=vhost) for node in self.nodes)

    # -- life cycle --------------------------------------------------------------------

    def start(self, timeout: float = 180.0) -> None:
        busy = [
            port
            for node in self.nodes
            for port in (node.amqp_port, node.dist_port)
            if not _port_free(port)
        ]
        if busy:
            raise RuntimeError(f"cluster ports in use: {busy} (a cluster left over?)")
        for node in self.nodes:
            node.root.mkdir(parents=True)
            (node.root / "rabbitmq.conf").write_text(
                f"listeners.tcp.default = {node.amqp_port}\n"
                "loopback_users = none\n"
                # A stopped node's peers notice within seconds, not the default minute.
                "net_ticktime = 10\n"
                "log.console = false\n"
            )
            (node.root / "enabled_plugins").write_text("[].\n")
        shutil.chown(self.root, "rabbitmq", "rabbitmq")
        for path in self.root.rglob("*"):
            shutil.chown(path, "rabbitmq", "rabbitmq")
        for node in self.nodes:
            self._launch(node)
        deadline = time.monotonic() + timeout
        for node in self.nodes:
            # ``wait`` waits for the pid file, then for the node to boot (await_startup
            # fails at once while the node has not registered with epmd yet).
            remaining = max(1, int(deadline - time.monotonic()))
            self.ctl(
                node,
                "wait",
                str(node.root / "pid"),
                "--timeout",
                str(remaining),
                timeout=remaining + 30,
            )
        first = self.nodes[0]
        for node in self.nodes[1:]:
            self.ctl(node, "stop_app")
            self.ctl(node, "join_cluster", first.name)
            self.ctl(node, "start_app")
            self.await_startup(node, deadline - time.monotonic())
        running = self.ctl(first, "eval", "length(rabbit_nodes:all_running()).").strip()
        if running != str(self.size):
            raise RuntimeError(f"cluster formed with {running} running nodes, not {self.size}")

    def _launch(self, node: Node) -> None:
        subprocess.run(
            [
                "runuser",
                "-u",
                "rabbitmq",
                "--",
                "env",
                "-i",
                *_assignments(node.env()),
                RABBITMQ_SERVER,
                "-detached",
            ],
            cwd=node.root,
            check=True,
            timeout=60,
        )

    def stop_node(self, node: Node) -> None:
        """Stop the node's RabbitMQ application: its connections drop, it leaves the
        quorum (the Erlang VM stays, as after ``rabbitmqctl stop_app``)."""
        self.ctl(node, "stop_app")

    def start_node(self, node: Node, timeout: float = 120.0) -> None:
        self.ctl(node, "start_app")
        self.await_startup(node, timeout)

    def await_startup(self, node: Node, timeout: float) -> None:
        self.ctl(
            node, "await_startup", "--timeout", str(max(1, int(timeout))), timeout=timeout + 30
        )

    def close(self) -> None:
        """Stop every node (killing what does not stop) and remove the directories."""
        for node in self.nodes:
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                self.ctl(node, "stop", timeout=60)
        for node in self.nodes:
            pid_file = node.root / "pid"
            with contextlib.suppress(OSError, ValueError):
                os.kill(int(pid_file.read_text().strip()), signal.SIGKILL)
        shutil.rmtree(self.root, ignore_errors=True)

    # -- questions ---------------------------------------------------------------------

    def ctl(self, node: Node, *args: str, timeout: float = 120.0, tool: str = "rabbitmqctl") -> str:
        """A CLI tool against ``node``, as the rabbitmq user; what it printed."""
        done = subprocess.run(
            [
                "runuser",
                "-u",
                "rabbitmq",
                "--",
                "env",
                f"HOME={RABBITMQ_HOME}",
                tool,
                "-q",
                "-n",
                node.name,
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd="/",
        )
        if done.returncode != 0:
            raise subprocess.CalledProcessError(
                done.returncode, [tool, *args], done.stdout, done.stderr
            )
        return done.stdout

    def node_named(self, name: str) -> Node:
        return next(node for node in self.nodes if node.name == name)

    def _list_queues(self, vhost: str, via: Node | None, *columns: str) -> list[list[str]]:
        """``rabbitmqctl list_queues`` of ``vhost``: one list of columns per queue."""
        out = self.ctl(
            via or self.nodes[0], "list_queues", "--vhost", vhost, "--no-table-headers", *columns
        )
        return [
            line.split("\t") for line in out.splitlines() if line.count("\t") == len(columns) - 1
        ]

    def leader(self, queue: str, *, vhost: str = "/", via: Node | None = None) -> Node:
        """The node leading quorum queue ``queue``, as the cluster reports it."""
        for name, leader in self._list_queues(vhost, via, "name", "leader"):
            if name == queue:
                return self.node_named(leader)
        raise LookupError(f"no quorum queue {queue!r} in vhost {vhost!r}")

    def members(self, queue: str, *, vhost: str = "/", via: Node | None = None) -> list[str]:
        """The nodes holding a replica of quorum queue ``queue``."""
        for name, members in self._list_queues(vhost, via, "name", "members"):
            if name == queue:
                return sorted(members.strip("[] ").replace(" ", "").split(","))
        raise LookupError(f"no queue {queue!r} in vhost {vhost!r}")

    def queue_counts(self, vhost: str, *, via: Node | None = None) -> dict[str, tuple[int, int]]:
        """Every queue of ``vhost``: (messages ready, messages unacknowledged)."""
        return {
            name: (int(ready), int(unacked))
            for name, ready, unacked in self._list_queues(
                vhost, via, "name", "messages_ready", "messages_unacknowledged"
            )
            if ready.isdigit() and unacked.isdigit()
        }

    def add_vhost(self, vhost: str) -> None:
        self.ctl(self.nodes[0], "add_vhost", vhost)
        self.ctl(self.nodes[0], "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")


def _assignments(env: dict[str, str]) -> list[str]:
    return [f"{key}={value}" for key, value in env.items()]


def require_cluster_tools() -> None:
    """The machine's RabbitMQ, and root to run it as the rabbitmq user."""
    missing = [tool for tool in ("runuser", "rabbitmqctl") if shutil.which(tool) is None]
    if not Path(RABBITMQ_SERVER).exists():
        missing.append(RABBITMQ_SERVER)
    reason = None
    if missing:
        reason = f"a local RabbitMQ cluster needs {', '.join(missing)}"
    elif os.geteuid() != 0:
        reason = "a local RabbitMQ cluster needs root (nodes run as the rabbitmq user)"
    if reason is not None:
        unavailable(reason)


@contextlib.contextmanager
def running_cluster(size: int = 3) -> Iterator[RabbitCluster]:
    cluster = RabbitCluster(size)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()


if __name__ == "__main__":  # pragma: no cover (a tool for people)
    import sys

    if sys.argv[1:] != ["up"]:
        raise SystemExit("usage: python -m tests.support.cluster up")
    with running_cluster() as up:
        print(up.failover_url(), flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()
