"""The AsyncAPI document: generated from the models the service builds its events with,
checked in, and true of what the service publishes."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import respx

from invoice_mailer.contracts import asyncapi
from invoice_mailer.errors import InvalidEvent
from invoice_mailer.events import CLOUDEVENTS_CONTENT_TYPE, parse_reissued
from invoice_mailer.ledger import Ledger
from invoice_mailer.pipeline import Done, GaveUp, failed_event
from invoice_mailer.publishing import InMemoryPublisher
from tests.unit.conftest import Clock
from tests.unit.test_events import _body
from tests.unit.test_pipeline import JOB, OK, URL, _pipeline

DOCUMENT = Path(__file__).resolve().parents[2] / "docs" / "asyncapi.json"


def _validate(message: str, instance: dict[str, Any]) -> None:
    document = json.loads(DOCUMENT.read_text())
    payload = document["components"]["messages"][message]["payload"]
    jsonschema.validate(instance, {**payload, "components": document["components"]})


def test_the_checked_in_document_is_the_one_the_models_generate() -> None:
    """Change a model and not the document (or the reverse): this fails. Regenerate with
    ``invoice-mailer asyncapi > docs/asyncapi.json``."""
    assert json.loads(DOCUMENT.read_text()) == asyncapi(version("invoice-mailer"))


def test_the_document_is_asyncapi_3_with_every_channel_and_operation() -> None:
    document = json.loads(DOCUMENT.read_text())
    assert document["asyncapi"] == "3.0.0"
    addresses = {c["address"] for c in document["channels"].values()}
    assert addresses == {
        "invoice.reissued",
        "invoice.email_queued",
        "invoice.email_failed",
        "invoice-mailer.dead-letter",
    }
    for operation in document["operations"].values():
        ref = operation["channel"]["$ref"].removeprefix("#/channels/")
        assert ref in document["channels"]
    jsonschema.Draft202012Validator.check_schema(document["components"]["schemas"]["OutgoingEvent"])


@respx.mock
def test_what_the_pipeline_publishes_is_what_the_document_says(
    ledger: Ledger, http: httpx.Client
) -> None:
    respx.post(URL).mock(return_value=httpx.Response(200, json=OK))
    pub = InMemoryPublisher()
    outcome = _pipeline(ledger, http, Clock(1_800_000_000.0), pub).run(JOB)
    assert isinstance(outcome, Done)
    _validate("invoiceEmailQueued", outcome.event)


@respx.mock
def test_a_given_up_event_is_what_the_document_says(ledger: Ledger, http: httpx.Client) -> None:
    problem = {"code": 404, "type": "ERR_NOT_FOUND", "message": "gone", "details": []}
    respx.post(URL).mock(return_value=httpx.Response(404, json=problem))
    outcome = _pipeline(ledger, http, Clock(1_800_000_000.0), InMemoryPublisher()).run(JOB)
    assert isinstance(outcome, GaveUp)
    _validate("invoiceEmailFailed", outcome.event)
    unreadable = failed_event(
        invoice=None,
        provider="hostup",
        cause_key=("sha256", "ab"),
        reissued_event={"id": None, "source": None},
        attempts=0,
        reason={"step": "validate", "status": None, "code": "not_json", "detail": "x"},
    )
    _validate("invoiceEmailFailed", unreadable)


CONTRACT_EXAMPLE = json.loads(_body())  # CONTRACT.md's example event


@pytest.mark.parametrize(
    "change",
    [
        {"data": {"invoiceId": "../../admin"}},
        {"specversion": "0.3"},
        {"type": "invoice.created"},
        {"id": ""},
    ],
)
def test_the_incoming_schema_refuses_what_the_service_dead_letters(change: dict[str, Any]) -> None:
    """The document and the service's own parser agree, both ways."""
    _validate("invoiceReissued", CONTRACT_EXAMPLE)
    parse_reissued(_body(), CLOUDEVENTS_CONTENT_TYPE, provider="hostup")
    with pytest.raises(jsonschema.ValidationError):
        _validate("invoiceReissued", {**CONTRACT_EXAMPLE, **change})
    with pytest.raises(InvalidEvent):
        parse_reissued(_body(**change), CLOUDEVENTS_CONTENT_TYPE, provider="hostup")


def test_an_outgoing_event_without_a_field_of_the_contract_is_refused() -> None:
    event = failed_event(
        invoice="inv_1",
        provider="hostup",
        cause_key=("/billing", "e"),
        reissued_event={"id": "e", "source": "/billing"},
        attempts=1,
        reason={"step": "resend", "status": 404, "code": "not_found", "detail": "x"},
    )
    del event["data"]["attempts"]
    with pytest.raises(jsonschema.ValidationError):
        _validate("invoiceEmailFailed", event)


def test_the_command_prints_the_checked_in_document() -> None:
    """``invoice-mailer asyncapi > docs/asyncapi.json`` regenerates the file as it is."""
    done = subprocess.run(
        [sys.executable, "-c", "from cli import main; main()", "asyncapi"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout == DOCUMENT.read_text()
