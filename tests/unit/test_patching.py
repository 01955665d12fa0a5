"""``invoice_mailer.patching``: gevent's patching asked about without importing gevent."""

from __future__ import annotations

import subprocess
import sys

from tests.support.patched import run_under_gevent


def test_unpatched_the_originals_are_the_modules_own() -> None:
    code = (
        "import select, sys\n"
        "from invoice_mailer.patching import original, patched\n"
        "print(patched('socket'), patched('threading'),\n"
        "      original('select', 'poll') is select.poll, 'gevent' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.stdout.split() == ["False", "False", "True", "False"], done.stderr


def test_patched_the_originals_are_the_ones_gevent_replaced() -> None:
    done = run_under_gevent(
        "import select\n"
        "from invoice_mailer.patching import original, patched\n"
        "print(patched('socket'), patched('threading'),\n"
        "      original('select', 'poll') is monkey.get_original('select', 'poll'),\n"
        "      original('select', 'poll') is not select.poll)\n"
    )
    assert done.stdout.split() == ["True", "True", "True", "True"], done.stderr
