"""Python code run as a gevent worker runs it: patched before anything else is imported."""

from __future__ import annotations

import subprocess
import sys


def run_under_gevent(body: str) -> subprocess.CompletedProcess[str]:
    """``body`` in a fresh interpreter after ``monkey.patch_all()``; its output as text."""
    code = "from gevent import monkey; monkey.patch_all()\n" + body
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
