"""What a task message carries between attempts: the event, and each step's retry history.

Nothing the ledger records travels here (no resend result, no email-info, no
failure): a fact copied into a message is one that a takeover or a replay will
contradict. The model is validated on the way in, so a task message from another
version of the service is either understood or refused, never half-read; fields
it does not know (the job of versions before 0.2, which also carried effects) are
ignored, since the ledger holds those effects.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from invoice_mailer.events import Reissued
from invoice_mailer.policy import StepHistory

__all__ = ["EventRef", "Job"]


class EventRef(BaseModel):
    """The validated incoming event, by the names CONTRACT.md gives its fields."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    id: str
    source: str
    invoice: str

    @property
    def event_id(self) -> str:
        return self.id

    @property
    def key(self) -> tuple[str, str]:
        """``(source, id)``: what identifies the event, and keys its ledger record."""
        return (self.source, self.id)


class Job(BaseModel):
    """One event's work, as the task's only argument."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    event: EventRef
    body: str
    """The original event body, unchanged: what a dead letter carries."""
    content_type: str | None = None
    replay: bool = False
    """Re-published from the dead-letter queue: a failed event may run again."""
    history: dict[str, StepHistory] = Field(default_factory=dict)

    @classmethod
    def new(
        cls, event: Reissued, *, body: str, content_type: str | None, replay: bool = False
    ) -> Job:
        ref = EventRef(id=event.event_id, source=event.source, invoice=event.invoice)
        return cls(event=ref, body=body, content_type=content_type, replay=replay)

    def step_history(self, step: str) -> StepHistory:
        return self.history.get(step, StepHistory())

    def with_history(self, step: str, history: StepHistory) -> Job:
        return self.model_copy(update={"history": {**self.history, step: history}})

    def wire(self) -> dict[str, Any]:
        """The task message's ``job`` argument (JSON-safe)."""
        return self.model_dump(mode="json")
