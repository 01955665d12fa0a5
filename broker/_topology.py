"""The broker objects invoice-mailer owns, named once.

Upstream publishes to the ``billing.events`` topic exchange; a durable quorum
queue holds ``invoice.reissued`` events until the worker's consumer hands them
to the pipeline. Anything unusable ends in a durable dead-letter queue, whether
the service put it there (with reason headers) or the broker did (delivery limit).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import amqp.exceptions
from kombu.connection import Connection
from kombu.entity import Exchange, Queue

__all__ = ["Topology", "TopologyMismatch"]


class TopologyMismatch(Exception):
    """A queue exists with other arguments than this configuration declares (its
    type, say): RabbitMQ refuses the declaration. ``str()`` is one line for the
    operator, naming the queue, what differs and the setting involved."""


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
    # "classic" lives on one node (as it was declared before clusters were supported);
    # on a cluster, "quorum" keeps the dead letters through the loss of that node
    # (DEAD_LETTER_QUEUE_TYPE; README "Running on several hosts").
    dead_letter_queue_type: Literal["classic", "quorum"] = "classic"

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
            queue_arguments=(
                {"x-queue-type": "quorum"} if self.dead_letter_queue_type == "quorum" else None
            ),
        )

    def declare(self, connection: Connection) -> None:
        """Declare everything (idempotent), so no event is published into the void."""
        for queue in (self.dead_letters(), self.reissued()):
            with connection.channel() as channel:  # a refused declare closes its channel
                try:
                    queue.bind(channel).declare()
                except amqp.exceptions.PreconditionFailed as exc:
                    setting = (
                        "; DEAD_LETTER_QUEUE_TYPE must match it (README: Upgrading)"
                        if queue.name == self.dead_letter_queue
                        else ""
                    )
                    raise TopologyMismatch(
                        f"queue {queue.name!r} exists with other arguments: "
                        f"{exc.reply_text}{setting}"
                    ) from None
