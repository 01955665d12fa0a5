"""The publisher's life cycle against RabbitMQ."""

from __future__ import annotations

import pytest

from invoice_mailer.errors import PublishError
from invoice_mailer.events import EMAIL_QUEUED
from invoice_mailer.publisher import EventPublisher
from invoice_mailer.topology import Topology
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
    with pytest.raises(PublishError, match="closed"):
        publisher.publish_event({"id": "e2"}, EMAIL_QUEUED)
