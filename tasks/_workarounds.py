"""Workarounds of Celery's behaviour, each with the upstream code it works around.

Each has a test in ``tests/unit/test_upstream.py`` that fails once upstream changes
the behaviour, so the workaround can be dropped rather than carried forever.
"""

from __future__ import annotations

from celery.exceptions import Retry

__all__ = ["ReadableRetry"]


class ReadableRetry(Retry):  # type: ignore[misc]
    """A ``Retry`` whose repr is its cause: what Flower shows for ``task-retried``.

    ``celery.worker.request.Request.on_retry`` (5.7.0) sends
    ``safe_repr(exc_info.exception.exc)``, but ``celery.app.trace.handle_retry`` built
    ``exc_info`` with ``billiard.einfo.ExceptionInfo``, which wraps the exception in an
    ``ExceptionWithTraceback``: ``.exception.exc`` is then the ``Retry`` itself, and
    Flower shows ``Retry(Retry(...), Waiting('...'), 6)`` instead of the cause.
    """

    @classmethod
    def of(cls, retry: Retry) -> ReadableRetry:
        return cls(retry.message, retry.exc, retry.when, is_eager=retry.is_eager, sig=retry.sig)

    def __repr__(self) -> str:
        return repr(self.exc)
