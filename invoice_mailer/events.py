"""CloudEvents in and out: parsing ``invoice.reissued``, building what we publish.

Parsing works on the raw message body: kombu's own decoding rejects
``application/cloudevents+json`` and would hand a body without content type
through as a string, so nothing here trusts the transport's idea of the payload.
Every way an event can be unusable maps to one stable ``InvalidEvent.code``.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import rfc3986
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
)
from rfc3986.exceptions import ValidationError as UriError
from rfc3986.validators import Validator

from invoice_mailer.errors import InvalidEvent

__all__ = [
    "ACCEPTED_CONTENT_TYPES",
    "CLOUDEVENTS_CONTENT_TYPE",
    "EMAIL_FAILED",
    "EMAIL_QUEUED",
    "ID_SCHEME",
    "MAX_EVENT_BYTES",
    "REISSUED",
    "Glimpse",
    "Reissued",
    "cloud_event",
    "encode",
    "glimpse",
    "outgoing_event_id",
    "parse_reissued",
]

REISSUED = "invoice.reissued"
EMAIL_QUEUED = "invoice.email_queued"
EMAIL_FAILED = "invoice.email_failed"
CLOUDEVENTS_CONTENT_TYPE = "application/cloudevents+json"
ACCEPTED_CONTENT_TYPES = frozenset({CLOUDEVENTS_CONTENT_TYPE, "application/json"})
OUR_SOURCE = "/invoice-mailer"
MAX_EVENT_BYTES = 64 * 1024

# Fixed forever: outgoing ids derive from it, and downstream deduplicates on them.
_ID_NAMESPACE = uuid.UUID("5f0c6f3e-2b7a-4c1e-9d3a-6b8e1f2a4c70")
ID_SCHEME = 2
"""How new events' outgoing ids are named (``outgoing_event_id``); the ledger keeps each
event's scheme, so an event recorded under an older one keeps its ids."""

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# RFC 3986's characters of a URI-reference: unreserved, sub-delims, gen-delims, and
# %XX escapes. rfc3986's Validator checks the parts (scheme, host, port) but lets
# spaces, raw non-ASCII and broken escapes through, so the characters are checked here.
_URI_CHARACTERS = re.compile(r"(?:[A-Za-z0-9\-._~!$&'()*+,;=:@/?#\[\]]|%[0-9A-Fa-f]{2})*")
_URI_PARTS = Validator().check_validity_of(
    "scheme", "userinfo", "host", "port", "path", "query", "fragment"
)


def _no_control_characters(value: str) -> str:
    if _CONTROL.search(value):
        raise ValueError("contains a control character")
    return value


def _uri_reference(value: str) -> str:
    if not _URI_CHARACTERS.fullmatch(value):
        raise ValueError("is not a URI-reference (RFC 3986): a character outside its grammar")
    try:
        _URI_PARTS.validate(rfc3986.uri_reference(value))
    except UriError:
        raise ValueError("is not a URI-reference (RFC 3986)") from None
    return value


_Text = Annotated[
    str, StringConstraints(min_length=1, max_length=256), AfterValidator(_no_control_characters)
]
# CloudEvents: "source" is a non-empty URI-reference.
_Source = Annotated[
    str, StringConstraints(min_length=1, max_length=1024), AfterValidator(_uri_reference)
]
# HostUp's public invoice ids: "inv_" then letters and digits, nothing that could
# change the meaning of a URL path.
_InvoiceId = Annotated[str, StringConstraints(pattern=r"^inv_[A-Za-z0-9]{1,64}$")]
# Abillify references: one safe path segment; the first character rules out "." and "..".
_InvoiceReference = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")]


class _Envelope(BaseModel):
    model_config = ConfigDict(frozen=True, strict=True)

    specversion: Literal["1.0"]
    id: _Text
    source: _Source
    type: Literal["invoice.reissued"]
    time: datetime | None = Field(default=None, strict=False)  # RFC 3339 text on the wire
    data: dict[str, Any]


class _HostUpData(BaseModel):
    model_config = ConfigDict(frozen=True, strict=True)

    invoice_id: _InvoiceId = Field(alias="invoiceId")


class _AbillifyData(BaseModel):
    model_config = ConfigDict(frozen=True, strict=True)

    invoice_reference: _InvoiceReference = Field(alias="invoiceReference")


_DATA_MODELS: dict[str, tuple[type[BaseModel], str]] = {
    "hostup": (_HostUpData, "invoice_id"),
    "abillify": (_AbillifyData, "invoice_reference"),
}


