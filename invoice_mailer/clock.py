"""The API's clock as seen from ours: an offset known only within bounds.

An unanswered resend is looked for in email-info by the ``createdAt`` of the
emails listed there, a time in the API's clock; the resend began at a time in
ours. Comparing the two directly sends a second email when the API's clock is a
little behind ours, and takes an earlier email for the new one when it is ahead.

Every answer says what time it is at the API: its ``Date`` header (whole seconds),
a problem document's ``timestamp`` and a resend's ``queuedAt`` (milliseconds). An
answer generated at API time ``S`` (true value in ``[S, S + resolution)``) between
our ``sent`` and ``received`` bounds the offset (API minus ours) to
``[S - received, S + resolution - sent]``. ``ApiClock`` keeps the intersection of
those intervals, so answers that tick at different phases of the second narrow it
to about one round trip. Clocks drift: the bounds widen by ``DRIFT`` per second of
age, and an interval that no longer meets a new sample (the API's clock was
stepped) is replaced by it. No library does this small thing (NTP clients discipline
the local clock, which a worker must not touch).

``placement`` is the pure judgement: was an email created before a resend began, after
it, or too close to tell?
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from email.utils import parsedate_to_datetime
from enum import StrEnum

__all__ = ["DRIFT", "ApiClock", "Offset", "Placement", "parse_http_date", "parse_iso", "placement"]

DRIFT = 1e-4
"""Seconds per second two unsynchronised clocks may drift apart (100 ppm, a cheap crystal)."""
MILLISECOND = 0.001


@dataclass(frozen=True, slots=True)
class Offset:
    """API time minus our time, somewhere in ``[low, high]`` seconds."""

    low: float
    high: float

    @property
    def uncertainty(self) -> float:
        return self.high - self.low


class Placement(StrEnum):
    BEFORE = "before"
    """Created before the resend could have reached the API: not its email."""
    AFTER = "after"
    """Created after the resend began, whatever the offset within its bounds."""
    WITHIN = "within"
    """Created within the offset's uncertainty of the resend's start: cannot tell."""


def placement(created: float, began: float, offset: Offset) -> Placement:
    """Where an email created at API time ``created`` (ms precision) falls against a
    resend that began at our time ``began``."""
    earliest, latest = began + offset.low, began + offset.high
    if created + MILLISECOND <= earliest:
        return Placement.BEFORE
    if created >= latest:
        return Placement.AFTER
    return Placement.WITHIN


class ApiClock:
    """What one API's clock reads against ours; shared by a process's threads."""

    def __init__(self, *, now: Callable[[], float] = time.time) -> None:
        self._now = now
        self._lock = threading.Lock()
        self._low = self._high = self._at = 0.0
        self._known = False

    def observe(self, *, sent: float, received: float, server: float, resolution: float) -> None:
        """One answer, generated at API time ``server`` (to ``resolution`` seconds),
        between our ``sent`` and ``received``."""
        if received < sent:
            return
        low, high = server - received, server + resolution - sent
        with self._lock:
            if self._known:
                widen = DRIFT * max(0.0, received - self._at)
                kept_low, kept_high = self._low - widen, self._high + widen
                if kept_low <= high and low <= kept_high:  # still consistent: narrow it
                    low, high = max(low, kept_low), min(high, kept_high)
            self._low, self._high, self._at, self._known = low, high, received, True

    def offset(self) -> Offset | None:
        """The offset's bounds now, or None before the first answer."""
        with self._lock:
            if not self._known:
                return None
            widen = DRIFT * max(0.0, self._now() - self._at)
            return Offset(self._low - widen, self._high + widen)


def parse_http_date(value: str | None) -> float | None:
    """An HTTP ``Date`` (IMF-fixdate) as Unix time, or None if absent or unreadable."""
    if not value:
        return None
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return when.timestamp() if when.tzinfo is not None else None


def parse_iso(value: object) -> float | None:
    """An RFC 3339 timestamp with a zone (``...Z``) as Unix time, or None."""
    if not isinstance(value, str):
        return None
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        return None
    return when.timestamp() if when.tzinfo is not None else None
