"""The adapter to RabbitMQ through kombu: every kombu import of the service is here,
except the raw-event consumer bootstep (``consumers/``) and Celery's own.

kombu's and py-amqp's exceptions are translated once, here: publishing raises
``invoice_mailer.errors.PublishError`` with a ``PublishFailure`` reason.
"""

from __future__ import annotations

from broker._deadletters import (
    DeadLetterEntry,
    DeadLetterQueue,
    ReasonGroup,
    Selection,
    by_reason,
    describe,
    describe_message,
)
from broker._delayed import DelayedDeliveryMissing, check_delayed_delivery
from broker._depths import QueueDepths, queue_depths
from broker._messages import raw_body
from broker._publisher import EventPublisher
from broker._topology import REISSUED_ROUTING_KEY, Topology, TopologyMismatch

__all__ = [
    "REISSUED_ROUTING_KEY",
    "DeadLetterEntry",
    "DeadLetterQueue",
    "DelayedDeliveryMissing",
    "EventPublisher",
    "QueueDepths",
    "ReasonGroup",
    "Selection",
    "Topology",
    "TopologyMismatch",
    "by_reason",
    "check_delayed_delivery",
    "describe",
    "describe_message",
    "queue_depths",
    "raw_body",
]
