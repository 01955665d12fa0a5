"""Upstream behaviours the service works around: each test fails once upstream changes.

When one fails, the workaround it names may be dropped (and this test with it).
"""

from __future__ import annotations

import inspect
import socket
import sys
import threading
import types

import httpcore
import httpx
import pytest
from billiard.einfo import ExceptionInfo, ExceptionWithTraceback
from celery import Celery
from celery.exceptions import Retry
from celery.worker.consumer import Consumer as CeleryConsumer
from celery.worker.request import Request
from kombu import Connection, Producer
from kombu.pools import ProducerPool, connections

from tasks._workarounds import ReadableRetry
from tests.support.patched import run_under_gevent


def _einfo_of(retry: Retry) -> ExceptionInfo:
    """What ``celery.app.trace.handle_retry`` builds from the raised Retry."""
    try:
        raise retry
    except Retry:
        type_, _, tb = sys.exc_info()
        return ExceptionInfo((type_, retry, tb))


def test_celery_reports_the_retry_itself_on_task_retried() -> None:
    """``Request.on_retry`` reprs ``exc_info.exception.exc``, which is the wrapped Retry,
    not its cause (``tasks._workarounds.ReadableRetry``)."""
    assert "safe_repr(exc_info.exception.exc)" in inspect.getsource(Request.on_retry)
    einfo = _einfo_of(Retry("m", ValueError("cause"), 5))
    assert isinstance(einfo.exception, ExceptionWithTraceback)
    assert isinstance(einfo.exception.exc, Retry)
    assert repr(einfo.exception.exc).startswith("Retry(")


def test_a_readable_retry_shows_its_cause() -> None:
    """With the workaround, what on_retry reprs is the cause."""
    readable = ReadableRetry.of(Retry("m", ValueError("cause"), 5))
    assert repr(_einfo_of(readable).exception.exc) == "ValueError('cause')"
    assert (readable.exc.args, readable.when) == (("cause",), 5)


def test_celery_opens_the_task_event_connection_with_the_brokers_transport_options() -> None:
    """The events connection inherits ``confirm_publish`` unless told otherwise: what
    ``tasks._workarounds.Consumer.connection_for_write`` turns off for task events."""
    app = Celery(
        broker="memory://",
        broker_transport_options={"confirm_publish": True},
        set_as_current=False,
    )
    try:
        assert "self.app.connection_for_write(url=url, heartbeat=heartbeat)" in (
            inspect.getsource(CeleryConsumer.connection_for_write)
        )
        with app.connection_for_write() as conn:
            assert conn.transport_options.get("confirm_publish") is True
        with app.connection_for_write(transport_options={"confirm_publish": False}) as conn:
            assert conn.transport_options.get("confirm_publish") is False
    finally:
        app.close()


def test_kombus_producer_pool_binds_a_producer_anew_on_every_acquire() -> None:
    """kombu's ProducerPool gives the connection back on release and revives the producer
    on the next acquire, a fifth of a publish's CPU once measured: why
    ``broker.EventPublisher`` keeps producers bound to their connections instead."""
    revived: list[object] = []

    class Counting(Producer):  # type: ignore[misc]
        def revive(self, channel: object) -> None:
            revived.append(channel)
            super().revive(channel)

    with Connection("memory://") as conn:
        pool = ProducerPool(connections[conn], limit=1)
        pool.Producer = Counting
        for _ in range(3):
            producer = pool.acquire(block=True)
            producer.release()
        pool.force_close_all()
    assert len(revived) >= 3


def test_httpx_parses_every_answer_for_cookies() -> None:
    """A plain httpx.Client hands each response to its cookie jar, Set-Cookie or not (8%
    of an HTTP call's CPU once measured): why the client is built without one
    (``invoice_mailer.billing._http``)."""
    seen: list[httpx.Response] = []

    class Counting(httpx.Cookies):
        def extract_cookies(self, response: httpx.Response) -> None:
            seen.append(response)

    client = httpx.Client(transport=httpx.MockTransport(lambda request: httpx.Response(204)))
    client._cookies = Counting()
    with client:
        client.get("https://api.test/a")
        client.get("https://api.test/b")
    assert len(seen) == 2


