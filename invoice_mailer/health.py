"""Dependency health: a condition that is not about one event is detected once and shared.

A billing API that is down, an account-wide rate limit, a bus with nothing bound: each
event that meets one alone would retry on its own schedule, give up after its retry
table, and write its own dead letter and log lines. Instead the condition becomes the
state of the dependency, shared by every worker process and host (``HealthStore``: a
table of the ledger's database), and events wait for it in the broker without using up
their tries.

=============  ============================================  ============================
state          what attempts do                              how it ends
=============  ============================================  ============================
``healthy``    go                                            an outage is seen: ``open``
``open``       wait in the broker until ``retry_at``         ``retry_at`` passes: the first
                                                             attempt then is the probe
``probing``    one attempt (the probe's holder) goes,        probe succeeds: ``healthy``;
               the others wait                               fails: ``open``, longer wait
=============  ============================================  ============================

An outage is a rate over a window, not one bad event (``Outcomes.outage``): at least
``min_failures`` failures, from at least ``min_keys`` distinct events, making at least
``failure_ratio`` of the outcomes seen in ``window_seconds``. A 5xx that one invoice
gets while others succeed stays that event's problem. A gate (an account-wide rate
limit) is ``open`` until the moment the API named, without a probe: it closes by itself
(the first process to see its time up writes it ``healthy``).

The transitions are pure functions of the state and the clock, tested as a table
(``tests/unit/test_health.py``); the store applies them with conditional writes.
"""

from __future__ import annotations

import threading
from collections import Counter, deque
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Protocol

__all__ = [
    "BreakerPolicy",
    "Gate",
    "Health",
    "HealthStore",
    "InMemoryHealthStore",
    "Outcomes",
    "State",
    "gate",
    "healthy",
    "on_probe",
    "opened",
    "probe_due",
]


class State(StrEnum):
    HEALTHY = "healthy"
    OPEN = "open"
    PROBING = "probing"


@dataclass(frozen=True, slots=True)
class BreakerPolicy:
    window_seconds: float = 30.0
    min_failures: int = 5
    min_keys: int = 3
    failure_ratio: float = 0.5
    probe_first_seconds: float = 2.0
    """The first wait before a probe; doubled after each failed probe, up to the max."""
    probe_max_seconds: float = 30.0
    probe_lease_seconds: float = 30.0
    """A probe holder that died frees the probe after this long."""


@dataclass(frozen=True, slots=True)
class Health:
    """One dependency's shared state (``dependency``: ``api:hostup``, ``bus``...)."""

    dependency: str
    state: State
    since: float
    retry_at: float | None = None
    """``open``: when the next probe may go (or, for a gate, when it opens again)."""
    failed_probes: int = 0
    probe_owner: str | None = None
    probe_until: float | None = None
    detail: str | None = None

    @property
    def ok(self) -> bool:
        return self.state is State.HEALTHY


def healthy(dependency: str, now: float) -> Health:
    return Health(dependency, State.HEALTHY, since=now)


def opened(current: Health, now: float, detail: str, policy: BreakerPolicy) -> Health:
    """An outage seen (from ``healthy``) or a probe failed (from ``probing``)."""
    failed = current.failed_probes + 1 if current.state is State.PROBING else 0
    wait = min(policy.probe_first_seconds * 2**failed, policy.probe_max_seconds)
    since = current.since if current.state is not State.HEALTHY else now
    return Health(
        current.dependency,
        State.OPEN,
        since=since,
        retry_at=now + wait,
        failed_probes=failed,
        detail=detail,
    )


def on_probe(current: Health, ok: bool, now: float, detail: str, policy: BreakerPolicy) -> Health:
    """The probe's outcome: closed, or open again for longer."""
    if ok:
        return healthy(current.dependency, now)
    return opened(replace(current, state=State.PROBING), now, detail, policy)


def probe_due(health: Health, now: float) -> bool:
    """May the next attempt probe (a gate: open) ``health``'s dependency? ``open`` with
    its wait over, or ``probing`` by a holder whose lease ran out (it died)."""
    if health.state is State.OPEN:
        return health.retry_at is None or health.retry_at <= now
    if health.state is State.PROBING:
        return health.probe_until is None or health.probe_until <= now
    return False