@dataclass(frozen=True, slots=True)
class Reissued:
    """A validated ``invoice.reissued``: all the pipeline needs to know of it."""

    event_id: str
    source: str
    invoice: str
    """``data.invoiceId`` (HostUp) or ``data.invoiceReference`` (Abillify), validated."""

    @property
    def key(self) -> tuple[str, str]:
        """``(source, id)``: what identifies the event (CONTRACT.md)."""
        return (self.source, self.event_id)


def parse_reissued(body: bytes, content_type: str | None, *, provider: str) -> Reissued:
    """Validate a raw message body as an ``invoice.reissued`` for ``provider``.

    Raises InvalidEvent with a stable code; never returns anything unsafe to put
    in a URL path.
    """
    media_type = (content_type or "").split(";", 1)[0].strip().lower()
    if media_type and media_type not in ACCEPTED_CONTENT_TYPES:
        raise InvalidEvent("unsupported_content_type", f"content type {media_type!r} is not JSON")
    if len(body) > MAX_EVENT_BYTES:
        raise InvalidEvent("too_large", f"event is {len(body)} bytes, limit {MAX_EVENT_BYTES}")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidEvent("not_utf8", f"body is not UTF-8 ({exc.reason})") from None
    try:
        doc = json.loads(text)
    except RecursionError:
        raise InvalidEvent("not_json", "body is nested too deeply") from None
    except ValueError as exc:
        raise InvalidEvent("not_json", f"body is not JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise InvalidEvent("invalid_cloudevent", "body is not a JSON object")
    try:
        envelope = _Envelope.model_validate(doc)
    except ValidationError as exc:
        raise InvalidEvent("invalid_cloudevent", _describe(exc)) from None
    model, attribute = _DATA_MODELS[provider]
    try:
        data = model.model_validate(envelope.data)
    except ValidationError as exc:
        raise InvalidEvent("invalid_invoice_id", _describe(exc)) from None
    return Reissued(event_id=envelope.id, source=envelope.source, invoice=getattr(data, attribute))


@dataclass(frozen=True, slots=True)
class Glimpse:
    """What can be read of an event body that may be invalid: for reports, never URLs."""

    source: str | None
    event_id: str | None
    invoice: str | None


def glimpse(body: bytes) -> Glimpse:
    """Best-effort ``source``, ``id`` and invoice of any body; each None when unreadable.

    Only short strings count, so nothing huge or nested lands in a report.
    """
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return Glimpse(None, None, None)
    if not isinstance(doc, dict):
        return Glimpse(None, None, None)
    data = doc.get("data")
    invoice = (
        data.get("invoiceId", data.get("invoiceReference")) if isinstance(data, dict) else None
    )
    return Glimpse(_short(doc.get("source")), _short(doc.get("id")), _short(invoice))


def _short(value: object) -> str | None:
    return value if isinstance(value, str) and 0 < len(value) <= 1024 else None


def outgoing_event_id(
    event_type: str, source: str, event_id: str, *, scheme: int = ID_SCHEME
) -> str:
    """The id of the event we publish for an incoming ``(source, id)``: the same every time.

    A UUIDv5 of a name that encodes the triple so that distinct triples never share it:
    scheme 2 names it by its JSON array. Scheme 1 (0.1 and 0.2) joined the parts with
    newlines, so ``("/a\\nx", "E")`` and ``("/a", "x\\nE")`` met; it is kept for the
    events the ledger recorded under it, whose ids must not change.
    """
    if scheme == 1:
        name = f"{event_type}\n{source}\n{event_id}"
    else:
        name = json.dumps([event_type, source, event_id], ensure_ascii=False, separators=(",", ":"))
    return str(uuid.uuid5(_ID_NAMESPACE, name))


def cloud_event(
    event_type: str,
    *,
    cause_key: tuple[str, str],
    subject: str | None,
    data: dict[str, Any],
    now: datetime | None = None,
    id_scheme: int = ID_SCHEME,
) -> dict[str, Any]:
    """A structured-mode CloudEvent; its id derives from ``cause_key`` (source, id)."""
    event: dict[str, Any] = {
        "specversion": "1.0",
        "id": outgoing_event_id(event_type, *cause_key, scheme=id_scheme),
        "source": OUR_SOURCE,
        "type": event_type,
        "time": (now or datetime.now(UTC)).isoformat().replace("+00:00", "Z"),
        "datacontenttype": "application/json",
    }
    if subject is not None:
        event["subject"] = subject
    event["data"] = data
    return event


def encode(event: dict[str, Any]) -> bytes:
    """The wire form of an event: compact UTF-8 JSON."""
    return json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _describe(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors(include_url=False, include_input=False)[:3]:
        where = ".".join(str(p) for p in error["loc"]) or "event"
        parts.append(f"{where}: {error['msg']}")
    return "; ".join(parts)
