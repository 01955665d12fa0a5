"""Publishing events and dead letters: confirmed, routed, persistent, or an error.

A broker confirm alone does not mean a queue took the message (an unroutable
message is confirmed too), so every publish is ``mandatory`` and a returned
message raises PublishError. kombu and py-amqp exceptions are translated here
and nowhere else.

A broker under a memory or disk alarm stops reading from publishing connections;
RabbitMQ says so (``connection.blocked``) only to a connection that publishes while
it lasts, so the first publish of each connection is written before anyone can know.
That message is not lost: the broker takes it when the alarm clears. The publish
ends at once with ``PublishFailure.BLOCKED`` and its producer is kept aside, unused,
until its confirm arrives; ``settle_blocked`` then names the messages that went out
late, so that their retries do not send them a second time.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import amqp.exceptions
import kombu.exceptions
from amqp import spec
from kombu.connection import Connection
from kombu.entity import Exchange
from kombu.messaging import Producer

from broker._topology import Topology
from invoice_mailer.errors import PublishError, PublishFailure
from invoice_mailer.events import CLOUDEVENTS_CONTENT_TYPE, encode
from invoice_mailer.publishing import DeadLetter

__all__ = ["EventPublisher"]

# Every wait of a publish is bounded, so that a publish ends (published or PublishError)
# and its caller's retry waits in the broker, not in a thread: at most a producer's
# wait, then 1 + max_retries tries of a connect and a confirmed write, with sleeps.
_RETRY_POLICY = {"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 2}
CONNECT_TIMEOUT_SECONDS = 3
CONFIRM_TIMEOUT_SECONDS = 5  # the socket write and the broker's confirm of one publish
PRODUCER_WAIT_SECONDS = 5  # every producer of the pool busy
SETTLE_WAIT_SECONDS = 0.05  # how long a look at a blocked connection waits for news


class _Blocked(Exception):
    """Raised from py-amqp's ``on_blocked`` callback to end a confirm wait at once."""


class _ReturnTrackingProducer(Producer):
    """A producer that remembers messages the broker returned as unroutable, the
    confirms that arrive outside a wait, and whether its connection is blocked."""

    def __init__(self, connection: Connection, **kwargs: Any) -> None:
        self.returned: list[str] = []
        self.blocked: str | None = None  # the broker's reason, while it blocks us
        self.waiting = False  # inside a publish: a block ends the wait
        self.late: str | None = None  # the confirm a block kept us from waiting for
        self.message_id: str | None = None  # the message a block left unconfirmed
        super().__init__(connection, on_return=self._on_return, **kwargs)

    def _on_return(self, exc: Exception, exchange: str, routing_key: str, message: Any) -> None:
        self.returned.append(f"{exc} (exchange {exchange!r}, routing key {routing_key!r})")

    def wait_late(self, timeout: float) -> None:
        """Read this connection for up to ``timeout`` s: ``connection.unblocked``, the
        confirm (``late``), a return; socket.timeout when nothing came."""

        def confirmed(method: Any, *_: Any) -> None:
            self.late = "nack" if method == spec.Basic.Nack else "ack"

        self.channel.wait([spec.Basic.Ack, spec.Basic.Nack], callback=confirmed, timeout=timeout)

    def on_blocked(self, reason: str) -> None:
        self.blocked = reason or "connection blocked"
        if self.waiting:
            raise _Blocked(self.blocked)

    def on_unblocked(self) -> None:
        self.blocked = None


