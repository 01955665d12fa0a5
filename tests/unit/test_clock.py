"""The API's clock against ours: bounds from answers, and where an email falls."""

from __future__ import annotations

import pytest

from invoice_mailer.clock import (
    DRIFT,
    ApiClock,
    Offset,
    Placement,
    parse_http_date,
    parse_iso,
    placement,
)

BEGAN = 1_800_000_000.0


@pytest.mark.parametrize(
    ("created", "offset", "expected"),
    [
        # API 0.25 s behind, known to 10 ms: an email 0.2 s "before" our start is ours.
        (BEGAN - 0.20, Offset(-0.26, -0.24), Placement.AFTER),
        (BEGAN - 0.30, Offset(-0.26, -0.24), Placement.BEFORE),
        (BEGAN - 0.25, Offset(-0.26, -0.24), Placement.WITHIN),
        # API 30 s ahead: an email 2 s before the start (API time) is an earlier one.
        (BEGAN + 28.0, Offset(29.99, 30.01), Placement.BEFORE),
        (BEGAN + 30.5, Offset(29.99, 30.01), Placement.AFTER),
        # 30 s behind, known only from one Date header (1 s resolution).
        (BEGAN - 30.0, Offset(-30.6, -29.4), Placement.WITHIN),
        (BEGAN - 29.0, Offset(-30.6, -29.4), Placement.AFTER),
        (BEGAN - 32.0, Offset(-30.6, -29.4), Placement.BEFORE),
        # createdAt is floored to the millisecond: 1 ms before the earliest is still within.
        (BEGAN - 0.0005, Offset(0.0, 0.0), Placement.WITHIN),
        (BEGAN - 0.001, Offset(0.0, 0.0), Placement.BEFORE),
        (BEGAN, Offset(0.0, 0.0), Placement.AFTER),
    ],
)
def test_placement(created: float, offset: Offset, expected: Placement) -> None:
    assert placement(created, BEGAN, offset) is expected


class _Now:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_no_answer_no_estimate() -> None:
    assert ApiClock().offset() is None


def test_one_date_header_bounds_the_offset_by_its_second_and_the_round_trip() -> None:
    now = _Now(BEGAN + 0.1)
    clock = ApiClock(now=now)
    # API 0.25 s behind: at our BEGAN + 0.05 it reads BEGAN - 0.20, Date says BEGAN - 1.
    clock.observe(sent=BEGAN, received=BEGAN + 0.1, server=BEGAN - 1.0, resolution=1.0)
    offset = clock.offset()
    assert offset is not None
    assert (offset.low, offset.high) == pytest.approx((-1.1, 0.0))
    assert offset.low <= -0.25 <= offset.high


def test_answers_at_different_phases_of_the_second_narrow_it() -> None:
    """Two Date headers either side of a tick pin the offset to about the round trip."""
    true_offset = -0.25
    now = _Now(BEGAN)
    clock = ApiClock(now=now)
    for start in (BEGAN, BEGAN + 0.2, BEGAN + 0.4, BEGAN + 0.6):
        mid = start + 0.01
        server = float(int(mid + true_offset))  # the Date header truncates to seconds
        clock.observe(sent=start, received=start + 0.02, server=server, resolution=1.0)
    now.now = BEGAN + 0.62
    offset = clock.offset()
    assert offset is not None
    assert offset.low <= true_offset <= offset.high
    assert offset.uncertainty < 0.25


def test_a_millisecond_stamp_is_as_good_as_the_round_trip() -> None:
    clock = ApiClock(now=_Now(BEGAN + 0.05))
    clock.observe(sent=BEGAN, received=BEGAN + 0.05, server=BEGAN + 30.02, resolution=0.001)
    offset = clock.offset()
    assert offset is not None
    assert offset.low == pytest.approx(29.97)
    assert offset.high == pytest.approx(30.021)


def test_bounds_widen_with_age_by_the_drift_allowance() -> None:
    now = _Now(BEGAN + 0.05)
    clock = ApiClock(now=now)
    clock.observe(sent=BEGAN, received=BEGAN + 0.05, server=BEGAN, resolution=0.001)
    before = clock.offset()
    now.now += 1000
    after = clock.offset()
    assert before is not None
    assert after is not None
    assert after.uncertainty == pytest.approx(before.uncertainty + 2 * DRIFT * 1000)


def test_a_clock_stepped_since_is_taken_from_the_new_answer() -> None:
    """An answer that no longer fits the bounds (the API's clock was set) replaces them."""
    now = _Now(BEGAN + 0.05)
    clock = ApiClock(now=now)
    clock.observe(sent=BEGAN, received=BEGAN + 0.05, server=BEGAN, resolution=0.001)
    clock.observe(sent=BEGAN + 1, received=BEGAN + 1.05, server=BEGAN + 61, resolution=0.001)
    offset = clock.offset()
    assert offset is not None
    assert offset.low == pytest.approx(59.95)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Wed, 02 Dec 2026 00:36:15 GMT", 1796171775.0),
        ("not a date", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_http_date(text: str | None, expected: float | None) -> None:
    assert parse_http_date(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-12-02T00:36:15.250Z", 1796171775.25),
        ("2026-12-02T00:36:15", None),  # no zone: no time we can place
        ("yesterday", None),
        (17, None),
    ],
)
def test_parse_iso(text: object, expected: float | None) -> None:
    assert parse_iso(text) == expected
