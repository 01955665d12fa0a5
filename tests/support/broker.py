"""A fresh RabbitMQ vhost per test, and a view of billing.events as downstream sees it."""

from __future__ import annotations

import json
import queue
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any

import amqp
import pytest
from kombu import Connection, Consumer, Exchange, Queue, binding

from broker import raw_body
from invoice_mailer.events import CLOUDEVENTS_CONTENT_TYPE, EMAIL_FAILED, EMAIL_QUEUED, REISSUED
from tests.support.services import require

BROKER_HOST, BROKER_PORT = "127.0.0.1", 5672
EVENTS_EXCHANGE = "billing.events"


def require_rabbitmq() -> None:
    """RabbitMQ, and rabbitmqctl to make a vhost per test."""
    require("RabbitMQ", BROKER_HOST, BROKER_PORT)
    if shutil.which("rabbitmqctl") is None:
        pytest.fail("rabbitmqctl is needed to make a vhost per test")


def _rabbitmqctl(*args: str, stdin: str | None = None) -> None:
    subprocess.run(
        ["rabbitmqctl", "-q", *args],
        input=stdin,
        text=True,
        check=True,
        capture_output=True,
        timeout=120,
    )


class VhostPool:
    """Fresh vhosts for tests, made and deleted in batches.

    Each ``rabbitmqctl`` call starts an Erlang VM (about 0.5 s of CPU): three per test
    (add, permit, delete) were a quarter of the integration suite. Vhosts are made
    ``BATCH`` at a time with one ``import_definitions``; a used one is deleted with
    others in one call, in the background, so that its queues do not pile up in the
    broker. No vhost is ever handed out twice.
    """

    BATCH = 16

    def __init__(self) -> None:
        self._prefix = f"invoice-mailer-test-{uuid.uuid4().hex[:8]}-"
        self._count = 0
        self._free: list[str] = []
        self._used: list[str] = []
        self._deleting: threading.Thread | None = None
        self._failed: list[str] = []  # not deleted by the last batch (a broker restart)

    @contextmanager
    def fresh(self) -> Iterator[str]:
        """A vhost no other test has used; yields its broker URL."""
        if not self._free:
            self._make(self.BATCH)
        name = self._free.pop()
        try:
            yield f"amqp://guest:guest@{BROKER_HOST}:{BROKER_PORT}/{name}"
        finally:
            self._used.append(name)
            if len(self._used) >= self.BATCH // 2:
                self._delete_in_background()

    def close(self) -> None:
        """Delete every vhost this pool made and has not deleted yet."""
        self._used.extend(self._free)
        self._free.clear()
        self._delete_in_background()
        self._join()
        if self._failed:
            self._delete(self._failed)  # raises this time

    def _make(self, n: int) -> None:
        names = [f"{self._prefix}{self._count + i}" for i in range(n)]
        self._count += n
        definitions = {
            "vhosts": [{"name": name} for name in names],
            "permissions": [
                {"user": "guest", "vhost": name, "configure": ".*", "write": ".*", "read": ".*"}
                for name in names
            ],
        }
        # From stdin: given a path, the broker reads the file itself, as its own user.
        _rabbitmqctl("import_definitions", stdin=json.dumps(definitions))
        self._free.extend(reversed(names))

    def _delete_in_background(self) -> None:
        self._join()
        doomed, self._used = self._used + self._failed, []
        self._failed = []
        if doomed:
            self._deleting = threading.Thread(
                target=self._delete_or_keep, args=(doomed,), daemon=True
            )
            self._deleting.start()

    def _delete_or_keep(self, names: list[str]) -> None:
        try:
            self._delete(names)
        except subprocess.SubprocessError:  # the broker is restarting: the next batch retries
            self._failed = names

    @staticmethod
    def _delete(names: list[str]) -> None:
        # The CLI deletes one vhost per call; its eval runs the same function for many.
        binaries = ", ".join(f'<<"{name}">>' for name in names)
        _rabbitmqctl("eval", f'[rabbit_vhost:delete(V, <<"tests">>) || V <- [{binaries}]], ok.')

    def _join(self) -> None:
        if self._deleting is not None:
            self._deleting.join()
            self._deleting = None


def new_invoice() -> str:
    """A fresh public invoice id, as HostUp writes them: one per test case, no clashes."""
    return f"inv_{uuid.uuid4().hex[:16]}"


