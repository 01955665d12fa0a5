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

import hashlib
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

from broker._depths import queue_depths
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

__all__ = [
    "DeadLetterEntry",
    "DeadLetterQueue",
    "Selection",
    "by_reason",
    "describe",
    "describe_message",
]


@dataclass(frozen=True, slots=True)
class DeadLetterEntry:
    """One dead letter, as the event it stands for."""

    body: bytes
    content_type: str | None
    content_encoding: str | None
    event_id: str | None
    invoice: str | None
    source: str | None
    code: str
    detail: str
    attempts: int | None
    failed_at: datetime | None
    origin: str
    """``service`` (we gave up), ``broker:reissued`` or ``broker:tasks`` (RabbitMQ did)."""

    def identity(self) -> tuple[str, ...]:
        """What makes two dead letters the same event: ``(source, id)``, else the body."""
        if self.event_id is not None:
            return (self.source or "", self.event_id)
        return ("body", hashlib.sha256(self.body).hexdigest())

    def as_json(self, now: datetime) -> dict[str, Any]:
        """For ``--json``: every field but the body."""
        return {
            "event_id": self.event_id,
            "source": self.source,
            "invoice": self.invoice,
            "code": self.code,
            "detail": self.detail,
            "attempts": self.attempts,
            "failed_at": self.failed_at.isoformat() if self.failed_at else None,
            "age_seconds": self.age(now),
            "origin": self.origin,
        }

    def age(self, now: datetime) -> float | None:
        if self.failed_at is None:
            return None
        return max(0.0, (now - self.failed_at.astimezone(UTC)).total_seconds())


@dataclass(frozen=True, slots=True)
class Selection:
    """Which dead letters an operator means: every given criterion must hold (any of
    the values given for one); nothing given selects everything."""

    ids: frozenset[str] = frozenset()
    reasons: frozenset[str] = frozenset()
    invoices: frozenset[str] = frozenset()
    older_than: float | None = None  # seconds
    newer_than: float | None = None

    def __call__(self, entry: DeadLetterEntry, now: datetime) -> bool:
        if self.ids and entry.event_id not in self.ids:
            return False
        if self.reasons and entry.code not in self.reasons:
            return False
        if self.invoices and entry.invoice not in self.invoices:
            return False
        age = entry.age(now)
        if self.older_than is not None and (age is None or age < self.older_than):
            return False
        return not (self.newer_than is not None and (age is None or age > self.newer_than))

    @property
    def everything(self) -> bool:
        return self == Selection()


@dataclass(frozen=True, slots=True)
class ReasonGroup:
    """Dead letters that share a reason code: the ServicePulse view of failures."""

    code: str
    count: int
    oldest: datetime | None
    newest: datetime | None
    example: str  # one detail, as it reads


def by_reason(entries: list[DeadLetterEntry]) -> list[ReasonGroup]:
    """Grouped by reason code, the biggest group first."""
    groups: dict[str, list[DeadLetterEntry]] = {}
    for entry in entries:
        groups.setdefault(entry.code, []).append(entry)
    found = []
    for code, members in groups.items():
        times = [e.failed_at for e in members if e.failed_at is not None]
        found.append(
            ReasonGroup(
                code=code,
                count=len(members),
                oldest=min(times) if times else None,
                newest=max(times) if times else None,
                example=members[0].detail,
            )
        )
    return sorted(found, key=lambda g: (-g.count, g.code))


def describe(
    body: bytes,
    content_type: str | None,
    content_encoding: str | None,
    headers: dict[str, Any],
    message_id: str | None = None,
) -> DeadLetterEntry:
    """What a dead-letter message is about; never fails, whatever the message holds.
    A body that is not a readable event is named by its AMQP ``message_id``."""
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
        # A quorum queue counts deliveries in x-delivery-count; x-death's count is how
        # often the message died (once, for a delivery limit).
        delivered = headers.get("x-delivery-count")
        attempts = delivered if isinstance(delivered, int) else death.get("count")
        failed_at = death.get("time") if isinstance(death.get("time"), datetime) else None
        origin = "broker:tasks" if "task" in headers else "broker:reissued"
        if "task" in headers:
            body, content_type, content_encoding = _unwrap_task(body)
    seen = glimpse(body)
    return DeadLetterEntry(
        body=body,
        content_type=content_type,
        content_encoding=content_encoding,
        event_id=seen.event_id or (message_id if isinstance(message_id, str) else None),
        invoice=seen.invoice,
        source=seen.source,
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

    def entries(
        self, select: Selection | None = None, *, limit: int | None = None
    ) -> list[DeadLetterEntry]:
        """The selected dead letters, oldest first, at most ``limit``; the queue is left
        as it was (browsing stops at the limit: the rest are never fetched)."""
        found: list[DeadLetterEntry] = []
        now = datetime.now(UTC)
        with self._browse() as messages:
            for message in messages:
                entry = describe_message(message)
                if select is None or select(entry, now):
                    found.append(entry)
                    if limit is not None and len(found) >= limit:
                        break
        return found

    def replay(
        self,
        select: Selection,
        *,
        dry_run: bool = False,
        progress: Callable[[DeadLetterEntry], None] = lambda entry: None,
    ) -> list[DeadLetterEntry]:
        """Re-publish the selected dead letters, each event once: a second dead letter of
        an event already replayed (same ``(source, id)``, or the same body) is removed
        without a second publish. Each is acked only after its replay's confirm.
        ``progress`` is told of every dead letter looked at, selected or not."""
        replayed: list[DeadLetterEntry] = []
        done: set[tuple[str, ...]] = set()
        now = datetime.now(UTC)
        publisher = None if dry_run else EventPublisher.connect(self._url, self._topology)
        try:
            with self._browse() as messages:
                for message in messages:
                    entry = describe_message(message)
                    progress(entry)
                    if not select(entry, now):
                        continue
                    if entry.identity() in done:
                        if publisher is not None:
                            message.ack()  # its event is replayed already
                        continue
                    done.add(entry.identity())
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

    def depth(self) -> int:
        """How many dead letters wait, asked with one passive declare."""
        name = self._topology.dead_letter_queue
        return queue_depths(self._url, {"dead_letter": name}, delayed=False)[
            ("dead_letter", "ready")
        ]

    def purge(self, select: Selection | None = None) -> int:
        """Delete the selected dead letters (every one, without a selection); how many."""
        if select is None or select.everything:
            with Connection(self._url) as conn, conn.channel() as channel:
                return int(self._queue().bind(channel).purge() or 0)
        deleted = 0
        now = datetime.now(UTC)
        with self._browse() as messages:
            for message in messages:
                if select(describe_message(message), now):
                    message.ack()
                    deleted += 1
        return deleted

    def _queue(self) -> Queue:
        return self._topology.dead_letters()

    @contextmanager
    def _browse(self) -> Iterator[Iterator[Message]]:
        """The messages one by one, fetched unacked as they are asked for: closing the
        channel returns every unacked one to the queue, in its order."""
        with Connection(self._url) as conn:
            self._topology.declare(conn)
            channel = conn.channel()
            try:
                queue = self._queue().bind(channel)

                def fetch() -> Iterator[Message]:
                    while (message := queue.get(no_ack=False, accept=None)) is not None:
                        yield message

                yield fetch()
            finally:
                channel.close()


def describe_message(message: Message) -> DeadLetterEntry:
    return describe(
        raw_body(message),
        message.content_type,
        message.content_encoding,
        dict(message.headers or {}),
        message.properties.get("message_id"),
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
