"""Step log lines: routine steps at DEBUG, the outcome and surprises at INFO, give-ups WARNING."""

from __future__ import annotations

import logging

import pytest

from invoice_mailer.observe import LoggingObserver, StepRecord


def _record(step: str, outcome: str, **fields: object) -> StepRecord:
    return StepRecord(
        event_id="evt_1", invoice="inv_1", provider="hostup", step=step, outcome=outcome, **fields
    )  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("step", "outcome", "level"),
    [
        ("receive", "accepted", logging.DEBUG),
        ("resend", "done", logging.DEBUG),
        ("email_info", "done", logging.DEBUG),
        ("publish", "published", logging.INFO),
        ("resend", "rate_limited", logging.INFO),
        ("resend", "server_error", logging.INFO),
        ("claim", "duplicate", logging.INFO),
        ("resend", "gave_up", logging.WARNING),
        ("validate", "invalid", logging.WARNING),
    ],
)
def test_each_outcome_has_its_level(
    caplog: pytest.LogCaptureFixture, step: str, outcome: str, level: int
) -> None:
    caplog.set_level(logging.DEBUG, logger="invoice_mailer.pipeline")
    LoggingObserver().on_step(_record(step, outcome, status=200, duration_seconds=0.05))
    [line] = caplog.records
    assert (line.levelno, line.getMessage()) == (level, f"{step} {outcome}")
    assert line.__dict__["invoice"] == "inv_1"
    assert line.__dict__["status"] == 200


def test_routine_steps_are_not_formatted_when_debug_is_off(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="invoice_mailer.pipeline")
    observer = LoggingObserver()
    for step in ("receive", "resend", "email_info"):
        observer.on_step(_record(step, "accepted" if step == "receive" else "done"))
    observer.on_step(_record("publish", "published"))
    assert [r.getMessage() for r in caplog.records] == ["publish published"]