def reissued_event(
    invoice: str,
    *,
    event_id: str | None = None,
    source: str = "/billing",
    field: str = "invoiceId",
) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": event_id or f"evt_{uuid.uuid4().hex}",
        "source": source,
        "type": REISSUED,
        "time": "2026-11-21T10:00:00Z",
        "datacontenttype": "application/json",
        "data": {field: invoice},
    }


@dataclass
class DeadLetterMessage:
    body: bytes
    content_type: str | None
    headers: dict[str, Any]


class Bus:
    """Upstream and downstream of the service: publishes raw events, captures outgoing ones."""

    def __init__(
        self, url: str, *, capture: str | None = None, listen: bool = True, quorum: bool = False
    ) -> None:
        """``capture`` names a durable capture queue that outlives a broker restart
        (``quorum``: replicated, it outlives the loss of a cluster node too);
        ``listen=False`` binds nothing: upstream alone, with nothing bound downstream."""
        self.url = url
        self.conn = Connection(url, transport_options={"confirm_publish": True})
        self.exchange = Exchange(EVENTS_EXCHANGE, type="topic", durable=True)
        self.capture_name = capture or f"test.capture.{uuid.uuid4().hex[:8]}"
        self._capture = Queue(
            self.capture_name,
            bindings=[binding(self.exchange, routing_key=k) for k in (EMAIL_QUEUED, EMAIL_FAILED)],
            durable=capture is not None or quorum,
            queue_arguments={"x-queue-type": "quorum"} if quorum else None,
        )
        self.received: list[dict[str, Any]] = []
        self.received_messages: list[Any] = []
        self._channel = self.conn.channel()
        self._inbox: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
        self._producer = self.conn.Producer(self.conn.channel())
        if not listen:
            self.exchange.bind(self._channel).declare()
            return
        self._capture.bind(self._channel).declare()
        # Acked one by one: a message the test never read goes back to the queue on close.
        self._consumer = Consumer(
            self._channel,
            queues=[self._capture],
            on_message=self._on_message,
            prefetch_count=500,
        )
        self._consumer.consume()

    def close(self) -> None:
        self.conn.close()

    def all_received(self) -> list[dict[str, Any]]:
        """Everything read so far (for a capture queue handed on to another Bus)."""
        self._pump(0)
        return list(self.received)

    # -- upstream ----------------------------------------------------------------------

    def publish_raw(
        self,
        body: bytes,
        *,
        content_type: str | None = CLOUDEVENTS_CONTENT_TYPE,
        routing_key: str = REISSUED,
    ) -> None:
        """Publish bytes as an upstream system would: persistent, confirmed, must route.

        ``content_type=None`` sends no content-type property at all (kombu would
        otherwise label raw bytes ``application/data``).
        """
        if content_type is None:
            channel = self._producer.channel
            channel.basic_publish(
                amqp.Message(body, delivery_mode=2),
                exchange=self.exchange.name,
                routing_key=routing_key,
                mandatory=True,
            )
            return
        self._producer.publish(
            body,
            exchange=self.exchange,
            routing_key=routing_key,
            content_type=content_type,
            content_encoding="utf-8" if content_type else None,
            delivery_mode=2,
            mandatory=True,
        )

    def publish_event(self, event: dict[str, Any]) -> dict[str, Any]:
        self.publish_raw(json.dumps(event).encode())
        return event

    def reissue(self, invoice: str, **kwargs: Any) -> dict[str, Any]:
        return self.publish_event(reissued_event(invoice, **kwargs))

    # -- downstream --------------------------------------------------------------------

    def _on_message(self, message: Any) -> None:
        self.received_messages.append(message)
        self._inbox.put(json.loads(raw_body(message)))
        message.ack()

    def wait_for(
        self,
        count: int,
        *,
        timeout: float = 30.0,
        where: Callable[[dict[str, Any]], bool] = lambda e: True,
    ) -> list[dict[str, Any]]:
        """Block until ``count`` outgoing events matching ``where`` have arrived in all."""

        deadline = time.monotonic() + timeout
        while True:
            self._pump(0)
            matching = [e for e in self.received if where(e)]
            if len(matching) >= count:
                return matching
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(
                    f"expected {count} outgoing events within {timeout}s, got {len(matching)}: "
                    f"{json.dumps(matching, indent=1)[:3000]}"
                )
            self._pump(min(remaining, 0.5))

    def listen(self, seconds: float) -> None:
        """Read outgoing events for up to ``seconds`` (less once one arrives)."""
        self._pump(seconds)

    @classmethod
    def drained(cls, url: str, capture: str) -> list[dict[str, Any]]:
        """What is waiting in the durable ``capture`` queue, read by a bus of its own
        (the test's first bus went down with the broker it restarted)."""
        bus = cls(url, capture=capture)
        try:
            return bus.drain()
        finally:
            bus.close()

    def drain(self) -> list[dict[str, Any]]:
        """Everything that has arrived so far, after emptying the broker's buffer."""
        self._pump(0)
        while True:
            message = self._capture.bind(self._channel).get(no_ack=True)
            if message is None:
                break
            self._inbox.put(json.loads(message.body))
            self._pump(0)
        return list(self.received)

    def _pump(self, timeout: float) -> None:
        with suppress(TimeoutError):
            self.conn.drain_events(timeout=timeout) if timeout else self._drain_nowait()
        while not self._inbox.empty():
            self.received.append(self._inbox.get())

    def _drain_nowait(self) -> None:
        while True:
            try:
                self.conn.drain_events(timeout=0.01)
            except TimeoutError:
                return

    def dead_letters(self) -> list[DeadLetterMessage]:
        """Take every message off the dead-letter queue."""
        letters = []
        with self.conn.channel() as channel:
            q = Queue("invoice-mailer.dead-letter").bind(channel)
            while (message := q.get(no_ack=True)) is not None:
                letters.append(
                    DeadLetterMessage(
                        raw_body(message), message.content_type, dict(message.headers)
                    )
                )
        return letters

    def delayed_messages(self) -> int:
        """Messages parked in Celery's native delayed delivery queues (all 28 levels)."""
        return sum(self.queue_depth(f"celery_delayed_{level}") for level in range(28))

    def consumers(self, name: str) -> int:
        """Consumers the broker counts on ``name`` (0 when it does not exist)."""
        return self._passive(name)[1]

    def queue_depth(self, name: str) -> int:
        """Ready messages in ``name`` (0 when it does not exist)."""
        return self._passive(name)[0]

    def _passive(self, name: str) -> tuple[int, int]:
        with self.conn.channel() as channel:
            try:
                ok = channel.queue_declare(name, passive=True)
            except self.conn.channel_errors:
                return 0, 0
            return int(ok.message_count), int(ok.consumer_count)


