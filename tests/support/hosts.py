"""Worker "hosts" on one machine: a network namespace each, linked to the test by veth.

The test's own namespace gets a bridge ``imbr0`` at ``GATEWAY`` (10.231.0.1/24); host
``i`` is the namespace ``im-h<i>`` whose ``eth0`` (10.231.0.<10+i>/24) is one end of a
veth pair whose other end is on the bridge. Inside a host, 127.0.0.1 is the host's
own loopback: what it reaches of the test's services (the cluster's nodes, the
sandbox, PostgreSQL through a gate) it reaches at ``GATEWAY``, across its link, so
taking the link down cuts the host off as a pulled cable would: no reset, no FIN,
only silence, until heartbeats and timeouts notice. Nothing is added to the machine's
own loopback; ``close`` removes the namespaces and the bridge.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

from tests.support.services import unavailable

BRIDGE = "imbr0"
GATEWAY = "10.231.0.1"
_PREFIX = 24


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


@dataclass(frozen=True)
class Host:
    index: int

    @property
    def namespace(self) -> str:
        return f"im-h{self.index}"

    @property
    def address(self) -> str:
        return f"10.231.0.{10 + self.index}"

    @property
    def _outside(self) -> str:
        return f"imv{self.index}"  # the veth end on the bridge

    def command(self, *argv: str) -> list[str]:
        """``argv`` run inside this host."""
        return ["ip", "netns", "exec", self.namespace, *argv]

    def cut(self) -> None:
        """Take the host's link down at the bridge, as a pulled cable: inside, eth0
        loses its carrier but keeps its address and routes, so packets go nowhere and
        nobody is told (no reset, no unreachable error), on either side."""
        _ip("link", "set", self._outside, "down")

    def mend(self) -> None:
        _ip("link", "set", self._outside, "up")


class Hosts:
    """``count`` hosts, made at once, removed by ``close`` (and at the next start if a
    run was killed before its ``close``)."""

    def __init__(self, count: int) -> None:
        self.hosts = [Host(i + 1) for i in range(count)]

    def __enter__(self) -> list[Host]:
        self.close()  # a run killed half-way leaves its namespaces behind
        _ip("link", "add", BRIDGE, "type", "bridge")
        _ip("addr", "add", f"{GATEWAY}/{_PREFIX}", "dev", BRIDGE)
        _ip("link", "set", BRIDGE, "up")
        for host in self.hosts:
            _ip("netns", "add", host.namespace)
            _ip(
                "link",
                "add",
                host._outside,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                host.namespace,
            )
            _ip("link", "set", host._outside, "master", BRIDGE)
            _ip("link", "set", host._outside, "up")
            _ip("-n", host.namespace, "addr", "add", f"{host.address}/{_PREFIX}", "dev", "eth0")
            _ip("-n", host.namespace, "link", "set", "lo", "up")
            _ip("-n", host.namespace, "link", "set", "eth0", "up")
            _ip("-n", host.namespace, "route", "add", "default", "via", GATEWAY)
        return self.hosts

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for host in self.hosts:
            with contextlib.suppress(subprocess.CalledProcessError):
                _ip("netns", "delete", host.namespace)  # its veth pair goes with it
            with contextlib.suppress(subprocess.CalledProcessError):
                # unless a process still ran in it (a run killed half-way): then not
                _ip("link", "delete", host._outside)
        with contextlib.suppress(subprocess.CalledProcessError):
            _ip("link", "delete", BRIDGE)


def require_namespaces() -> None:
    """``ip netns`` works here (root, iproute2); skip locally, fail in CI without it."""
    reason = None
    if shutil.which("ip") is None:
        reason = "worker hosts need iproute2's ip"
    elif os.geteuid() != 0:
        reason = "worker hosts in network namespaces need root"
    if reason is not None:
        unavailable(reason)


@contextlib.contextmanager
def hosts(count: int) -> Iterator[list[Host]]:
    with Hosts(count) as made:
        yield made
