"""Upstream behaviours the service works around: each test fails once upstream changes.

When one fails, the workaround it names may be dropped (and this test with it).
"""

from __future__ import annotations

import inspect
import sys

from billiard.einfo import ExceptionInfo, ExceptionWithTraceback
from celery.exceptions import Retry
from celery.worker.request import Request

from tasks._workarounds import ReadableRetry


def _einfo_of(retry: Retry) -> ExceptionInfo:
    """What ``celery.app.trace.handle_retry`` builds from the raised Retry."""
    try:
        raise retry
    except Retry:
        type_, _, tb = sys.exc_info()
        return ExceptionInfo((type_, retry, tb))


def test_celery_reports_the_retry_itself_on_task_retried() -> None:
    """``Request.on_retry`` reprs ``exc_info.exception.exc``, which is the wrapped Retry,
    not its cause (``tasks._workarounds.ReadableRetry``)."""
    assert "safe_repr(exc_info.exception.exc)" in inspect.getsource(Request.on_retry)
    einfo = _einfo_of(Retry("m", ValueError("cause"), 5))
    assert isinstance(einfo.exception, ExceptionWithTraceback)
    assert isinstance(einfo.exception.exc, Retry)
    assert repr(einfo.exception.exc).startswith("Retry(")


def test_a_readable_retry_shows_its_cause() -> None:
    """With the workaround, what on_retry reprs is the cause."""
    readable = ReadableRetry.of(Retry("m", ValueError("cause"), 5))
    assert repr(_einfo_of(readable).exception.exc) == "ValueError('cause')"
    assert (readable.exc.args, readable.when) == (("cause",), 5)