def restart_rabbitmq(*, down_seconds: float = 0) -> None:
    """Stop the broker's application (every connection drops), keep it down for
    ``down_seconds`` (the outage's length, not a synchronisation), start it, and
    return once it accepts connections again."""

    subprocess.run(["rabbitmqctl", "-q", "stop_app"], check=True, timeout=120)
    time.sleep(down_seconds)
    subprocess.run(["rabbitmqctl", "-q", "start_app"], check=True, timeout=120)
    subprocess.run(["rabbitmqctl", "-q", "await_startup"], check=True, timeout=120)


@contextmanager
def memory_alarm() -> Iterator[None]:
    """RabbitMQ's memory alarm raised (a high watermark of 0: the broker blocks every
    publishing connection) for the block's duration, and the node's own watermark put
    back after, whatever happens in between."""
    old = _eval(
        "W = vm_memory_monitor:get_vm_memory_high_watermark(), "
        "vm_memory_monitor:set_vm_memory_high_watermark(0.0), W."
    )
    try:
        wait_until(lambda: _eval("rabbit_alarm:get_alarms().") != "[]", timeout=30, what="alarm")
        yield
    finally:
        _eval(f"vm_memory_monitor:set_vm_memory_high_watermark({old}).")
        wait_until(lambda: _eval("rabbit_alarm:get_alarms().") == "[]", timeout=30, what="clear")


def _eval(expression: str) -> str:
    """An Erlang expression evaluated on the broker's node; what it printed."""
    done = subprocess.run(
        ["rabbitmqctl", "-q", "eval", expression],
        check=True,
        timeout=60,
        capture_output=True,
        text=True,
    )
    return done.stdout.strip()


def wait_until(condition: Callable[[], bool], *, timeout: float, what: str) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` after ``timeout`` seconds."""

    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)
