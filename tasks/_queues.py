"""The task queue's name, apart from the app so that the task module can route to it."""

from __future__ import annotations

__all__ = ["TASK_DELIVERY_LIMIT", "TASK_QUEUE"]

TASK_QUEUE = "invoice-mailer.tasks"
# A task that kills its worker every time is dead-lettered after this many deliveries.
TASK_DELIVERY_LIMIT = 10
