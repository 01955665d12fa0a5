"""Reading AMQP messages as the bytes that were published."""

from __future__ import annotations

from kombu.message import Message

__all__ = ["raw_body"]


def raw_body(message: Message) -> bytes:
    """The message body as published.

    py-amqp decodes a body whose content-encoding it knows into ``str`` (and
    leaves bytes when decoding fails); undo that with the same encoding, so
    nothing downstream depends on the publisher's labelling.
    """
    body = message.body
    if isinstance(body, str):
        return body.encode(message.content_encoding or "utf-8")
    return bytes(body)
