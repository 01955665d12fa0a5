"""Dependency health: the transitions as a table, outage detection, the shared gate."""

from __future__ import annotations

import time

import httpx
import pytest

from invoice_mailer.dependencies import Dependencies
from invoice_mailer.health import (
    BreakerPolicy,
    Health,
    InMemoryHealthStore,
    Outcomes,
    State,
    gate,
    healthy,
    on_probe,
    opened,
    probe_due,
)
from invoice_mailer.ledger import Ledger

T0 = 1_800_000_000.0
POLICY = BreakerPolicy(probe_first_seconds=2, probe_max_seconds=30)
OPEN_0 = Health("api:hostup", State.OPEN, since=T0, retry_at=T0 + 2, detail="503")
PROBING_0 = Health("api:hostup", State.PROBING, since=T0, retry_at=T0 + 2, probe_owner="p")
PROBING_3 = Health("api:hostup", State.PROBING, since=T0, failed_probes=3, probe_owner="p")


@pytest.mark.parametrize(
    ("before", "event", "state", "retry_in", "failed_probes", "since"),
    [
        # An outage seen while healthy: open, first probe after 2 s.
        (healthy("api:hostup", T0), "outage", State.OPEN, 2, 0, T0 + 10),
        # The probe failed: open again, the wait doubled; the outage keeps its start.
        (PROBING_0, "probe_failed", State.OPEN, 4, 1, T0),
        (PROBING_3, "probe_failed", State.OPEN, 30, 4, T0),  # capped
        # The probe succeeded: healthy, from now.
        (PROBING_3, "probe_ok", State.HEALTHY, None, 0, T0 + 10),
    ],
)
def test_transitions(
    before: Health,
    event: str,
    state: State,
    retry_in: float | None,
    failed_probes: int,
    since: float,
) -> None:
    now = T0 + 10
    if event == "outage":
        after = opened(before, now, "503", POLICY)
    else:
        after = on_probe(before, event == "probe_ok", now, "503", POLICY)
    assert after.state is state
    assert (after.retry_at - now if after.retry_at else None) == retry_in
    assert after.failed_probes == failed_probes
    assert after.since == since


@pytest.mark.parametrize(
    ("health", "now", "due"),
    [
        (healthy("api:hostup", T0), T0 + 100, False),
        (OPEN_0, T0 + 1, False),  # still waiting
        (OPEN_0, T0 + 2, True),  # its wait over
        (Health("api:hostup", State.OPEN, since=T0), T0, True),  # no wait named
        (Health("api:hostup", State.PROBING, since=T0, probe_until=T0 + 30), T0 + 29, False),
        (Health("api:hostup", State.PROBING, since=T0, probe_until=T0 + 30), T0 + 30, True),
        (gate("budget:hostup", T0 + 5, T0, "429"), T0 + 5, True),
    ],
    ids=["healthy", "open", "open-due", "open-no-wait", "probing", "probe-holder-gone", "gate"],
)
def test_when_a_probe_is_due(health: Health, now: float, due: bool) -> None:
    assert probe_due(health, now) is due


def test_intake_lets_events_in_while_a_probe_is_due_and_only_then() -> None:
    """With no event parked, only a new one can probe: intake is held while the
    outage's wait runs and while a live probe is out, not while a probe is due."""
    store, clock = InMemoryHealthStore(), _Clock()
    deps = Dependencies(store, policy=POLICY, clock=clock, cache_seconds=0)
    names = ["api:hostup", "bus"]
    for key in "abcde":
        deps.failed("api:hostup", key, "503 internal_error")
    assert [h.dependency for h in deps.unhealthy(names)] == ["api:hostup"]
    assert [h.dependency for h in deps.unhealthy(names, for_intake=True)] == ["api:hostup"]
    clock.now += 2  # the probe is due: readiness still says unhealthy, intake opens
    assert [h.dependency for h in deps.unhealthy(names)] == ["api:hostup"]
    assert deps.unhealthy(names, for_intake=True) == []
    probe = deps.check("api:hostup", "first-new-event")
    assert (probe.go, probe.probe) == (True, True)
    assert not deps.check("api:hostup", "second-new-event").go  # it waits in the broker
    assert [h.dependency for h in deps.unhealthy(names, for_intake=True)] == ["api:hostup"]
    clock.now += POLICY.probe_lease_seconds  # the probe's holder died with it
    assert deps.unhealthy(names, for_intake=True) == []
    again = deps.check("api:hostup", "third-new-event")
    assert (again.go, again.probe) == (True, True)
    deps.failed("api:hostup", "y", "503 internal_error", probe=True)
    assert [h.dependency for h in deps.unhealthy(names, for_intake=True)] == ["api:hostup"]
    clock.now += 4  # the wait doubled
    assert deps.unhealthy(names, for_intake=True) == []


