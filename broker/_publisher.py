"""Publishing events and dead letters: confirmed, routed, persistent, or an error.

A broker confirm alone does not mean a queue took the message (an unroutable
message is confirmed too), so every publish is ``mandatory`` and a returned
message raises PublishError. kombu and py-amqp exceptions are translated here
and nowhere else.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import amqp.exceptions
import kombu.exceptions
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


class _ReturnTrackingProducer(Producer):
    """A producer that remembers messages the broker returned as unroutable."""

    def __init__(self, channel: Any, **kwargs: Any) -> None:
        self.returned: list[str] = []
        super().__init__(channel, on_return=self._on_return, **kwargs)

    def _on_return(self, exc: Exception, exchange: str, routing_key: str, message: Any) -> None:
        self.returned.append(f"{exc} (exchange {exchange!r}, routing key {routing_key!r})")


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
        self._lock = threading.Lock()
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

    @property
    def connection_errors(self) -> tuple[type[BaseException], ...]:
        """What the transport raises when the broker cannot be reached."""
        return tuple(self._connection.connection_errors)

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
        for producer in producers:
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
            producer = _ReturnTrackingProducer(self._connection.clone())
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
        try:
            with self._producer() as producer:
                producer.returned.clear()
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
                returned = list(producer.returned)
        except amqp.exceptions.MessageNacked as exc:
            raise PublishError(PublishFailure.NACKED, f"broker nacked {routing_key!r}") from exc
        except conn_errors as exc:
            raise PublishError(
                PublishFailure.UNREACHABLE, f"broker did not confirm {routing_key!r}: {exc!r}"
            ) from exc
        if returned:
            raise PublishError(PublishFailure.UNROUTABLE, returned[0])
