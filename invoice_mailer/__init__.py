"""invoice-mailer's core: events, billing clients, retry policy, steps, pipeline, ledger.

Framework-free: nothing here imports Celery, kombu or prometheus_client, or reads
the environment. Its dependencies are Protocols (``billing.BillingProvider``,
``ledger.Ledger``, ``publishing.Publisher``, ``observe.Observer``), each with an
in-memory fake or a real local implementation beside it. The ``broker`` package
adapts it to RabbitMQ, ``tasks`` and ``consumers`` to Celery, ``settings`` to the
process environment.
"""

from invoice_mailer.errors import (
    BillingError,
    InvalidEvent,
    InvoiceMailerError,
    LedgerError,
    PublishError,
    PublishFailure,
    RateLimited,
    Rejected,
    TransientError,
)

__all__ = [
    "BillingError",
    "InvalidEvent",
    "InvoiceMailerError",
    "LedgerError",
    "PublishError",
    "PublishFailure",
    "RateLimited",
    "Rejected",
    "TransientError",
]
