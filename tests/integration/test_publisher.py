"""The publisher's life cycle against RabbitMQ."""

from __future__ import annotations

import pytest
from kombu import Connection

from broker import EventPublisher, QueueDepths, Topology
from invoice_mailer.errors import PublishError, PublishFailure
from invoice_mailer.events import EMAIL_QUEUED
from tests.support.broker import Bus, memory_alarm, wait_until


def test_a_closed_publisher_refuses_to_publish_and_does_not_reconnect(
    broker_url: str, bus: Bus
) -> None:
    """After close() (worker shutdown) a publish is an error, even on a producer that
    published before: no new connection behind the caller's back."""
    publisher = EventPublisher.connect(broker_url, Topology())
    publisher.publish_event({"id": "e1"}, EMAIL_QUEUED)
    assert [e["id"] for e in bus.wait_for(1)] == ["e1"]
    publisher.close()
    with pytest.raises(PublishError) as refused:
        publisher.publish_event({"id": "e2"}, EMAIL_QUEUED)
    assert refused.value.reason is PublishFailure.CLOSED


def test_warm_opens_the_connection_the_first_publish_then_uses(broker_url: str, bus: Bus) -> None:
    """Prepared at start: the AMQP handshake is not the first event's to wait for."""
    publisher = EventPublisher.connect(broker_url, Topology())
    try:
        publisher.warm()
        [producer] = publisher._producers
        assert producer.connection.connected
        publisher.publish_event({"id": "e1"}, EMAIL_QUEUED)
        assert publisher._producers == [producer]
    finally:
        publisher.close()
    assert [e["id"] for e in bus.wait_for(1)] == ["e1"]


def test_a_publish_nobody_is_bound_to_is_unroutable(broker_url: str) -> None:
    """Confirmed is not routed: with no queue bound to the key, the reason says so."""
    Bus(broker_url, listen=False).close()  # the events exchange exists, nothing is bound
    publisher = EventPublisher.connect(broker_url, Topology())
    try:
        with pytest.raises(PublishError) as refused:
            publisher.publish_event({"id": "e1"}, EMAIL_QUEUED)
    finally:
        publisher.close()
    assert refused.value.reason is PublishFailure.UNROUTABLE
    assert EMAIL_QUEUED in refused.value.detail


def test_a_broker_that_cannot_be_reached_is_unreachable() -> None:
    """Nothing listening at the broker's address: the reason is unreachable."""
    publisher = EventPublisher.connect("amqp://guest:guest@127.0.0.1:1//", Topology())
    try:
        with pytest.raises(PublishError) as refused:
            publisher.publish_event({"id": "e1"}, EMAIL_QUEUED)
    finally:
        publisher.close()
    assert refused.value.reason is PublishFailure.UNREACHABLE


def test_a_blocked_broker_holds_one_copy_and_the_publisher_sends_no_second(
    broker_url: str, bus: Bus
) -> None:
    """Under a memory alarm the first publish is written before RabbitMQ can say it
    blocks: it ends at once as BLOCKED, held (the broker will take it); a later publish
    is refused unwritten. Once the alarm clears, ``settle_blocked`` names the held
    message once, even when a publish read its confirm first, and publishing it again
    (its retry) writes no second copy."""
    publisher = EventPublisher.connect(broker_url, Topology())
    try:
        publisher.publish_event({"id": "warm"}, EMAIL_QUEUED)  # connected before the alarm
        with memory_alarm():
            with pytest.raises(PublishError) as held:
                publisher.publish_event({"id": "e1"}, EMAIL_QUEUED)
            with pytest.raises(PublishError) as refused:
                publisher.publish_event({"id": "e2"}, EMAIL_QUEUED)
            assert publisher.blocked
            assert publisher.settle_blocked() == []  # still blocked: nothing settled

        def e2_goes_out() -> bool:  # each try reads the blocked connection first
            try:
                publisher.publish_event({"id": "e2"}, EMAIL_QUEUED)
            except PublishError:
                return False
            return True

        wait_until(e2_goes_out, timeout=10, what="the broker to take publishes again")
        # Whoever read e1's late confirm (that publish, or this call), it is told once.
        settled: list[str] = []
        wait_until(
            lambda: bool(settled.extend(publisher.settle_blocked()) or settled),
            timeout=10,
            what="the late confirm",
        )
        assert not publisher.blocked
        assert publisher.settle_blocked() == []
        publisher.publish_event({"id": "e1"}, EMAIL_QUEUED)  # e1's retry
        bus.wait_for(3)
        ids = [e["id"] for e in bus.drain()]
    finally:
        publisher.close()
    assert (held.value.reason, held.value.held) == (PublishFailure.BLOCKED, True)
    assert (refused.value.reason, refused.value.held) == (PublishFailure.BLOCKED, False)
    assert "not sent" in refused.value.detail
    assert settled == ["e1"]
    assert sorted(ids) == ["e1", "e2", "warm"]


def test_queue_depths_for_scrapes_keep_one_connection_and_an_answer_for_a_while(
    broker_url: str, bus: Bus
) -> None:
    """A scrape every few seconds asks the broker at most every ``max_age`` s, over the
    connection it kept; a kept connection gone stale is replaced within the same read."""
    topology = Topology()
    with Connection(broker_url) as conn:
        topology.declare(conn)
    depths = QueueDepths(broker_url, {"reissued": topology.reissued_queue}, max_age=60)
    assert depths.read()[("reissued", "ready")] == 0
    bus.reissue("inv_depth1")
    assert depths.read()[("reissued", "ready")] == 0  # the answer of a moment ago
    fresh = QueueDepths(broker_url, {"reissued": topology.reissued_queue}, max_age=0)
    assert fresh.read()[("reissued", "ready")] == 1
    assert fresh._conn is not None
    kept = fresh._conn.connection  # the AMQP connection under it
    bus.reissue("inv_depth2")
    assert fresh.read()[("reissued", "ready")] == 2
    assert fresh._conn.connection is kept  # one connection, not one per scrape
    fresh._conn.collect()  # as if the broker had restarted under it
    assert fresh.read()[("reissued", "ready")] == 2
    assert fresh._conn.connection is not kept
    depths.close()
    fresh.close()
