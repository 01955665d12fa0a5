"""The retry table as a pure function: exhaustive cases and properties, no I/O."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from invoice_mailer.errors import BillingError, RateLimited, Rejected, TransientError
from invoice_mailer.policy import (
    DEFAULT_RATE_LIMIT_WAIT_SECONDS,
    GiveUp,
    Retry,
    RetryPolicy,
    StepHistory,
    decide,
)

POLICY = RetryPolicy()  # CONTRACT.md defaults


def _rng() -> random.Random:
    return random.Random(1234)


def _server(status: int | None = 500, retry_after: float | None = None) -> TransientError:
    return TransientError(
        status=status, code="internal_error", detail="boom", retry_after=retry_after
    )


def _limited(retry_after: float | None) -> RateLimited:
    return RateLimited(status=429, code="rate_limited", detail="slow down", retry_after=retry_after)


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 422])
def test_client_errors_give_up_at_once_with_the_problem_code(status: int) -> None:
    """4xx: no retry; the reason keeps status, code and detail."""
    error = Rejected(status=status, code=f"code_{status}", detail="no")
    decision = decide(error, StepHistory(), POLICY, _rng())
    assert decision == GiveUp(
        status=status, code=f"code_{status}", detail="no", history=StepHistory(attempts=1)
    )


def test_a_429_waits_at_least_what_the_server_asked() -> None:
    """Retry-After: 3 means a wait of 3 seconds or a little more."""
    decision = decide(_limited(3), StepHistory(), POLICY, _rng())
    assert isinstance(decision, Retry)
    assert 3 <= decision.delay_seconds <= 4
    assert decision.kind == "rate_limited"


def test_a_day_long_429_waits_a_day_plus_small_jitter() -> None:
    """recovery.retryAfterSeconds 86400: at least a day, at most a day and five minutes."""
    decision = decide(_limited(86400), StepHistory(), POLICY, _rng())
    assert isinstance(decision, Retry)
    assert 86400 <= decision.delay_seconds <= 86400 + 300


def test_a_429_without_a_hint_still_waits() -> None:
    """No hint is not 'now': a default wait applies."""
    decision = decide(_limited(None), StepHistory(), POLICY, _rng())
    assert isinstance(decision, Retry)
    assert decision.delay_seconds >= DEFAULT_RATE_LIMIT_WAIT_SECONDS


def test_429s_do_not_use_up_server_error_attempts() -> None:
    """Rate-limit waits are counted in seconds, not in the 5xx budget."""
    history = StepHistory(attempts=50, server_errors=POLICY.server_error_max_attempts - 1)
    decision = decide(_limited(5), history, POLICY, _rng())
    assert isinstance(decision, Retry)
    assert decision.history.server_errors == POLICY.server_error_max_attempts - 1
    assert decision.history.rate_limited_seconds == decision.delay_seconds


def test_429s_fail_once_their_waits_would_pass_the_limit() -> None:
    """The total wait is capped by RETRY_RATE_LIMIT_MAX_WAIT_SECONDS."""
    policy = RetryPolicy(rate_limit_max_wait_seconds=100_000)
    first = decide(_limited(86400), StepHistory(), policy, _rng())
    assert isinstance(first, Retry)
    second = decide(_limited(86400), first.history, policy, _rng())
    assert isinstance(second, GiveUp)
    assert second.code == "rate_limited"
    assert "100000" in second.detail


def test_the_429_budget_is_shared_by_all_steps_of_an_event() -> None:
    """Waits already spent on resend count against email-info's 429s too."""
    policy = RetryPolicy(rate_limit_max_wait_seconds=100)
    decision = decide(_limited(30), StepHistory(), policy, _rng(), rate_limited_elsewhere=80)
    assert isinstance(decision, GiveUp)
    assert isinstance(decide(_limited(30), StepHistory(), policy, _rng()), Retry)


def test_server_errors_back_off_exponentially_within_bounds() -> None:
    """Waits grow: n-th failure waits within [base*2^(n-1)/2, base*2^(n-1)], capped."""
    history = StepHistory()
    delays = []
    for n in range(1, POLICY.server_error_max_attempts):
        decision = decide(_server(), history, POLICY, _rng())
        assert isinstance(decision, Retry), n
        cap = min(POLICY.server_error_max_seconds, POLICY.server_error_base_seconds * 2 ** (n - 1))
        assert cap / 2 <= decision.delay_seconds <= max(1, cap) + 1
        delays.append(decision.delay_seconds)
        history = decision.history
    assert delays == sorted(delays)
    assert delays[-1] > delays[0]


