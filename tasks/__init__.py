"""Celery adapter: ``celery -A tasks worker``.

``tasks.app`` is built from the environment on first access, so importing this
package (the demo, tests) reads nothing until someone asks for the app.
"""

from __future__ import annotations

from typing import Any

from tasks._app import TASK_QUEUE, InvoiceMailerCelery, create_app
from tasks.pipeline import TASK_NAME, job_repr

__all__ = ["TASK_NAME", "TASK_QUEUE", "InvoiceMailerCelery", "app", "create_app", "job_repr"]

_app: InvoiceMailerCelery | None = None


def __getattr__(name: str) -> Any:
    global _app
    if name == "app":
        if _app is None:
            from settings import load_or_exit

            _app = create_app(load_or_exit())
        return _app
    raise AttributeError(f"module 'tasks' has no attribute {name!r}")
