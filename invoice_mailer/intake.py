"""An event that can never be processed: dead-lettered once with its reason, and told.

The raw-event consumer (``consumers``) validates each body with
``events.parse_reissued``; what fails goes through ``reject``: the original bytes to
the dead-letter queue with the reason, then one ``invoice.email_failed``. Framework
free, so a property test drives it with generated bodies and the in-memory publisher
(``tests/unit/test_intake.py``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from invoice_mailer.errors import InvalidEvent
from invoice_mailer.events import EMAIL_FAILED, glimpse
from invoice_mailer.pipeline import failed_event
from invoice_mailer.publishing import DeadLetter, Publisher
from invoice_mailer.untrusted import Redactor

__all__ = ["Rejected", "reject"]

_PRINTABLE = Redactor()


@dataclass(frozen=True, slots=True)
class Rejected:
    """What ``reject`` published; ``event_id`` is printable (for logs), or None."""

    event: dict[str, Any]
    event_id: str | None


def reject(
    publisher: Publisher,
    body: bytes,
    invalid: InvalidEvent,
    *,
    provider: str,
    content_type: str | None,
    content_encoding: str | None,
) -> Rejected:
    """Dead-letter ``body`` with ``invalid``'s reason, then publish its ``email_failed``.

    PublishError from either publish propagates: the caller gives the message back to
    the broker (a second dead letter on redelivery is the only duplicate possible).
    """
    seen = glimpse(body)
    source, event_id = seen.source, seen.event_id
    publisher.dead_letter(
        DeadLetter(
            body=body,
            content_type=content_type,
            content_encoding=content_encoding,
            code=invalid.code,
            detail=invalid.detail,
            attempts=0,
        )
    )
    # An unreadable event is identified by its bytes: a redelivery maps to the same id.
    cause_key = (
        (source, event_id)
        if source is not None and event_id is not None
        else ("sha256", hashlib.sha256(body).hexdigest())
    )
    event = failed_event(
        invoice=None,
        provider=provider,
        cause_key=cause_key,
        reissued_event={"id": event_id, "source": source},
        attempts=0,
        reason={"step": "validate", "status": None, "code": invalid.code, "detail": invalid.detail},
    )
    publisher.publish_event(event, EMAIL_FAILED)
    printable = _PRINTABLE.text(event_id, limit=256, emails=False) if event_id else None
    return Rejected(event=event, event_id=printable)
