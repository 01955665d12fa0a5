"""Unit fixtures: a SQLite ledger in the test's directory, one HTTP client, a clock."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from invoice_mailer.billing import HttpConfig, build_http_client
from invoice_mailer.ledger import Ledger, open_ledger


class Clock:
    """A clock the test moves: ``clock.now += 20``."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    ledger = open_ledger(f"sqlite:///{tmp_path}/ledger.sqlite3")
    yield ledger
    ledger.close()


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with build_http_client(HttpConfig(timeout_seconds=2)) as client:
        yield client
