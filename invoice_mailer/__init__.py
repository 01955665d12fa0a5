"""invoice-mailer's core: events, billing clients, retry policy, publisher, pipeline.

Framework-free: nothing here imports Celery or reads the environment. The
``tasks``, ``consumers`` and ``settings`` packages adapt it to Celery, kombu
consumers and the process environment.
"""

from invoice_mailer.errors import (
    BillingError,
    InvalidEvent,
    InvoiceMailerError,
    PublishError,
    RateLimited,
    Rejected,
    TransientError,
)

__all__ = [
    "BillingError",
    "InvalidEvent",
    "InvoiceMailerError",
    "PublishError",
    "RateLimited",
    "Rejected",
    "TransientError",
]
