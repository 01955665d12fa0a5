"""Reading, replaying and purging the dead-letter queue.

Three kinds of message end up there, and each is shown as the original event:

* the service's own dead letters: the event body unchanged, reason in
  ``x-invoice-mailer-*`` headers;
* raw events RabbitMQ dead-lettered from ``invoice-mailer.reissued`` (delivery
  limit reached): the event body unchanged, reason in ``x-death``;
* pipeline task messages RabbitMQ dead-lettered from ``invoice-mailer.tasks``
  (delivery limit, or a retry Celery could not publish): a Celery message whose
  ``job.body`` is the original event.

Replay re-publishes the original event to ``billing.events`` / ``invoice.reissued``
with confirms; a dead letter is removed only after the broker confirmed its replay.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from kombu.connection import Connection
from kombu.entity import Queue
from kombu.message import Message

from broker._messages import raw_body
from broker._publisher import EventPublisher
from broker._topology import Topology
from invoice_mailer.events import REISSUED, glimpse
from invoice_mailer.publishing import (
    ATTEMPTS_HEADER,
    FAILED_AT_HEADER,
    REASON_CODE_HEADER,
    REASON_HEADER,
    REPLAY_HEADER,
)

__all__ = ["DeadLetterEntry", "DeadLetterQueue", "describe", "describe_message"]


@dataclass(frozen=True, slots=True)
class DeadLetterEntry:
    """One dead letter, as the event it stands for."""

    body: bytes
    content_type: str | None
    content_encoding: str | None
    event_id: str | None
    invoice: str | None
    code: str
    detail: str
    attempts: int | None
    failed_at: datetime | None
    origin: str
    """``service`` (we gave up), ``broker:reissued`` or ``broker:tasks`` (RabbitMQ did)."""


def describe(
    body: bytes, content_type: str | None, content_encoding: str | None, headers: dict[str, Any]
) -> DeadLetterEntry:
    """What a dead-letter message is about; never fails, whatever the message holds."""
    if REASON_CODE_HEADER in headers:
        code = str(headers[REASON_CODE_HEADER])
        reason = str(headers.get(REASON_HEADER, code))
        detail = reason.split(": ", 1)[1] if ": " in reason else reason
        attempts = headers.get(ATTEMPTS_HEADER)
        failed_at = _from_epoch(headers.get(FAILED_AT_HEADER))
        origin = "service"
    else:
        death = _first_death(headers)
        code = str(death.get("reason", "unknown"))
        queue = str(death.get("queue", "?"))
        detail = f"dead-lettered by RabbitMQ from {queue}"
        attempts = death.get("count")
        failed_at = death.get("time") if isinstance(death.get("time"), datetime) else None
        origin = "broker:tasks" if "task" in headers else "broker:reissued"
        if "task" in headers:
            body, content_type, content_encoding = _unwrap_task(body)
    seen = glimpse(body)
    return DeadLetterEntry(
        body=body,
        content_type=content_type,
        content_encoding=content_encoding,
        event_id=seen.event_id,
        invoice=seen.invoice,
        code=code,
        detail=detail,
        attempts=int(attempts) if isinstance(attempts, int) else None,
        failed_at=failed_at,
        origin=origin,
    )


class DeadLetterQueue:
    """The dead-letter queue, for an operator: browse, replay, purge."""

    def __init__(self, url: str, topology: Topology) -> None:
        self._url = url
        self._topology = topology

    def entries(self) -> list[DeadLetterEntry]:
        """Every dead letter, oldest first, leaving the queue as it was."""
        with self._browse() as messages:
            return [describe_message(m) for m in messages]

    def replay(
        self, select: Callable[[DeadLetterEntry], bool], *, dry_run: bool = False
    ) -> list[DeadLetterEntry]:
        """Re-publish the selected dead letters; each is acked only after its confirm."""
        replayed = []
        publisher = None if dry_run else EventPublisher.connect(self._url, self._topology)
        try:
            with self._browse() as messages:
                for message in messages:
                    entry = describe_message(message)
                    if not select(entry):
                        continue
                    replayed.append(entry)
                    if publisher is None:
                        continue
                    publisher.publish_raw(
                        entry.body,
                        routing_key=REISSUED,
                        content_type=entry.content_type,
                        message_id=entry.event_id,
                        headers={REPLAY_HEADER: uuid.uuid4().hex},
                    )
                    message.ack()
        finally:
            if publisher is not None:
                publisher.close()
        return replayed

    def purge(self) -> int:
        """Delete every dead letter; returns how many there were."""
        with Connection(self._url) as conn, conn.channel() as channel:
            return int(self._queue().bind(channel).purge() or 0)

    def _queue(self) -> Queue:
        return self._topology.dead_letters()

    @contextmanager
    def _browse(self) -> Iterator[list[Message]]:
        """All messages, fetched unacked; closing the channel returns the unacked ones."""
        with Connection(self._url) as conn:
            self._topology.declare(conn)
            channel = conn.channel()
            try:
                queue = self._queue().bind(channel)
                messages = []
                while (message := queue.get(no_ack=False, accept=None)) is not None:
                    messages.append(message)
                yield messages
            finally:
                channel.close()


def describe_message(message: Message) -> DeadLetterEntry:
    return describe(
        raw_body(message),
        message.content_type,
        message.content_encoding,
        dict(message.headers or {}),
    )


def _first_death(headers: dict[str, Any]) -> dict[str, Any]:
    deaths = headers.get("x-death")
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
        return deaths[0]
    return {}


def _unwrap_task(body: bytes) -> tuple[bytes, str | None, str | None]:
    """The original event inside a pipeline task message (Celery protocol 2)."""
    try:
        _args, kwargs, _embed = json.loads(body)
        job = kwargs["job"]
        return job["body"].encode("utf-8"), job.get("content_type"), "utf-8"
    except (ValueError, TypeError, KeyError, AttributeError):
        return body, None, None


def _from_epoch(value: object) -> datetime | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return datetime.fromtimestamp(value, UTC)
    return None
