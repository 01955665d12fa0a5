"""One process's view of the shared dependency health: a gate before each call, the
call's outcome after it (``invoice_mailer.health`` has the states and transitions).

Reads are cached for ``cache_seconds``, so a healthy fleet pays one read per dependency
per second per process, not one per event. Each state change this process sees is
logged once (and a reminder every ``remind_seconds`` while it lasts): an outage is a
handful of lines, not one per event. The process that opens a dependency logs one
ERROR for the fleet: one Sentry event per outage.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable

from invoice_mailer.health import (
    BreakerPolicy,
    Gate,
    Health,
    HealthStore,
    Outcomes,
    State,
    gate,
    healthy,
    on_probe,
    opened,
    probe_due,
)

__all__ = ["BUS", "Dependencies", "api", "budget", "pace"]

log = logging.getLogger("invoice_mailer.health")

BUS = "bus"


def api(provider: str) -> str:
    """The billing API of ``provider``: its outages (5xx, timeouts, connection errors)."""
    return f"api:{provider}"


def budget(provider: str) -> str:
    """The account-wide rate budget of ``provider``: closed by a 429 that speaks for it."""
    return f"budget:{provider}"


def _is_gate(dependency: str) -> bool:
    """A rate budget is a gate: shut until the time the API named, then open by itself."""
    return dependency.startswith("budget:")


def pace(provider: str) -> str:
    """The slots that space ``provider``'s requests to its budget's rate, fleet-wide."""
    return f"pace:{provider}"


class Dependencies:
    """Shared health, as one worker process consults and updates it."""

    def __init__(
        self,
        store: HealthStore,
        *,
        policy: BreakerPolicy | None = None,
        clock: Callable[[], float] = time.time,
        cache_seconds: float = 1.0,
        remind_seconds: float = 60.0,
        rng: random.Random | None = None,
    ) -> None:
        self._store = store
        self._policy = policy or BreakerPolicy()
        self._now = clock
        self._cache_seconds = cache_seconds
        self._rng = rng or random.Random()
        self._remind = remind_seconds
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[float, Health]] = {}
        self._seen: dict[str, tuple[bool, float]] = {}
        self._outcomes: dict[str, Outcomes] = {}

    def state(self, dependency: str) -> Health:
        """The dependency's shared state, at most ``cache_seconds`` old."""
        now = self._now()
        with self._lock:
            cached = self._cache.get(dependency)
        if cached is not None and now - cached[0] < self._cache_seconds:
            return cached[1]
        health = self._store.health(dependency, now)
        with self._lock:
            self._cache[dependency] = (now, health)
        self._noticed(health, now)
        return health

    def check(self, dependency: str, owner: str, *, spacing: float | None = None) -> Gate:
        """May an attempt call ``dependency`` now? Go, go as its one probe, or wait (for a
        slot ``spacing`` after the last one given: the API's rate, when known)."""
        health = self.state(dependency)
        if health.ok:
            return Gate(go=True)
        now = self._now()
        due = probe_due(health, now)
        if due and _is_gate(dependency):
            self._reopen(health, now)
            return Gate(go=True)
        if due and self._store.take_probe(dependency, owner, now, self._policy.probe_lease_seconds):
            self._forget(dependency)
            return Gate(go=True, probe=True, health=health)
        not_before = health.retry_at if health.retry_at and health.retry_at > now else now + 1
        if spacing is None:  # no rate known: spread over a second, reserve nothing
            return Gate(
                go=False, wait=max(1.0, not_before - now + self._rng.random()), health=health
            )
        slot = self._store.reserve(dependency, not_before, spacing)
        return Gate(go=False, wait=max(1.0, slot - now), health=health)

    def succeeded(self, dependency: str, key: str, *, probe: bool = False) -> None:
        now = self._now()
        if probe:
            self._settle_probe(dependency, True, now, "the probe succeeded")
            return
        self._window(dependency).add(now, True, key)

    def failed(
        self, dependency: str, key: str, detail: str, *, probe: bool = False, certain: bool = False
    ) -> None:
        """A call failed as an outage would fail it (5xx, timeout, no connection, no route).
        ``certain``: the dependency said itself that it serves no one (a broker's
        ``connection.blocked``): it opens at once, without a window of failures."""
        now = self._now()
        if probe:
            self._settle_probe(dependency, False, now, detail)
            return
        if self._window(dependency).add(now, False, key) or certain:
            current = self._store.health(dependency, now)
            if current.ok and self._store.put(
                opened(current, now, detail, self._policy), expect=State.HEALTHY
            ):
                # Once per outage for the whole fleet (the process that opened it): an
                # ERROR, so Sentry's logging integration makes it one event, not one per event.
                log.error(
                    "%s opened for every worker: %s",
                    dependency,
                    detail,
                    extra={"dependency": dependency, "state": "open"},
                )
                with self._lock:  # said: this process's notice would say it twice
                    self._seen[dependency] = (False, now)
            self._window(dependency).clear()
            self._forget(dependency)

    def hold(self, dependency: str, until: float, detail: str) -> None:
        """Close ``dependency`` to every process until ``until`` (an account-wide limit)."""
        now = self._now()
        current = self.state(dependency)
        if current.ok or (current.retry_at or 0) < until:
            self._store.put(gate(dependency, until, now, detail))
            self._forget(dependency)

    def reserve(self, dependency: str, interval: float) -> float:
        """The next free moment, fleet-wide, for one request to ``dependency``, the slots
        ``interval`` apart (pacing to a rate)."""
        return self._store.reserve(dependency, self._now(), interval)

    def unhealthy(self, dependencies: list[str], *, for_intake: bool = False) -> list[Health]:
        """The ``dependencies`` unhealthy for the fleet (a gate whose time is up opens).

        ``for_intake``: less those whose probe is due. The probe is an event's attempt,
        and while intake waits only parked events come back to make one; with none
        parked (all given up after a long outage, or their delay queues lost) nothing
        would probe, and the fleet would wait for good. So intake lets events in while
        the probe is due: one of them takes it (a conditional write, once for the
        fleet), the others wait in the broker as the parked ones do, and intake waits
        again once the probe is out (``probing``) or failed (``open``, a longer wait).
        """
        found = []
        now = self._now()
        for health in (self.state(d) for d in dependencies):
            if health.ok:
                continue
            due = probe_due(health, now)
            if due and _is_gate(health.dependency):
                self._reopen(health, now)
            elif not (for_intake and due):
                found.append(health)
        return found

    def _reopen(self, health: Health, now: float) -> None:
        """A gate whose time is up opens by itself, without a probe: the first to see it
        says so for all (one conditional write)."""
        self._store.put(healthy(health.dependency, now), expect=State.OPEN)
        self._forget(health.dependency)

    # -- internals ---------------------------------------------------------------------

    def _settle_probe(self, dependency: str, ok: bool, now: float, detail: str) -> None:
        current = self._store.health(dependency, now)
        if current.state is not State.PROBING:
            return
        self._store.put(on_probe(current, ok, now, detail, self._policy), expect=State.PROBING)
        self._window(dependency).clear()
        self._forget(dependency)

    def _window(self, dependency: str) -> Outcomes:
        with self._lock:
            window = self._outcomes.get(dependency)
            if window is None:
                window = self._outcomes[dependency] = Outcomes(self._policy)
            return window

    def _forget(self, dependency: str) -> None:
        with self._lock:
            self._cache.pop(dependency, None)

    def _noticed(self, health: Health, now: float) -> None:
        """One log line per state change this process sees, and a reminder while it lasts.
        (A rate budget's gate is flow control, seconds long: its 429 is the event's line.)"""
        if _is_gate(health.dependency):
            return
        with self._lock:
            last = self._seen.get(health.dependency)
            changed = (last[0] if last else True) is not health.ok
            remind = last is not None and not changed and not health.ok
            remind = remind and now - last[1] >= self._remind  # type: ignore[index]
            if changed or remind:
                self._seen[health.dependency] = (health.ok, now)
        fields = {"dependency": health.dependency, "state": str(health.state)}
        if health.ok and changed and last is not None:
            log.info("%s healthy again", health.dependency, extra=fields)
        elif changed and not health.ok:
            log.warning(
                "%s unhealthy since %.0f s: %s; events wait in the broker",
                health.dependency,
                now - health.since,
                health.detail,
                extra=fields,
            )
        elif remind:
            log.warning(
                "%s still unhealthy after %.0f s: %s",
                health.dependency,
                now - health.since,
                health.detail,
                extra=fields,
            )
