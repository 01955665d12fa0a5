"""Whether a service the tests need answers: skip locally, fail in CI."""

from __future__ import annotations

import os
import socket
from typing import NoReturn

import pytest


def require(name: str, host: str, port: int) -> None:
    """Skip without the service locally; in CI (``CI`` set) its absence is a failure."""
    try:
        with socket.create_connection((host, port), timeout=2):
            pass
    except OSError as exc:
        unavailable(f"{name} is not reachable at {host}:{port}: {exc}")


def unavailable(reason: str) -> NoReturn:
    """What the tests need is missing: skip locally, fail in CI (``CI`` set)."""
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)
