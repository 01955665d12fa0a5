"""The broker objects invoice-mailer owns, named once.

Upstream publishes to the ``billing.events`` topic exchange; a durable quorum
queue holds ``invoice.reissued`` events until the worker's consumer hands them
to the pipeline. Anything unusable ends in a durable dead-letter queue, whether
the service put it there (with reason headers) or the broker did (delivery limit).
"""

from __future__ import annotations

from dataclasses import dataclass

from kombu.connection import Connection
from kombu.entity import Exchange, Queue

__all__ = ["Topology"]

REISSUED_ROUTING_KEY = "invoice.reissued"


@dataclass(frozen=True, slots=True, kw_only=True)
class Topology:
    """Names of the exchanges and queues; ``events_exchange`` comes from settings."""

    events_exchange: str = "billing.events"
    reissued_queue: str = "invoice-mailer.reissued"
    dead_letter_exchange: str = "invoice-mailer.dead-letter"
    dead_letter_queue: str = "invoice-mailer.dead-letter"
    # Deliveries of one raw event before the broker dead-letters it: bounds a poison loop.
    reissued_delivery_limit: int = 20

    def watched_queues(self, task_queue: str) -> dict[str, str]:
        """The queues whose depths operators watch, by the label ``status`` and the
        metrics give them."""
        return {
            "reissued": self.reissued_queue,
            "tasks": task_queue,
            "dead_letter": self.dead_letter_queue,
        }

    def events(self) -> Exchange:
        return Exchange(self.events_exchange, type="topic", durable=True)

    def dead_letters_exchange(self) -> Exchange:
        return Exchange(self.dead_letter_exchange, type="direct", durable=True)

    def reissued(self) -> Queue:
        return Queue(
            self.reissued_queue,
            exchange=self.events(),
            routing_key=REISSUED_ROUTING_KEY,
            durable=True,
            queue_arguments={
                "x-queue-type": "quorum",
                "x-delivery-limit": self.reissued_delivery_limit,
                "x-dead-letter-exchange": self.dead_letter_exchange,
                "x-dead-letter-routing-key": self.dead_letter_queue,
            },
        )

    def dead_letters(self) -> Queue:
        return Queue(
            self.dead_letter_queue,
            exchange=self.dead_letters_exchange(),
            routing_key=self.dead_letter_queue,
            durable=True,
        )

    def declare(self, connection: Connection) -> None:
        """Declare everything (idempotent), so no event is published into the void."""
        with connection.channel() as channel:
            for queue in (self.dead_letters(), self.reissued()):
                queue.bind(channel).declare()
