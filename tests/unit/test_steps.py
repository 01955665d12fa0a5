"""The pipeline's transitions, as a table: ledger record in, next step out."""

from __future__ import annotations

from dataclasses import replace

import pytest

from invoice_mailer.billing import ResendResult
from invoice_mailer.ledger import Record
from invoice_mailer.steps import Step, next_step

FAILURE = {"step": "resend", "status": 404, "code": "not_found", "detail": "gone"}
RESENT = ResendResult(queued_at="2026-12-01T10:00:00.000Z", email="a@example.com")
NEW = Record(
    source="/billing",
    event_id="evt_1",
    invoice="inv_1",
    provider="hostup",
    state="open",
    lease_owner="me",
    lease_expires_at=None,
    resend=None,
    resend_in_flight=False,
    resend_first_started_at=None,
    email_info=None,
    email_info_error=None,
    email_info_done=False,
    outcome_event_id=None,
    failure=None,
    created_at=0.0,
    updated_at=0.0,
)
UNANSWERED = replace(NEW, resend_in_flight=True, resend_first_started_at=1.0)
RESENT_RECORD = replace(NEW, resend=RESENT)
INFO_DONE = replace(RESENT_RECORD, email_info={"emails": []}, email_info_done=True)
INFO_GIVEN_UP = replace(RESENT_RECORD, email_info_error="not_found: gone", email_info_done=True)
GIVEN_UP = replace(NEW, failure=FAILURE)

TABLE = [
    # (what the record says, has email-info, next step)
    ("new", NEW, True, Step.RESEND),
    ("new, no email-info provider", NEW, False, Step.RESEND),
    ("resend unanswered", UNANSWERED, True, Step.FIND_RESEND),
    ("resend unanswered, nothing to ask", UNANSWERED, False, Step.RESEND),
    ("resent", RESENT_RECORD, True, Step.EMAIL_INFO),
    ("resent, no email-info provider", RESENT_RECORD, False, Step.PUBLISH_QUEUED),
    ("email-info answered", INFO_DONE, True, Step.PUBLISH_QUEUED),
    ("email-info given up", INFO_GIVEN_UP, True, Step.PUBLISH_QUEUED),
    ("given up", GIVEN_UP, True, Step.DEAD_LETTER),
    (
        "given up after a resend was unanswered",
        replace(UNANSWERED, failure=FAILURE),
        True,
        Step.DEAD_LETTER,
    ),
    (
        "given up, dead letter written",
        replace(GIVEN_UP, dead_lettered=True),
        True,
        Step.PUBLISH_FAILED,
    ),
    ("published", replace(INFO_DONE, state="published"), True, Step.DONE),
    ("failed", replace(GIVEN_UP, dead_lettered=True, state="failed"), True, Step.DONE),
]


@pytest.mark.parametrize(
    ("record", "has_email_info", "expected"),
    [row[1:] for row in TABLE],
    ids=[row[0] for row in TABLE],
)
def test_next_step(record: Record, has_email_info: bool, expected: Step) -> None:
    """Each row of the transition table."""
    assert next_step(record, has_email_info=has_email_info) is expected


def test_every_step_but_done_is_reached_by_some_record() -> None:
    """The table covers every step: no step is dead code."""
    assert {row[3] for row in TABLE} == set(Step)