def test_a_gate_is_open_until_the_named_moment() -> None:
    held = gate("budget:hostup", T0 + 5, T0, "429 rate_limit_exceeded")
    assert (held.state, held.retry_at) == (State.OPEN, T0 + 5)


@pytest.mark.parametrize(
    ("outcomes", "outage"),
    [
        ([(False, "a")] * 5, False),  # one invoice failing alone: its own problem
        ([(False, k) for k in "abcde"], True),
        ([(False, k) for k in "abcd"], False),  # fewer than min_failures
        ([(False, k) for k in "abcde"] + [(True, k) for k in "fghijk"], False),  # most succeed
        ([(False, k) for k in "abcdef"] + [(True, k) for k in "ghijk"], True),
    ],
)
def test_an_outage_is_a_rate_over_a_window_not_one_event(
    outcomes: list[tuple[bool, str]], outage: bool
) -> None:
    window = Outcomes(POLICY)
    # Successes first, then failures: the verdict is about the window as it ends.
    ordered = sorted(outcomes, key=lambda o: not o[0])
    seen = [window.add(T0 + i * 0.1, ok, key) for i, (ok, key) in enumerate(ordered)]
    assert seen[-1] is outage


def test_old_outcomes_leave_the_window() -> None:
    window = Outcomes(POLICY)
    for i, key in enumerate("abcd"):
        window.add(T0 + i, False, key)
    assert not window.add(T0 + POLICY.window_seconds + 10, False, "e")


class _Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def test_one_process_opens_the_circuit_for_all_and_one_probe_closes_it() -> None:
    store, clock = InMemoryHealthStore(), _Clock()
    a = Dependencies(store, policy=POLICY, clock=clock, cache_seconds=0)
    b = Dependencies(store, policy=POLICY, clock=clock, cache_seconds=0)
    for key in "abcde":
        a.failed("api:hostup", key, "503 internal_error")
    assert store.health("api:hostup", clock.now).state is State.OPEN
    waiting = b.check("api:hostup", "run-b")  # the other process waits, without asking
    assert not waiting.go
    assert waiting.wait >= 1
    clock.now += 2
    probe = b.check("api:hostup", "run-b")
    assert (probe.go, probe.probe) == (True, True)
    other = a.check("api:hostup", "run-a")  # one probe at a time
    assert not other.go
    b.succeeded("api:hostup", "f", probe=True)
    assert store.health("api:hostup", clock.now).ok
    assert a.check("api:hostup", "run-a").go


def test_a_dependency_that_says_itself_it_serves_no_one_opens_at_once() -> None:
    """A broker's connection.blocked is about every publish, not one: one failure opens
    the circuit, where an ordinary failure only joins the window."""
    store, clock = InMemoryHealthStore(), _Clock()
    deps = Dependencies(store, policy=POLICY, clock=clock, cache_seconds=0)
    deps.failed("bus", "e1", "unroutable: no queue bound")
    assert store.health("bus", clock.now).ok
    deps.failed("bus", "e2", "blocked: memory alarm", certain=True)
    health = store.health("bus", clock.now)
    assert (health.state, health.detail) == (State.OPEN, "blocked: memory alarm")


def test_waiting_events_come_back_spread_not_in_one_wave() -> None:
    store, clock = InMemoryHealthStore(), _Clock()
    deps = Dependencies(store, clock=clock, cache_seconds=0)
    deps.hold("budget:hostup", T0 + 5, "429 rate_limit_exceeded")
    # The budget known (20/s): one slot each, 50 ms apart, after the gate's time.
    waits = [deps.check("budget:hostup", f"run-{n}", spacing=0.05).wait for n in range(200)]
    assert min(waits) == pytest.approx(5)
    assert max(waits) == pytest.approx(5 + 199 * 0.05)
    # Unknown: spread over the second after it, nothing reserved.
    unknown = [deps.check("budget:hostup", f"run-{n}").wait for n in range(200)]
    assert 5 <= min(unknown) < max(unknown) < 6


