"""An API's request budget, learned from its ``X-RateLimit-*`` headers (or configured).

A fleet that only learns its budget from 429s spends part of it on 429s and waits out
every reset. An API that says ``X-RateLimit-Limit: L`` and ``X-RateLimit-Reset: s``
(seconds until its window ends, or a Unix time) allows about ``L`` requests per window;
the window is at least the longest ``s`` seen. ``RateBudget.rate`` is then requests per
second, a little under (``HEADROOM``) so that evenly spaced requests never meet a window
boundary with one too many; a configured ceiling wins when it is lower, and stands
alone for an API that publishes nothing. The pipeline spaces requests at that rate
across the whole fleet with slots reserved in the shared health store
(``HealthStore.reserve``).

Hand-written because what is learned is the API's own limit, told per answer;
``limits`` and ``pyrate-limiter`` enforce a limit we would have to know in advance.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping

__all__ = ["HEADROOM", "RateBudget"]

HEADROOM = 0.95
_EPOCH = 1_000_000_000  # an X-RateLimit-Reset above this is a Unix time


class RateBudget:
    """Requests per second one API allows the account; thread-safe."""

    def __init__(self, ceiling: float | None = None) -> None:
        self._ceiling = ceiling
        self._limit: float | None = None
        self._window = 0.0
        self._lock = threading.Lock()
        self.remaining: float | None = None
        """The last ``X-RateLimit-Remaining`` told (requests left in the window), if any."""

    def observe(self, headers: Mapping[str, str], api_now: float) -> None:
        """One answer's ``X-RateLimit-Limit`` and ``X-RateLimit-Reset``, if it has them."""
        limit = _number(headers.get("x-ratelimit-limit"))
        reset = _number(headers.get("x-ratelimit-reset"))
        remaining = _number(headers.get("x-ratelimit-remaining"))
        if remaining is not None:
            self.remaining = remaining
        if limit is None or limit <= 0 or reset is None:
            return
        if reset >= _EPOCH:
            reset -= api_now
        with self._lock:
            self._limit = limit
            self._window = max(self._window, math.ceil(reset), 1.0)

    def rate(self) -> float | None:
        """Requests per second to keep to, or None when nothing is known or configured."""
        with self._lock:
            learned = self._limit / self._window * HEADROOM if self._limit else None
        rates = [r for r in (learned, self._ceiling) if r]
        return min(rates) if rates else None


def _number(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        number = float(value.strip())
    except ValueError:
        return None
    return number if math.isfinite(number) else None