def test_httpcores_pool_rescans_its_connections_for_each_connection() -> None:
    """httpcore's pool counts its idle connections inside its loop over them, n x n calls
    for n connections, under one lock, twice per request (encode/httpcore#1035): why the
    client's connections are split into small pools (``ShardedTransport``)."""
    calls = 0

    class Idle:
        def is_closed(self) -> bool:
            return False

        def has_expired(self) -> bool:
            return False

        def is_idle(self) -> bool:
            nonlocal calls
            calls += 1
            return True

        def is_available(self) -> bool:
            return True

    pool = httpcore.ConnectionPool(max_connections=50, max_keepalive_connections=50)
    pool._connections = [Idle() for _ in range(20)]  # type: ignore[list-item]
    pool._assign_requests_to_connections()
    assert calls >= 20 * 20


def test_celery_declares_the_remote_control_queue_exclusive_by_default() -> None:
    """What ``control_queue_exclusive=False`` in ``tasks/_app.py`` overrides: with the
    default, a worker reconnecting before the broker dropped its old connection is
    refused its own control queue (RESOURCE_LOCKED) and stops."""
    app = Celery(broker="memory://", set_as_current=False)
    try:
        assert app.conf.control_queue_exclusive is True
        assert app.control.mailbox.queue_exclusive is True
    finally:
        app.close()


def test_the_service_declares_its_control_queue_shared() -> None:
    from tasks import app

    assert app.control.mailbox.queue_exclusive is False
    assert app.control.mailbox.get_queue("w@h").exclusive is False


def test_celery_sets_up_delayed_delivery_on_every_broker_url() -> None:
    """What ``LiveNodeDelayedDelivery`` works around: Celery's step declares on each URL
    of a failover list in turn, dead nodes included. Once it stops doing so, drop ours."""
    from celery.worker.consumer.delayed_delivery import DelayedDelivery

    source = inspect.getsource(DelayedDelivery.start)
    assert "self._validate_broker_urls(app.conf.broker_url)" in source
    assert "for broker_url in broker_urls:" in source


def test_the_service_consumer_runs_the_live_node_step_instead_of_celerys() -> None:
    from tasks._workarounds import CELERY_DELAYED_DELIVERY, Consumer, LiveNodeDelayedDelivery

    assert CELERY_DELAYED_DELIVERY in CeleryConsumer.Blueprint.default_steps
    steps = Consumer.Blueprint.default_steps
    assert CELERY_DELAYED_DELIVERY not in steps
    assert "tasks._workarounds:LiveNodeDelayedDelivery" in steps
    assert LiveNodeDelayedDelivery.name != "celery.worker.consumer.delayed_delivery.DelayedDelivery"


def test_celerys_green_loop_waits_on_the_task_event_connection_every_turn() -> None:
    """synloop drains the task-event connection after each frame with a 0.1 s wait
    (``tasks._workarounds.glance_at_events_connection`` makes it a glance)."""
    from celery.worker import loops

    from tasks._workarounds import _celery_quick_drain

    assert inspect.signature(_celery_quick_drain).parameters["timeout"].default == 0.1
    assert "_quick_drain(obj.event_dispatcher.connection)" in inspect.getsource(loops.synloop)


def test_the_green_loop_glances_without_waiting() -> None:
    """The worker's consumer puts the glance in synloop's place; given a connection
    with nothing to read, it returns at once instead of after 0.1 s."""
    from celery.worker import loops

    from tasks._workarounds import Consumer, glance_at_events_connection

    waited: list[float | None] = []

    class Idle:
        def drain_events(self, timeout: float | None = None) -> None:
            waited.append(timeout)
            raise TimeoutError

    glance_at_events_connection(Idle())
    assert waited == [0.0]
    app = Celery(broker="memory://", set_as_current=False)
    try:
        before = loops._quick_drain
        controller = types.SimpleNamespace(use_eventloop=False, pool=None, state=None)
        consumer = Consumer(
            lambda *a, **k: None, app=app, hub=None, controller=controller, timer=None
        )
        assert loops._quick_drain == consumer._glance_at_events
        # The loop leaves the connection alone while a publisher holds the dispatcher.
        consumer.event_dispatcher = types.SimpleNamespace(mutex=threading.Lock())
        waited.clear()
        with consumer.event_dispatcher.mutex:
            loops._quick_drain(Idle())
        assert waited == []
        loops._quick_drain(Idle())
        assert waited == [0.0]
        # The consuming connection, collected or replaced under the loop, is a loss.
        link = types.SimpleNamespace(connected=True)
        consumer._link = link
        consumer.connection = types.SimpleNamespace(_connection=link)
        loops._quick_drain(Idle())
        link.connected = False
        with pytest.raises(ConnectionResetError):
            loops._quick_drain(Idle())
        consumer.connection = types.SimpleNamespace(_connection=object())
        link.connected = True
        with pytest.raises(ConnectionResetError):
            loops._quick_drain(Idle())
    finally:
        loops._quick_drain = before
        app.close()


