"""What to do after a failed step: a pure function of the error and the history.

No I/O, no clock, no global randomness: ``decide`` takes everything it needs, so
the whole retry table of CONTRACT.md is testable exhaustively.

* 429 waits what the server asked (the largest of its hints), plus a little
  jitter so a fleet does not wake at once, and never less; the waits add up
  against ``rate_limit_max_wait_seconds`` and do not use the 5xx attempts.
* 5xx, timeouts and connection errors back off exponentially with *equal*
  jitter (half fixed, half random): full jitter spreads as well but can wait
  less the second time than the first, and a struggling server should see the
  gaps grow. A 503's ``Retry-After`` is a floor.
* Any other error gives up at once.

Delays are whole seconds, at least one: RabbitMQ's delay queues (Celery's
native delayed delivery) count in whole seconds.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace

from invoice_mailer.errors import BillingError, RateLimited, TransientError

__all__ = [
    "GiveUp",
    "Retry",
    "RetryPolicy",
    "StepHistory",
    "decide",
    "server_error_delay",
    "whole_seconds",
]

# Without a hint a 429 still waits this long: the server said "too many", not "when".
DEFAULT_RATE_LIMIT_WAIT_SECONDS = 60.0
# Jitter added to a 429 wait: a tenth of it, capped, so a day-long wait moves by minutes.
RATE_LIMIT_JITTER_FRACTION = 0.1
RATE_LIMIT_JITTER_MAX_SECONDS = 300.0


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """The retry settings of CONTRACT.md, as values."""

    server_error_max_attempts: int = 8
    server_error_base_seconds: float = 2.0
    server_error_max_seconds: float = 600.0
    rate_limit_max_wait_seconds: float = 172_800.0


@dataclass(frozen=True, slots=True)
class StepHistory:
    """What one step has been through so far; carried with the task between tries."""

    attempts: int = 0
    server_errors: int = 0
    rate_limited_seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class Retry:
    """Try the step again after ``delay_seconds``; ``history`` includes this failure."""

    delay_seconds: int
    history: StepHistory
    kind: str
    """``rate_limited`` or ``server_error``: which budget the wait comes out of."""


@dataclass(frozen=True, slots=True)
class GiveUp:
    """Stop trying; ``code`` and ``detail`` say why, ``history`` includes this failure."""

    status: int | None
    code: str
    detail: str
    history: StepHistory


def decide(
    error: BillingError,
    history: StepHistory,
    policy: RetryPolicy,
    rng: random.Random,
    *,
    rate_limited_elsewhere: float = 0.0,
) -> Retry | GiveUp:
    """The retry table: one failed attempt of a step in, what to do next out.

    ``history`` is the step's history *before* this failure;
    ``rate_limited_elsewhere`` the 429 waits the event's other steps already took,
    since the 429 budget is per event.
    """
    if isinstance(error, RateLimited):
        return _after_rate_limit(error, history, policy, rng, rate_limited_elsewhere)
    if isinstance(error, TransientError):
        return _after_server_error(error, history, policy, rng)
    return GiveUp(
        status=error.status,
        code=error.code,
        detail=error.detail,
        history=replace(history, attempts=history.attempts + 1),
    )


def server_error_delay(failures: int, policy: RetryPolicy, rng: random.Random) -> float:
    """Backoff after the ``failures``-th consecutive server error: in [cap/2, cap]."""
    exponent = min(failures - 1, 64)  # 2**64 seconds outlives any cap
    cap = min(policy.server_error_max_seconds, policy.server_error_base_seconds * 2.0**exponent)
    return cap / 2 + rng.uniform(0, cap / 2)


def _after_rate_limit(
    error: RateLimited,
    history: StepHistory,
    policy: RetryPolicy,
    rng: random.Random,
    elsewhere: float,
) -> Retry | GiveUp:
    asked = error.retry_after if error.retry_after is not None else DEFAULT_RATE_LIMIT_WAIT_SECONDS
    jitter = rng.uniform(0, min(asked * RATE_LIMIT_JITTER_FRACTION, RATE_LIMIT_JITTER_MAX_SECONDS))
    delay = whole_seconds(asked + jitter)
    after = replace(history, attempts=history.attempts + 1)
    if elsewhere + history.rate_limited_seconds + delay > policy.rate_limit_max_wait_seconds:
        return GiveUp(
            status=error.status,
            code=error.code,
            detail=(
                f"{error.detail} (rate limited: waiting {delay}s more would exceed "
                f"{policy.rate_limit_max_wait_seconds:g}s in all)"
            ),
            history=after,
        )
    return Retry(
        delay_seconds=delay,
        history=replace(after, rate_limited_seconds=history.rate_limited_seconds + delay),
        kind="rate_limited",
    )


def _after_server_error(
    error: TransientError, history: StepHistory, policy: RetryPolicy, rng: random.Random
) -> Retry | GiveUp:
    failures = history.server_errors + 1
    after = replace(history, attempts=history.attempts + 1, server_errors=failures)
    if failures >= policy.server_error_max_attempts:
        return GiveUp(
            status=error.status,
            code=error.code,
            detail=f"{error.detail} (gave up after {failures} attempts)",
            history=after,
        )
    delay = server_error_delay(failures, policy, rng)
    if error.retry_after is not None:
        delay = max(delay, error.retry_after)
    return Retry(delay_seconds=whole_seconds(delay), history=after, kind="server_error")


def whole_seconds(seconds: float) -> int:
    """A delay the broker can hold: whole seconds, at least one."""
    return max(1, math.ceil(seconds))