def test_server_errors_give_up_after_max_attempts_first_included() -> None:
    """RETRY_SERVER_ERROR_MAX_ATTEMPTS tries in all, then give up with the last status."""
    policy = RetryPolicy(server_error_max_attempts=3)
    history = StepHistory()
    outcomes = []
    for _ in range(3):
        decision = decide(_server(503), history, policy, _rng())
        outcomes.append(type(decision).__name__)
        history = decision.history
    assert outcomes == ["Retry", "Retry", "GiveUp"]
    assert isinstance(decision, GiveUp)
    assert (decision.status, decision.code, decision.history.attempts) == (503, "internal_error", 3)


def test_a_503_retry_after_is_a_floor() -> None:
    """A 503 asking for 30 s waits at least 30 s even when backoff says 1-2 s."""
    decision = decide(_server(503, retry_after=30), StepHistory(), POLICY, _rng())
    assert isinstance(decision, Retry)
    assert decision.delay_seconds >= 30


@pytest.mark.parametrize("code", ["timeout", "connection_error"])
def test_timeouts_and_connection_errors_count_as_server_errors(code: str) -> None:
    """No response at all is retried like a 5xx."""
    error = TransientError(status=None, code=code, detail="x")
    decision = decide(error, StepHistory(), POLICY, _rng())
    assert isinstance(decision, Retry)
    assert decision.kind == "server_error"
    assert decision.history.server_errors == 1


_errors = st.one_of(
    st.builds(
        _server,
        st.sampled_from([500, 502, 503, 504, None]),
        st.one_of(st.none(), st.floats(0, 10_000)),
    ),
    st.builds(_limited, st.one_of(st.none(), st.floats(0, 200_000))),
    st.builds(lambda s: Rejected(status=s, code="c", detail="d"), st.integers(400, 428)),
)
_policies = st.builds(
    lambda attempts, base, extra, wait: RetryPolicy(
        server_error_max_attempts=attempts,
        server_error_base_seconds=base,
        server_error_max_seconds=base + extra,
        rate_limit_max_wait_seconds=wait,
    ),
    st.integers(1, 20),
    st.floats(0.01, 60),
    st.floats(0, 3600),
    st.floats(0, 5_000),
)


@given(policy=_policies, errors=st.lists(_errors, min_size=1, max_size=60), seed=st.integers())
def test_delays_are_whole_seconds_within_bounds(
    policy: RetryPolicy, errors: list[BillingError], seed: int
) -> None:
    """Every retry waits at least 1 s, in whole seconds, no more than its cap (or the ask)."""
    rng, history = random.Random(seed), StepHistory()
    for error in errors:
        decision = decide(error, history, policy, rng)
        if isinstance(decision, GiveUp):
            return
        assert isinstance(decision.delay_seconds, int)
        assert decision.delay_seconds >= 1
        asked = error.retry_after or 0
        if isinstance(error, RateLimited):
            assert decision.delay_seconds >= asked
            assert decision.history.rate_limited_seconds <= policy.rate_limit_max_wait_seconds
        else:
            bound = max(policy.server_error_max_seconds, asked)
            assert decision.delay_seconds <= max(1, int(bound) + 1)
        history = decision.history


@settings(deadline=None)  # a budget of many tiny 429 waits takes thousands of steps
@given(policy=_policies, errors=st.lists(_errors, min_size=1, max_size=5), seed=st.integers())
def test_giving_up_always_comes(policy: RetryPolicy, errors: list[BillingError], seed: int) -> None:
    """Failing forever (cycling through any errors) ends in GiveUp within a bounded count."""
    rng, history = random.Random(seed), StepHistory()
    # Every 429 retry adds >= 1 s to a finite budget; every 5xx uses one attempt.
    bound = policy.server_error_max_attempts + int(policy.rate_limit_max_wait_seconds) + 2
    for n in range(bound):
        decision = decide(errors[n % len(errors)], history, policy, rng)
        if isinstance(decision, GiveUp):
            assert decision.history.attempts == n + 1
            return
        history = decision.history
    pytest.fail(f"no GiveUp after {bound} failures")
