"""How many messages wait in the broker, per queue: asked with passive declares."""

from __future__ import annotations

from kombu.connection import Connection

__all__ = ["queue_depths"]


def queue_depths(url: str, queues: dict[str, str]) -> dict[tuple[str, str], int]:
    """``{(queue, "ready"): n, ..., ("delayed", "parked"): n}`` over one short connection."""
    counts: dict[tuple[str, str], int] = {}
    with Connection(url, connect_timeout=3) as conn:
        for label, name in queues.items():
            counts[(label, "ready")] = _passive_count(conn, name)
        counts[("delayed", "parked")] = sum(
            _passive_count(conn, f"celery_delayed_{level}") for level in range(28)
        )
    return counts


def _passive_count(conn: Connection, name: str) -> int:
    # A failed passive declare closes its channel: one channel per question.
    with conn.channel() as channel:
        try:
            return int(channel.queue_declare(name, passive=True).message_count)
        except conn.channel_errors:
            return 0
