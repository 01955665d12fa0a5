"""What the pipeline and consumer report as they go: one record per step.

The same record becomes a structured log line, Prometheus counters and, for a
give-up, a Sentry event; each is an ``Observer`` the adapters plug in, so the
core stays free of those libraries' globals.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Protocol

__all__ = ["LoggingObserver", "Observer", "Observers", "StepRecord"]


@dataclass(frozen=True, slots=True)
class StepRecord:
    """One step of one event, as it ended."""

    event_id: str | None
    invoice: str | None
    provider: str
    step: str
    """``receive``, ``validate``, ``claim``, ``resend``, ``email_info``, ``publish``, ``ledger``."""
    outcome: str
    """``done``, ``rate_limited``, ``server_error``, ``gave_up``, ``duplicate``, ``busy``,
    ``published``, ``published_failure``, ``invalid``, ..."""
    attempt: int = 1
    status: int | None = None
    code: str | None = None
    duration_seconds: float | None = None
    wait_seconds: int | None = None
    detail: str | None = None
    failed_step: str | None = None
    """On ``published_failure``: the step that gave up."""


class Observer(Protocol):
    def on_step(self, record: StepRecord) -> None: ...


class Observers:
    """Several observers as one; one failing never stops the others or the pipeline."""

    def __init__(self, observers: Sequence[Observer]) -> None:
        self._observers = list(observers)

    def on_step(self, record: StepRecord) -> None:
        for observer in self._observers:
            try:
                observer.on_step(record)
            except Exception:
                logging.getLogger("invoice_mailer.observe").exception(
                    "observer %s failed", type(observer).__name__
                )


# Steps that went as they should on the way to the event's outcome: logged at DEBUG,
# so an event that goes well is one INFO line (its publication). A line costs about
# 0.15 ms of worker CPU, a tenth of the whole event's (README, "Performance").
# Waits behind an unhealthy dependency are routine too: the dependency's state change is
# logged once (invoice_mailer.dependencies), not once per waiting event.
_ROUTINE = frozenset({"accepted", "done", "paused", "paced", "unavailable"})


class LoggingObserver:
    """One structured line per step; fields go to ``extra`` for JSON formatters.

    Routine steps are DEBUG, the outcome and anything unusual INFO, give-ups WARNING.
    """

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self._log = logger or logging.getLogger("invoice_mailer.pipeline")

    def on_step(self, record: StepRecord) -> None:
        if record.outcome in ("gave_up", "invalid"):
            level = logging.WARNING
        elif record.outcome in _ROUTINE:
            level = logging.DEBUG
        else:
            level = logging.INFO
        if not self._log.isEnabledFor(level):
            return
        fields = {k: v for k, v in asdict(record).items() if v is not None and k != "detail"}
        self._log.log(level, "%s %s", record.step, record.outcome, extra=fields)
