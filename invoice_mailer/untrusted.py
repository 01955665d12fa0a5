"""API text is untrusted: what an answer says is cleaned before it goes anywhere.

A billing API (or a proxy in front of it) may echo the request in an error body:
the ``Authorization`` header with the Bearer key, or Abillify's Basic
``user:password`` in base64, raw or URL-encoded. Such text would travel into
``invoice.email_failed``'s ``reason.detail``, ``emailInfoError``, a dead letter's
reason header, the ledger, logs and Sentry. ``Redactor.text`` is the one function
that cleans it, applied where API text enters (``billing._http.send``, on every
error body's problem, and the clients' 2xx bodies): every configured secret
masked in each form it travels in, email addresses masked (no contract field
asks for one in an error), control characters replaced, the length bounded.
``Redactor.scrub`` masks the same in whole payloads (Sentry's events, uncut).

Hand-written because the forms are ours to know: a generic secret scanner guesses
at shapes of keys, while this masks exactly the values configured.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable
from typing import Any
from urllib.parse import quote, quote_plus

__all__ = ["EMAIL", "MASK", "Redactor"]

MASK = "[redacted]"
MAX_TEXT = 300
# Shorter values are not masked: they would match ordinary text ("a", "ab").
MIN_SECRET = 4
EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]+")


class Redactor:
    """Masks the given secrets, and the Basic credentials of ``basic``, in every form."""

    def __init__(self, secrets: Iterable[str] = (), *, basic: tuple[str, str] | None = None):
        values = [s for s in secrets if s]
        if basic is not None:
            user, password = basic
            values.append(password)
            values.append(f"{user}:{password}")
        forms: set[str] = set()
        for value in values:
            raw = value.encode()
            forms |= {
                value,
                quote(value, safe=""),
                quote_plus(value),
                base64.b64encode(raw).decode(),
                base64.b64encode(raw).decode().rstrip("="),
                base64.urlsafe_b64encode(raw).decode().rstrip("="),
            }
        encoded = {quote(f, safe="") for f in forms} | {quote_plus(f) for f in forms}
        # Longest first: a form that contains another is masked whole.
        self._forms = sorted(
            (f for f in forms | encoded if len(f) >= MIN_SECRET), key=len, reverse=True
        )

    def text(self, value: str, *, limit: int = MAX_TEXT, emails: bool = True) -> str:
        """``value`` safe to publish, record and log; ``emails=False`` keeps addresses."""
        cleaned = self.secrets(value)
        if emails:
            cleaned = EMAIL.sub(MASK, cleaned)
        cleaned = _CONTROL.sub(" ", cleaned)
        if len(cleaned) > limit:
            cleaned = cleaned[: limit - 1] + "…"
        return cleaned

    def scrub(self, value: Any) -> Any:
        """Secrets and addresses masked in every string of ``value`` (nested dicts, lists),
        nothing cut: for whole payloads that leave the process (Sentry's events)."""
        if isinstance(value, str):
            return EMAIL.sub(MASK, self.secrets(value))
        if isinstance(value, dict):
            return {k: self.scrub(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return type(value)(self.scrub(v) for v in value)
        return value

    def secrets(self, value: str) -> str:
        """``value`` with every form of every secret masked, nothing else changed."""
        for form in self._forms:
            if form in value:
                value = value.replace(form, MASK)
        return value

    def json(self, value: Any) -> Any:
        """A JSON value with the secrets masked in every string (keys included), addresses
        kept: for 2xx bodies whose addresses the contract calls for (email-info)."""
        if isinstance(value, str):
            return self.secrets(value)
        if isinstance(value, list):
            return [self.json(v) for v in value]
        if isinstance(value, dict):
            return {self.secrets(str(k)): self.json(v) for k, v in value.items()}
        return value
