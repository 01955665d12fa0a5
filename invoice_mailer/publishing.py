"""What the pipeline publishes, and the Protocol of whatever publishes it.

The broker adapter (``broker.EventPublisher``) implements ``Publisher`` over
RabbitMQ; ``InMemoryPublisher`` is its fake, for unit tests, as dramatiq ships
``brokers/stub.py``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, Protocol

from invoice_mailer.errors import PublishError, PublishFailure

__all__ = [
    "ATTEMPTS_HEADER",
    "FAILED_AT_HEADER",
    "REASON_CODE_HEADER",
    "REASON_HEADER",
    "REPLAY_HEADER",
    "DeadLetter",
    "InMemoryPublisher",
    "Publisher",
]

REASON_HEADER = "x-invoice-mailer-reason"
REASON_CODE_HEADER = "x-invoice-mailer-reason-code"
ATTEMPTS_HEADER = "x-invoice-mailer-attempts"
FAILED_AT_HEADER = "x-invoice-mailer-failed-at"  # Unix time, for the age of a dead letter
# On a replayed dead letter: the event may run again although it failed before.
REPLAY_HEADER = "x-invoice-mailer-replay"


class DeadLetter:
    """An event the service gave up on: its original body and why."""

    __slots__ = ("attempts", "body", "code", "content_encoding", "content_type", "detail")

    def __init__(
        self,
        *,
        body: bytes,
        content_type: str | None,
        code: str,
        detail: str,
        attempts: int,
        content_encoding: str | None = "utf-8",
    ) -> None:
        self.body = body
        self.content_type = content_type
        self.content_encoding = content_encoding
        self.code = code
        self.detail = detail
        self.attempts = attempts

    def headers(self) -> dict[str, Any]:
        return {
            REASON_HEADER: f"{self.code}: {self.detail}",
            REASON_CODE_HEADER: self.code,
            ATTEMPTS_HEADER: self.attempts,
            FAILED_AT_HEADER: round(time.time(), 3),
        }


class Publisher(Protocol):
    """Publishes outgoing events and dead letters, confirmed and routed, or raises."""

    def publish_event(self, event: Mapping[str, Any], routing_key: str) -> None:
        """One CloudEvent to the events exchange; PublishError says why not."""
        ...

    def dead_letter(self, letter: DeadLetter) -> None:
        """An event on the dead-letter queue; PublishError says why not."""
        ...


class InMemoryPublisher:
    """A ``Publisher`` that keeps what it is given; ``refuse`` makes it fail as a bus can.

    ``refuse_events`` / ``refuse_dead_letters`` hold the PublishFailure to raise, or None.
    """

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.dead_letters: list[DeadLetter] = []
        self.refuse_events: PublishFailure | None = None
        self.refuse_dead_letters: PublishFailure | None = None

    def publish_event(self, event: Mapping[str, Any], routing_key: str) -> None:
        if self.refuse_events is not None:  # BLOCKED as a broker's first one: written, held
            held = self.refuse_events is PublishFailure.BLOCKED
            raise PublishError(
                self.refuse_events, f"refused {routing_key!r} (in memory)", held=held
            )
        self.events.append((routing_key, dict(event)))

    def dead_letter(self, letter: DeadLetter) -> None:
        if self.refuse_dead_letters is not None:
            raise PublishError(self.refuse_dead_letters, "refused a dead letter (in memory)")
        self.dead_letters.append(letter)
