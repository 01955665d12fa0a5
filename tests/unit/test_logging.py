"""The console format: the fields of a structured line, and the time in RFC 3339 UTC."""

from __future__ import annotations

import logging
import sys

import pytest

from tasks._logging import ConsoleFormatter, MaskAddresses

T = 1_800_000_000.25  # 2027-01-15T08:00:00.250Z


def _record(msg: str = "publish published", **fields: object) -> logging.LogRecord:
    record = logging.LogRecord("invoice_mailer.pipeline", logging.INFO, __file__, 1, msg, (), None)
    record.created, record.msecs = T, 250.0
    record.processName = "MainProcess"
    for name, value in fields.items():
        setattr(record, name, value)
    return record


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({}, "publish published"),
        (
            {"event_id": "evt_1", "invoice": "inv_1", "task_id": "t-1", "duration_seconds": 0.1},
            "publish published event_id=evt_1 invoice=inv_1 task_id=t-1",
        ),
        (
            {"code": "rate_limited", "wait_seconds": 6, "invoice": "inv_1"},
            "publish published invoice=inv_1 code=rate_limited wait_seconds=6",
        ),
    ],
)
def test_a_console_line_carries_the_fields_that_find_its_event(
    fields: dict[str, object], expected: str
) -> None:
    line = ConsoleFormatter().format(_record(**fields))
    assert (
        line == f"[2027-01-15T08:00:00.250Z INFO/MainProcess] invoice_mailer.pipeline: {expected}"
    )


def test_a_traceback_stays_below_the_line_with_its_fields() -> None:
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        record = _record("failed", event_id="evt_1")
        record.exc_info = sys.exc_info()
    first, *rest = ConsoleFormatter().format(record).splitlines()
    assert first.endswith("failed event_id=evt_1")
    assert rest[0] == "Traceback (most recent call last):"


def test_addresses_are_masked_before_formatting() -> None:
    record = _record("sent to billing@example.com")
    MaskAddresses().filter(record)
    assert "example.com" not in ConsoleFormatter().format(record)


def test_addresses_in_the_fields_are_masked_too() -> None:
    record = _record(event_id="someone@example.com", invoice="inv_1")
    MaskAddresses().filter(record)
    line = ConsoleFormatter().format(record)
    assert "example.com" not in line
    assert "event_id=[email] invoice=inv_1" in line