def test_kombu_keeps_the_transport_connection_where_check_link_reads_it() -> None:
    """``Consumer.check_link`` compares ``kombu.Connection._connection`` (private) with
    the link the consumers were set up on: were kombu to keep it elsewhere, the check
    would find it gone on every turn and restart the consumer forever."""
    from kombu import Connection

    conn = Connection("memory://")
    try:
        assert getattr(conn, "_connection", "missing") is None  # not connected yet
        link = conn.connection  # the property connects
        assert link is not None
        assert conn._connection is link
        assert conn.connection is link  # and hands back the same one while it lives
    finally:
        conn.release()


def test_httpcore_polls_every_pooled_connection_with_selects_poll() -> None:
    """``is_readable`` goes to ``select.poll()``, gevent's once patched: what
    ``invoice_mailer.billing._http._is_readable`` answers with the unpatched one."""
    from httpcore._backends.sync import SyncStream
    from httpcore._utils import is_socket_readable

    assert "is_socket_readable(self._sock)" in inspect.getsource(SyncStream.get_extra_info)
    assert "p = select.poll()" in inspect.getsource(is_socket_readable)
    done = run_under_gevent(
        "import select\n"
        "from invoice_mailer.billing._http import _unpatched_poll\n"
        "original = monkey.get_original('select', 'poll')\n"
        "print(select.poll is not original, _unpatched_poll() is original)\n"
    )
    assert done.stdout.split() == ["True", "True"], done.stderr


def test_a_pooled_connection_reads_readable_once_the_server_closed_it() -> None:
    """The answer httpcore needs from ``is_readable``: idle is not, closed is."""
    from httpcore._backends.sync import SyncStream

    from invoice_mailer.billing._http import _DeadlineStream

    ours, theirs = socket.socketpair()
    stream = _DeadlineStream(SyncStream(ours))
    try:
        assert stream.get_extra_info("is_readable") is False
        theirs.close()
        assert stream.get_extra_info("is_readable") is True
    finally:
        ours.close()


def test_celery_buffers_task_events_only_with_an_event_loop() -> None:
    """``Events.start`` batches the task group only when the worker has a hub: what
    ``tasks._workarounds.BufferedTaskEvents`` does for a green worker too."""
    from celery.worker.consumer.events import Events

    assert "buffer_group=['task'] if c.hub else None" in inspect.getsource(Events.start)


def test_a_green_worker_sends_its_task_events_batched() -> None:
    """Three task events wait in the buffer and leave as one ``task.multi`` message."""
    from celery.worker.consumer.events import Events
    from kombu import Exchange, Queue

    from tasks._workarounds import CELERY_EVENTS, BufferedTaskEvents, Consumer

    assert CELERY_EVENTS in Consumer.Blueprint.default_steps
    assert "tasks._workarounds:BufferedTaskEvents" in Consumer.Blueprint.default_steps

    app = Celery(broker="memory://", set_as_current=False)
    scheduled: list[tuple[float, object]] = []
    timer = types.SimpleNamespace(
        call_repeatedly=lambda secs, fun, args: (
            scheduled.append((secs, fun)) or types.SimpleNamespace(cancel=lambda: None)
        )
    )
    try:
        with app.connection_for_write() as watch:
            queue = Queue("watch", Exchange("celeryev", "topic"), "task.#")
            queue(watch.default_channel).declare()
            c = types.SimpleNamespace(
                app=app,
                hub=None,
                hostname="w@test",
                amqheartbeat=0,
                event_dispatcher=None,
                timer=timer,
                connection_for_write=lambda heartbeat=None: app.connection_for_write(),
            )
            Events(c).start(c)
            step = BufferedTaskEvents(c)
            step.start(c)
            for kind in ("task-received", "task-started", "task-succeeded"):
                c.event_dispatcher.send(kind, uuid="t1")
            assert queue(watch.default_channel).get() is None  # still buffered
            [(seconds, flush)] = scheduled
            assert seconds == 0.1
            flush(c)  # type: ignore[operator]
            message = queue(watch.default_channel).get()
            assert message is not None
            assert message.delivery_info["routing_key"] == "task.multi"
            assert [e["type"] for e in message.decode()] == [
                "task-received",
                "task-started",
                "task-succeeded",
            ]
            step.shutdown(c)
    finally:
        app.close()
