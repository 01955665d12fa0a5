"""Python code run as a gevent worker runs it: patched before anything else is imported."""

from __future__ import annotations

import os
import subprocess
import sys


def run_under_gevent(
    body: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``body`` in a fresh interpreter after ``monkey.patch_all()``; its output as text.
    ``env`` is added to this process's environment."""
    code = "from gevent import monkey; monkey.patch_all()\n" + body
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, **(env or {})},
    )
