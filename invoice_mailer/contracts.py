"""The events in and out, as models: what is published is built from them, and the
AsyncAPI document (``docs/asyncapi.json``) is generated from them, so the document others
read and the bytes on the bus cannot drift apart (a test regenerates and compares).

Field names are the wire's (camelCase, as CONTRACT.md has them).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema

__all__ = [
    "EmailFailedData",
    "EmailQueuedData",
    "FailureReason",
    "OutgoingEvent",
    "ReissuedEventRef",
    "asyncapi",
]

Provider = Literal["hostup", "abillify"]


class _Wire(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ReissuedEventRef(_Wire):
    """The ``invoice.reissued`` that caused an outgoing event."""

    id: str | None = Field(description="Its CloudEvents id (null if it could not be read)")
    source: str | None = Field(description="Its CloudEvents source (null if unreadable)")


class EmailQueuedData(_Wire):
    """``data`` of ``invoice.email_queued``: the billing API queued the invoice email."""

    invoiceId: str = Field(description="The invoice id (HostUp) or reference (Abillify)")
    provider: Provider
    email: str | None = Field(description="Primary recipient from resend-email (null for abillify)")
    queuedAt: str = Field(
        description="When the API queued it (abillify: when its 200 arrived), RFC 3339"
    )
    jobId: str | None = Field(description="Abillify's job (null for hostup)")
    emailInfo: dict[str, Any] | None = Field(
        description="The email-info body (emails, currentTargets), or null if not fetched"
    )
    emailInfoError: str | None = Field(
        default=None, description="Why emailInfo is null; absent when it is not"
    )
    reissuedEvent: ReissuedEventRef


class FailureReason(_Wire):
    """Why an event was given up."""

    step: Literal["validate", "resend", "email_info"]
    status: int | None = Field(description="The HTTP status, or null")
    code: str = Field(description="The API's problem code, or the service's own")
    detail: str


class EmailFailedData(_Wire):
    """``data`` of ``invoice.email_failed``: the service gave the event up."""

    invoiceId: str | None = Field(description="Null if the event could not be read")
    provider: Provider
    reissuedEvent: ReissuedEventRef
    attempts: int = Field(ge=0, description="Tries of the step that gave up")
    reason: FailureReason


class OutgoingEvent(_Wire):
    """A structured-mode CloudEvent 1.0 the service publishes on ``billing.events``."""

    specversion: Literal["1.0"]
    id: str = Field(description="UUIDv5 of the incoming (type, source, id): the same every time")
    source: Literal["/invoice-mailer"]
    type: Literal["invoice.email_queued", "invoice.email_failed"]
    time: str = Field(description="RFC 3339, UTC")
    datacontenttype: Literal["application/json"]
    subject: str | None = Field(default=None, description="The invoice; absent if unreadable")
    data: EmailQueuedData | EmailFailedData


class _ReissuedData(_Wire):
    model_config = ConfigDict(extra="allow")

    invoiceId: str | None = Field(
        default=None,
        pattern=r"^inv_[A-Za-z0-9]{1,64}$",
        description="BILLING_PROVIDER=hostup: the public invoice id",
    )
    invoiceReference: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$",
        description="BILLING_PROVIDER=abillify: the invoice reference",
    )


class ReissuedEvent(_Wire):
    """``invoice.reissued`` as the service accepts it (anything else is dead-lettered)."""

    model_config = ConfigDict(extra="allow")

    specversion: Literal["1.0"]
    id: str = Field(min_length=1, description="With source, identifies the event")
    source: str = Field(min_length=1, description="A URI-reference, no control characters")
    type: Literal["invoice.reissued"]
    time: str | None = None
    data: _ReissuedData


_SCHEMAS: list[type[BaseModel]] = [
    ReissuedEvent,
    OutgoingEvent,
    EmailQueuedData,
    EmailFailedData,
    FailureReason,
    ReissuedEventRef,
]


def _channel(address: str, message: str, description: str) -> dict[str, Any]:
    return {
        "address": address,
        "description": description,
        "messages": {message: {"$ref": f"#/components/messages/{message}"}},
        "bindings": {
            "amqp": {
                "is": "routingKey",
                "exchange": {
                    "name": "billing.events",
                    "type": "topic",
                    "durable": True,
                    "autoDelete": False,
                    "vhost": "/",
                },
                "bindingVersion": "0.3.0",
            }
        },
    }


def _message(name: str, schema: str, summary: str) -> dict[str, Any]:
    return {
        "name": name,
        "title": name,
        "summary": summary,
        "contentType": "application/cloudevents+json",
        "payload": {"$ref": f"#/components/schemas/{schema}"},
        "bindings": {"amqp": {"deliveryMode": 2, "bindingVersion": "0.3.0"}},
    }


def asyncapi(version: str) -> dict[str, Any]:
    """The AsyncAPI 3.0 document of the queues and events in and out."""
    _, schemas = models_json_schema(
        [(m, "validation") for m in _SCHEMAS], ref_template="#/components/schemas/{model}"
    )
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "invoice-mailer",
            "version": version,
            "description": (
                "Consumes invoice.reissued, asks the billing API to resend the invoice email, "
                "and publishes invoice.email_queued or invoice.email_failed (CONTRACT.md). "
                "Generated from invoice_mailer/contracts.py: do not edit by hand."
            ),
        },
        "defaultContentType": "application/cloudevents+json",
        "servers": {
            "rabbitmq": {"host": "127.0.0.1:5672", "protocol": "amqp", "protocolVersion": "0.9.1"}
        },
        "channels": {
            "invoiceReissued": _channel(
                "invoice.reissued",
                "invoiceReissued",
                "Upstream reissued an invoice; read from queue invoice-mailer.reissued",
            ),
            "invoiceEmailQueued": _channel(
                "invoice.email_queued",
                "invoiceEmailQueued",
                "The billing API queued the invoice email",
            ),
            "invoiceEmailFailed": _channel(
                "invoice.email_failed",
                "invoiceEmailFailed",
                "The service gave the event up; its body is on the dead-letter queue",
            ),
            "deadLetters": {
                "address": "invoice-mailer.dead-letter",
                "description": (
                    "Given-up events, body unchanged, reason in x-invoice-mailer-reason, "
                    "-reason-code, -attempts and -failed-at headers"
                ),
                "messages": {"deadLetter": {"$ref": "#/components/messages/deadLetter"}},
                "bindings": {
                    "amqp": {
                        "is": "queue",
                        "queue": {
                            "name": "invoice-mailer.dead-letter",
                            "durable": True,
                            "exclusive": False,
                            "autoDelete": False,
                            "vhost": "/",
                        },
                        "bindingVersion": "0.3.0",
                    }
                },
            },
        },
        "operations": {
            "receiveInvoiceReissued": {
                "action": "receive",
                "channel": {"$ref": "#/channels/invoiceReissued"},
            },
            "sendInvoiceEmailQueued": {
                "action": "send",
                "channel": {"$ref": "#/channels/invoiceEmailQueued"},
            },
            "sendInvoiceEmailFailed": {
                "action": "send",
                "channel": {"$ref": "#/channels/invoiceEmailFailed"},
            },
            "sendDeadLetter": {"action": "send", "channel": {"$ref": "#/channels/deadLetters"}},
        },
        "components": {
            "messages": {
                "invoiceReissued": _message(
                    "invoice.reissued", "ReissuedEvent", "An invoice was reissued"
                ),
                "invoiceEmailQueued": _message(
                    "invoice.email_queued", "OutgoingEvent", "data: EmailQueuedData"
                ),
                "invoiceEmailFailed": _message(
                    "invoice.email_failed", "OutgoingEvent", "data: EmailFailedData"
                ),
                "deadLetter": {
                    "name": "dead letter",
                    "summary": "The original invoice.reissued body, as it arrived",
                    "payload": {"$ref": "#/components/schemas/ReissuedEvent"},
                },
            },
            "schemas": schemas["$defs"],
        },
    }
