"""Logging for the worker: one line per record, JSON or console, addresses masked.

Celery configures logging unless a ``setup_logging`` receiver is connected; this
module connects one, so the root logger stays ours (``worker_hijack_root_logger``
is off as well).
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from celery import signals
from pythonjsonlogger.json import JsonFormatter

from invoice_mailer.untrusted import EMAIL

__all__ = ["MaskAddresses", "configure_logging"]

_format = "console"


class MaskAddresses(logging.Filter):
    """E-mail addresses never reach a log line, whatever logged them."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "@" in message:
            record.msg, record.args = EMAIL.sub("[email]", message), ()
        return True


def set_format(fmt: str) -> None:
    global _format
    _format = fmt


def configure_logging(fmt: str, level: int | str = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(
            JsonFormatter(
                "%(asctime)s %(levelname)s %(name)s %(message)s",
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            )
        )
    else:
        handler.setFormatter(
            logging.Formatter("[%(asctime)s: %(levelname)s/%(processName)s] %(name)s: %(message)s")
        )
    handler.addFilter(MaskAddresses())
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level)
    # Our step lines say all of this once per step; these would say it again per
    # request and per task, at a cost measured in the benchmark.
    for chatty in ("httpx", "celery.app.trace", "celery.worker.strategy"):
        logging.getLogger(chatty).setLevel(max(logging.WARNING, _level(level)))


def _level(level: int | str) -> int:
    return level if isinstance(level, int) else logging.getLevelName(str(level).upper())


@signals.setup_logging.connect
def _setup_logging(loglevel: Any = None, **_: Any) -> None:
    configure_logging(_format, loglevel or logging.INFO)
