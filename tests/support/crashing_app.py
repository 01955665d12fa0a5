"""A worker app that kills itself with SIGKILL at a chosen point of the pipeline, once.

Start it as ``celery -A tests.support.crashing_app worker`` with
``CRASH_AT`` (claimed | resent | published) and either ``CRASH_MARKER``
(a file path: the crash happens only if it does not exist yet, so a restart runs
clean) or ``CRASH_INVOICE`` (crash every time that invoice is handled: a poison event).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from invoice_mailer.job import Job
from settings import load_or_exit
from tasks import create_app

_CRASH_AT = os.environ["CRASH_AT"]
_MARKER = Path(os.environ.get("CRASH_MARKER", "/nonexistent/never"))
_POISON = os.environ.get("CRASH_INVOICE")


def _crash_once(point: str, job: Job) -> None:
    """Crash once (marker file), or every time for the CRASH_INVOICE (a poison event)."""
    if point != _CRASH_AT:
        return
    if _POISON is not None:
        if job.event.invoice == _POISON:
            os.kill(os.getpid(), signal.SIGKILL)
        return
    if not _MARKER.exists():
        _MARKER.write_text(job.event.event_id)
        os.kill(os.getpid(), signal.SIGKILL)  # kill -9: no cleanup, no ack, nothing


app = create_app(load_or_exit(), checkpoint=_crash_once)
