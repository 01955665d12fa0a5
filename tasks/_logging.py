"""Logging for the worker: one line per record, JSON or console, addresses masked.

Celery configures logging unless a ``setup_logging`` receiver is connected; this
module connects one, so the root logger stays ours (``worker_hijack_root_logger``
is off as well).
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

from celery import current_task, signals
from kombu.utils.url import maybe_sanitize_url
from pythonjsonlogger.json import JsonFormatter

from invoice_mailer.untrusted import EMAIL

__all__ = ["ConsoleFormatter", "MaskAddresses", "TaskContext", "configure_logging"]

_format = "console"

# The fields a line's reader needs to find its event, in this order, after the message.
CONSOLE_FIELDS = (
    "event_id",
    "invoice",
    "task_id",
    "attempt",
    "status",
    "code",
    "wait_seconds",
    "dependency",
    "state",
)


def _rfc3339_utc(record: logging.LogRecord) -> str:
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    return f"{seconds}.{int(record.msecs):03d}Z"


class ConsoleFormatter(logging.Formatter):
    """``[time LEVEL/process] logger: message key=value ...``: the structured fields a
    JSON line carries (event, invoice, task id...) also on the console, and the time in
    RFC 3339 UTC, so that lines from several hosts sort and grep alike."""

    def __init__(self) -> None:
        super().__init__("[%(asctime)s %(levelname)s/%(processName)s] %(name)s: %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return _rfc3339_utc(record)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = [(k, getattr(record, k, None)) for k in CONSOLE_FIELDS]
        pairs = " ".join(f"{k}={v}" for k, v in fields if v is not None)
        if not pairs:
            return line
        first, newline, rest = line.partition("\n")  # a traceback stays below
        return f"{first} {pairs}{newline}{rest}"


class _JsonFormatter(JsonFormatter):  # type: ignore[misc]
    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return _rfc3339_utc(record)


class TaskContext(logging.Filter):
    """The Celery task id of the thread's running task, on every line it logs."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "task_id", None) is None:
            task = current_task._get_current_object()  # None outside a task
            request_id = getattr(getattr(task, "request", None), "id", None) if task else None
            if request_id is not None:
                record.task_id = request_id
        return True


class MaskAddresses(logging.Filter):
    """E-mail addresses never reach a log line, whatever logged them: in the message, and
    in the fields a line carries (an upstream event id may be an address)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "@" in message:
            record.msg, record.args = EMAIL.sub("[email]", message), ()
        for name in CONSOLE_FIELDS:
            value = getattr(record, name, None)
            if isinstance(value, str) and "@" in value:
                setattr(record, name, EMAIL.sub("[email]", value))
        return True


def set_format(fmt: str) -> None:
    global _format
    _format = fmt


def configure_logging(fmt: str, level: int | str = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(
            _JsonFormatter(
                "%(asctime)s %(levelname)s %(name)s %(message)s",
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            )
        )
    else:
        handler.setFormatter(ConsoleFormatter())
    handler.addFilter(MaskAddresses())
    handler.addFilter(TaskContext())
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


@signals.celeryd_after_setup.connect
def _one_line_banner(instance: Any = None, **_: Any) -> None:
    """With JSON logs, Celery's banner (29 plain lines on stdout) becomes one JSON line:
    a log collector parses every line the worker writes."""
    if _format != "json" or instance is None:
        return
    instance.quiet = True
    logging.getLogger("invoice_mailer.startup").info(
        "worker starting",
        extra={
            "hostname": instance.hostname,
            "concurrency": instance.concurrency,
            "transport": maybe_sanitize_url(instance.app.conf.broker_url or ""),
            "task_events": bool(instance.app.conf.worker_send_task_events),
        },
    )