def gate(dependency: str, until: float, now: float, detail: str) -> Health:
    """An account-wide limit: closed to everyone until ``until``, then open by itself."""
    return Health(dependency, State.OPEN, since=now, retry_at=until, detail=detail)


@dataclass(frozen=True, slots=True)
class Gate:
    """What an attempt may do now: go, go as the probe, or wait ``wait`` seconds."""

    go: bool
    probe: bool = False
    wait: float = 0.0
    health: Health | None = None


class Outcomes:
    """One process's recent calls to one dependency: enough to tell an outage.

    Counts are kept as outcomes enter and leave the window, so each call costs O(1)
    (scanning the window on every call was most of a worker's CPU under load).
    """

    def __init__(self, policy: BreakerPolicy) -> None:
        self._policy = policy
        self._seen: deque[tuple[float, bool, str]] = deque()
        self._failed_keys: Counter[str] = Counter()
        self._failures = 0
        self._lock = threading.Lock()

    def add(self, now: float, ok: bool, key: str) -> bool:
        """Record one outcome; True if the window now shows an outage."""
        with self._lock:
            self._seen.append((now, ok, key))
            if not ok:
                self._failures += 1
                self._failed_keys[key] += 1
            horizon = now - self._policy.window_seconds
            while self._seen and self._seen[0][0] < horizon:
                _, gone_ok, gone_key = self._seen.popleft()
                if not gone_ok:
                    self._failures -= 1
                    self._failed_keys[gone_key] -= 1
                    if not self._failed_keys[gone_key]:
                        del self._failed_keys[gone_key]
            if ok:
                return False  # a success never makes an outage
            p = self._policy
            return (
                self._failures >= p.min_failures
                and len(self._failed_keys) >= p.min_keys
                and self._failures >= p.failure_ratio * len(self._seen)
            )

    def clear(self) -> None:
        with self._lock:
            self._seen.clear()
            self._failed_keys.clear()
            self._failures = 0


class HealthStore(Protocol):
    """Shared health, one row per dependency; every change is one conditional write."""

    def health(self, dependency: str, now: float) -> Health:
        """The dependency's state (``healthy`` if never recorded)."""
        ...

    def put(self, health: Health, *, expect: State | None = None) -> bool:
        """Write ``health``; with ``expect``, only if the stored state is that one (so two
        processes that see one outage open it once). True if written."""
        ...

    def take_probe(self, dependency: str, owner: str, now: float, lease: float) -> bool:
        """Become the one probe of an ``open`` dependency whose ``retry_at`` has passed
        (or whose probe holder's lease ran out). True if this caller is the probe."""
        ...

    def reserve(self, dependency: str, not_before: float, interval: float) -> float:
        """A moment at or after ``not_before`` for one attempt waiting on ``dependency``,
        ``interval`` after the last one reserved: waiting events come back spread, not
        in one wave."""
        ...


class InMemoryHealthStore:
    """``HealthStore`` in one process: for unit tests and the demo."""

    def __init__(self) -> None:
        self._rows: dict[str, Health] = {}
        self._slots: dict[str, float] = {}
        self._lock = threading.Lock()

    def health(self, dependency: str, now: float) -> Health:
        with self._lock:
            return self._rows.get(dependency) or healthy(dependency, now)

    def put(self, health: Health, *, expect: State | None = None) -> bool:
        with self._lock:
            current = self._rows.get(health.dependency)
            state = current.state if current else State.HEALTHY
            if expect is not None and state is not expect:
                return False
            self._rows[health.dependency] = health
            return True

    def take_probe(self, dependency: str, owner: str, now: float, lease: float) -> bool:
        with self._lock:
            current = self._rows.get(dependency)
            if current is None or not _probe_free(current, now):
                return False
            self._rows[dependency] = replace(
                current, state=State.PROBING, probe_owner=owner, probe_until=now + lease
            )
            return True

    def reserve(self, dependency: str, not_before: float, interval: float) -> float:
        with self._lock:
            slot = max(self._slots.get(dependency, not_before), not_before)
            self._slots[dependency] = slot + interval
            return slot


def _probe_free(current: Health, now: float) -> bool:
    if current.state is State.OPEN:
        return current.retry_at is None or current.retry_at <= now
    if current.state is State.PROBING:
        return current.probe_until is None or current.probe_until <= now
    return False
