"""Is Celery's native delayed delivery in place on the broker? Retries must wait there."""

from __future__ import annotations

from typing import Any

from kombu.transport.native_delayed_delivery import CELERY_DELAYED_DELIVERY_EXCHANGE, level_name

__all__ = ["DelayedDeliveryMissing", "check_delayed_delivery"]


class DelayedDeliveryMissing(RuntimeError):
    """Native delayed delivery is not in place on the broker."""


def check_delayed_delivery(connection: Any) -> None:
    """Raise DelayedDeliveryMissing unless the delay levels and their exchange exist."""
    with connection.channel() as channel:
        try:
            for level in (0, 27):
                channel.exchange_declare(level_name(level), "topic", passive=True)
                channel.queue_declare(level_name(level), passive=True)
            channel.exchange_declare(CELERY_DELAYED_DELIVERY_EXCHANGE, "topic", passive=True)
        except connection.channel_errors as exc:
            raise DelayedDeliveryMissing(
                f"native delayed delivery is not set up on the broker ({exc}); "
                "refusing to hold retries in memory"
            ) from exc