def test_a_state_change_is_one_log_line_per_process_and_a_reminder_while_it_lasts(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store, clock = InMemoryHealthStore(), _Clock()
    opener = Dependencies(store, policy=POLICY, clock=clock, cache_seconds=0, remind_seconds=60)
    other = Dependencies(store, policy=POLICY, clock=clock, cache_seconds=0, remind_seconds=60)
    caplog.set_level("INFO", logger="invoice_mailer.health")
    opener.state("bus")
    other.state("bus")
    for key in "abcde":
        opener.failed("bus", key, "unroutable: NO_ROUTE")
    for _ in range(100):
        clock.now += 0.5
        opener.check("bus", "run-1")
        other.check("bus", "run-2")
    # The opener: one ERROR for the fleet (one Sentry event); the other: one WARNING.
    assert [r.levelname for r in caplog.records] == ["ERROR", "WARNING"]
    clock.now += 60
    other.state("bus")
    assert len(caplog.records) == 3
    assert "still unhealthy" in caplog.records[-1].getMessage()


def test_an_event_that_waits_for_the_api_sends_nothing_and_is_not_left_uncertain(
    tmp_path: object,
) -> None:
    """The circuit is open: the event waits (no try used up) without a request; when it
    closes, the event goes as if nothing had happened: one POST, one email-info, and no
    email-info lookup for an "unanswered" resend that was never sent."""
    from pathlib import Path

    from invoice_mailer.billing import HostUpClient, HttpConfig, build_http_client
    from invoice_mailer.events import Reissued
    from invoice_mailer.ledger import open_ledger
    from invoice_mailer.pipeline import Done, Job, Pipeline, RetryLater
    from invoice_mailer.policy import RetryPolicy
    from invoice_mailer.publishing import InMemoryPublisher
    from sandbox import DEFAULT_API_KEY, Sandbox

    store = InMemoryHealthStore()
    ledger = open_ledger(f"sqlite:///{Path(str(tmp_path))}/ledger.sqlite3")
    deps = Dependencies(store, policy=POLICY, cache_seconds=0)
    store.put(opened(healthy("api:hostup", T0), time.time() + 60, "503", POLICY))
    with Sandbox() as sb, build_http_client(HttpConfig(timeout_seconds=2)) as http:
        pipeline = Pipeline(
            provider=HostUpClient(http=http, base_url=sb.hostup_url, api_key=DEFAULT_API_KEY),
            publisher=InMemoryPublisher(),
            ledger=ledger,
            policy=RetryPolicy(),
            lease_seconds=30,
            dependencies=deps,
        )
        job = Job.new(
            Reissued(event_id="evt_1", source="/billing", invoice="inv_1"),
            body="{}",
            content_type=None,
        )
        waiting = pipeline.run(job)
        assert isinstance(waiting, RetryLater)
        assert (waiting.kind, waiting.code) == ("paused", "api:hostup")
        assert sb.requests() == []
        assert waiting.job.step_history("resend").attempts == 0
        store.put(healthy("api:hostup", T0))
        done = pipeline.run(waiting.job)
        requests = [(r.method, r.endpoint) for r in sb.requests()]
    ledger.close()
    assert isinstance(done, Done)
    assert requests == [("POST", "resend"), ("GET", "email_info")]


def test_an_outage_longer_than_the_event_may_wait_gives_it_up_without_a_request(
    ledger: Ledger, http: httpx.Client
) -> None:
    """RETRY_OUTAGE_MAX_WAIT_SECONDS spent: dependency_unavailable, a dead letter and an
    invoice.email_failed; and no request was sent on the way."""
    from invoice_mailer.billing import HostUpClient
    from invoice_mailer.events import Reissued
    from invoice_mailer.pipeline import GaveUp, Job, Pipeline
    from invoice_mailer.policy import RetryPolicy
    from invoice_mailer.publishing import InMemoryPublisher
    from sandbox import DEFAULT_API_KEY, Sandbox

    store = InMemoryHealthStore()
    store.put(opened(healthy("api:hostup", T0), time.time() + 60, "503", POLICY))
    publisher = InMemoryPublisher()
    with Sandbox() as sb:
        pipeline = Pipeline(
            provider=HostUpClient(http=http, base_url=sb.hostup_url, api_key=DEFAULT_API_KEY),
            publisher=publisher,
            ledger=ledger,
            policy=RetryPolicy(),
            lease_seconds=30,
            dependencies=Dependencies(store, policy=POLICY, cache_seconds=0),
            outage_max_wait_seconds=30,
        )
        job = Job.new(
            Reissued(event_id="evt_1", source="/billing", invoice="inv_1"),
            body="{}",
            content_type=None,
        )
        outcome = pipeline.run(job)
        assert sb.requests() == []
    assert isinstance(outcome, GaveUp)
    assert outcome.reason["code"] == "dependency_unavailable"
    assert [letter.code for letter in publisher.dead_letters] == ["dependency_unavailable"]
