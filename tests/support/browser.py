"""A real browser for pages: Debian's chromium, headless, the DOM as it stands once the
page's scripts have run (``--virtual-time-budget`` lets them fetch and render)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

import pytest

__all__ = ["rendered"]


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    if os.environ.get("CI"):
        pytest.fail("chromium is needed (Debian: apt-get install chromium)")
    pytest.skip("chromium not installed (Debian: apt-get install chromium)")


def rendered(url: str, *, budget_ms: int = 10_000) -> str:
    """The page's DOM after its scripts ran for up to ``budget_ms`` of virtual time.

    A fresh profile each time, and none of Chromium's own network traffic (updates,
    sync, QUIC): on a closed network those connections are refused, many at a time."""
    with tempfile.TemporaryDirectory() as profile:
        done = subprocess.run(
            [
                _chromium(),
                "--headless",
                "--no-sandbox",  # root in CI containers
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={profile}",
                f"--virtual-time-budget={budget_ms}",
                "--dump-dom",
                url,
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout
