"""The pipeline's state machine: what to do next, from what the ledger records.

A pure function of the event's ledger record, so the whole table of transitions
is tested without I/O (``tests/unit/test_steps.py``). The executor
(``invoice_mailer.pipeline``) performs one step, records its effect, and asks again.

=====================================================  ==================
the record says                                        next step
=====================================================  ==================
published or failed                                    ``DONE``
given up, dead letter not written                      ``DEAD_LETTER``
given up, dead letter written                          ``PUBLISH_FAILED``
no resend; an earlier one unanswered; email-info       ``FIND_RESEND``
no resend (otherwise)                                  ``RESEND``
resend done; email-info provider; not asked yet        ``EMAIL_INFO``
resend done; email-info answered, given up, or none    ``PUBLISH_QUEUED``
=====================================================  ==================
"""

from __future__ import annotations

from enum import StrEnum

from invoice_mailer.ledger import Record

__all__ = ["API_STEPS", "BUS_STEPS", "Step", "next_step"]


class Step(StrEnum):
    FIND_RESEND = "find_resend"
    """Look in email-info for a resend whose answer was lost, before sending again."""
    RESEND = "resend"
    EMAIL_INFO = "email_info"
    DEAD_LETTER = "dead_letter"
    PUBLISH_FAILED = "publish_failed"
    PUBLISH_QUEUED = "publish_queued"
    DONE = "done"


API_STEPS = frozenset({Step.FIND_RESEND, Step.RESEND, Step.EMAIL_INFO})
"""Steps that call the billing API."""
BUS_STEPS = frozenset({Step.DEAD_LETTER, Step.PUBLISH_FAILED, Step.PUBLISH_QUEUED})
"""Steps that publish to the broker."""


def next_step(record: Record, *, has_email_info: bool) -> Step:
    """The one step to perform next for this record."""
    if record.final:
        return Step.DONE
    if record.failure is not None:
        return Step.PUBLISH_FAILED if record.dead_lettered else Step.DEAD_LETTER
    if record.resend is None:
        if record.resend_in_flight and has_email_info:
            return Step.FIND_RESEND
        return Step.RESEND
    if has_email_info and not record.email_info_done:
        return Step.EMAIL_INFO
    return Step.PUBLISH_QUEUED
