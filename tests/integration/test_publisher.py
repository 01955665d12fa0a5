"""The publisher's life cycle against RabbitMQ."""

from __future__ import annotations

import pytest

from broker import EventPublisher, Topology
from invoice_mailer.errors import PublishError, PublishFailure
from invoice_mailer.events import EMAIL_QUEUED
from tests.support.broker import Bus


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