class EventPublisher:
    """Publishes with publisher confirms over a small pool of broker connections.

    Thread-safe: each publish takes a producer, with a connection of its own, from
    the pool. Producers keep their connection between publishes: kombu's
    ProducerPool gives the connection back and re-binds the producer on every
    acquire, a fifth of a publish's CPU under ``python -m bench``.
    """

    def __init__(self, connection: Connection, topology: Topology, *, pool_size: int = 8) -> None:
        self._connection = connection
        self._topology = topology
        self._events = topology.events()
        self._dead_letters = topology.dead_letters_exchange()
        self._pool_size = pool_size
        self._idle: queue.SimpleQueue[_ReturnTrackingProducer] = queue.SimpleQueue()
        self._producers: list[_ReturnTrackingProducer] = []
        self._blocked: list[_ReturnTrackingProducer] = []  # each owes one late confirm
        self._confirmed_late: set[str] = set()  # never written a second time
        self._unreported: list[str] = []  # confirmed late, not yet told to the caller
        self._lock = threading.Lock()
        self._settle_lock = threading.Lock()
        self._closed = False

    @classmethod
    def connect(cls, url: str, topology: Topology, *, pool_size: int = 8) -> EventPublisher:
        """A publisher on its own connections, with confirms switched on."""
        connection = Connection(
            url,
            transport_options={"confirm_publish": True},
            heartbeat=60,
            connect_timeout=CONNECT_TIMEOUT_SECONDS,
        )
        return cls(connection, topology, pool_size=pool_size)

    def warm(self) -> None:
        """Open a producer's connection and channel now, not at the first publish (kombu
        connects a producer lazily: the AMQP handshake would fall on an event)."""
        with self._producer() as producer:
            producer.channel  # noqa: B018 -- the property opens the channel it promises

    @property
    def connection_errors(self) -> tuple[type[BaseException], ...]:
        """What the transport raises when the broker cannot be reached."""
        return tuple(self._connection.connection_errors)

    @property
    def blocked(self) -> bool:
        """Is a publish of this process waiting for a blocked broker to take it, or one
        it took late not yet told by ``settle_blocked``?"""
        return bool(self._blocked or self._unreported)

    def settle_blocked(self) -> list[str]:
        """The ids of messages a blocked broker took late, each told once: those found
        now, and those a publish found meanwhile (``_refuse_while_blocked`` settles too)."""
        with self._settle_lock:
            self._settle()
            told, self._unreported = self._unreported, []
            return told

    def _settle(self) -> None:
        """Read what blocked connections were told since (unblocked, the late confirm).
        A nacked or returned message is not settled (it did not go out); a connection
        lost meanwhile is dropped, its message's fate unknown (its retry may send a
        second copy, with the same id). The caller holds ``_settle_lock``."""
        for producer in list(self._blocked):
            try:
                producer.wait_late(SETTLE_WAIT_SECONDS)
            except TimeoutError:
                continue  # still blocked, or the confirm is yet to come
            except (*self._connection.connection_errors, OSError):
                self._forget_blocked(producer)
                continue
            if producer.late == "ack" and not producer.returned and producer.message_id:
                self._confirmed_late.add(producer.message_id)
                self._unreported.append(producer.message_id)
            self._forget_blocked(producer)

    def _forget_blocked(self, producer: _ReturnTrackingProducer) -> None:
        self._blocked.remove(producer)
        self._discard(producer)

    def publish_event(self, event: Mapping[str, Any], routing_key: str) -> None:
        """Publish one CloudEvent to the events exchange; its ``id`` is the message id."""
        self._publish(
            encode(dict(event)),
            exchange=self._events,
            routing_key=routing_key,
            content_type=CLOUDEVENTS_CONTENT_TYPE,
            message_id=str(event["id"]),
            headers={},
        )

    def publish_raw(
        self,
        body: bytes,
        *,
        routing_key: str,
        content_type: str | None,
        message_id: str | None,
        headers: dict[str, Any] | None = None,
    ) -> None:
        """Publish an event body as it is (a replay, a test event) to the events exchange."""
        self._publish(
            body,
            exchange=self._events,
            routing_key=routing_key,
            content_type=content_type or CLOUDEVENTS_CONTENT_TYPE,
            message_id=message_id,
            headers=headers or {},
        )

    def dead_letter(self, letter: DeadLetter) -> None:
        """Put an event on the dead-letter queue, body unchanged, reason in headers."""
        self._publish(
            letter.body,
            exchange=self._dead_letters,
            routing_key=self._topology.dead_letter_queue,
            content_type=letter.content_type or "application/octet-stream",
            content_encoding=letter.content_encoding or "binary",
            message_id=None,
            headers=letter.headers(),
        )

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            producers = list(self._producers)
        for producer in producers + self._blocked:
            with contextlib.suppress(Exception):
                producer.connection.collect()  # drop the socket, whatever its state

    @contextlib.contextmanager
    def _producer(self) -> Iterator[_ReturnTrackingProducer]:
        """An idle producer, a new one while fewer than ``pool_size`` exist, or a wait."""
        if self._closed:
            raise PublishError(PublishFailure.CLOSED, "the publisher is closed")
        try:
            producer = self._idle.get_nowait()
        except queue.Empty:
            producer = self._new_producer() or self._idle.get(timeout=PRODUCER_WAIT_SECONDS)
        try:
            yield producer
        except BaseException:
            # Its channel may still owe a confirm (a timed-out wait): a later publish on
            # it could take that confirm for its own. A fresh producer replaces it.
            self._discard(producer)
            raise
        if producer.blocked is not None and producer.message_id is not None:
            with self._settle_lock:
                self._blocked.append(producer)  # owes a confirm: never published on again
        elif producer.blocked is not None:
            self._discard(producer)  # a blocked dead letter: its fate is the broker's
        else:
            self._idle.put(producer)

    def _discard(self, producer: _ReturnTrackingProducer) -> None:
        with self._lock:
            if producer in self._producers:
                self._producers.remove(producer)
        with contextlib.suppress(Exception):
            producer.connection.collect()

    def _new_producer(self) -> _ReturnTrackingProducer | None:
        with self._lock:
            if self._closed:
                raise PublishError(PublishFailure.CLOSED, "the publisher is closed")
            if len(self._producers) >= self._pool_size:
                return None
            made: list[_ReturnTrackingProducer] = []  # py-amqp calls back once connected
            options = {
                **(self._connection.transport_options or {}),
                "on_blocked": lambda reason: made[0].on_blocked(reason),
                "on_unblocked": lambda: made[0].on_unblocked(),
            }
            producer = _ReturnTrackingProducer(self._connection.clone(transport_options=options))
            made.append(producer)
            self._producers.append(producer)
            return producer

    def _publish(
        self,
        body: bytes,
        *,
        exchange: Exchange,
        routing_key: str,
        content_type: str,
        message_id: str | None,
        headers: dict[str, Any],
        content_encoding: str = "utf-8",
    ) -> None:
        conn_errors: tuple[type[BaseException], ...] = (
            *self._connection.connection_errors,
            *self._connection.channel_errors,
            kombu.exceptions.OperationalError,  # kombu's own: the first connect failed
            OSError,
            queue.Empty,  # every producer busy for PRODUCER_WAIT_SECONDS
        )
        if message_id is not None and message_id in self._confirmed_late:
            self._confirmed_late.discard(message_id)
            return  # a blocked broker took it after all: never a second copy
        if self._blocked:
            self._refuse_while_blocked(routing_key)
        blocked = None
        try:
            with self._producer() as producer:
                producer.returned.clear()
                producer.message_id, producer.waiting = message_id, True
                try:
                    producer.publish(
                        body,
                        exchange=exchange,
                        routing_key=routing_key,
                        content_type=content_type,
                        content_encoding=content_encoding,
                        delivery_mode=2,
                        mandatory=True,
                        message_id=message_id,
                        headers=headers,
                        retry=True,
                        retry_policy=_RETRY_POLICY,
                        timeout=CONFIRM_TIMEOUT_SECONDS,
                    )
                except _Blocked:
                    blocked = producer.blocked
                finally:
                    producer.waiting = False
                returned = list(producer.returned)
        except amqp.exceptions.MessageNacked as exc:
            raise PublishError(PublishFailure.NACKED, f"broker nacked {routing_key!r}") from exc
        except conn_errors as exc:
            raise PublishError(
                PublishFailure.UNREACHABLE, f"broker did not confirm {routing_key!r}: {exc!r}"
            ) from exc
        if blocked is not None:
            raise PublishError(
                PublishFailure.BLOCKED,
                f"broker blocks publishing ({blocked}); {routing_key!r} goes out when it takes it",
                held=message_id is not None,
            )
        if returned:
            raise PublishError(PublishFailure.UNROUTABLE, returned[0])

    def _refuse_while_blocked(self, routing_key: str) -> None:
        """While a blocked connection has heard of no unblock, every publish is refused
        unwritten: the alarm is the broker's, every connection of ours would block."""
        with self._settle_lock:
            self._settle()
        reasons = [p.blocked for p in self._blocked if p.blocked]
        if reasons:
            raise PublishError(
                PublishFailure.BLOCKED,
                f"broker blocks publishing ({reasons[0]}); {routing_key!r} not sent",
            )
        if len(self._confirmed_late) > 10_000:  # ids whose retries never came here
            self._confirmed_late.clear()
