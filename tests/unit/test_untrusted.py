"""API text is untrusted: every form of a configured secret is masked, and more."""

from __future__ import annotations

import base64
import json
from urllib.parse import quote, quote_plus, urlencode

import pytest

from invoice_mailer.untrusted import MASK, Redactor

KEY = "hk_live_0123456789abcdef"
USER, PASSWORD = "billing-bot", "p@ss w0rd/+="
BASIC = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()

FORMS = [
    ("raw key", KEY),
    ("bearer header", f"Authorization: Bearer {KEY}"),
    ("key url-encoded", quote(f"Bearer {KEY}", safe="")),
    ("key in a query string", urlencode({"authorization": f"Bearer {KEY}"})),
    ("key base64", base64.b64encode(KEY.encode()).decode()),
    ("basic header", f"Authorization: Basic {BASIC}"),
    ("basic url-encoded", quote(f"Basic {BASIC}", safe="")),
    ("basic plus-encoded", quote_plus(f"Basic {BASIC}")),
    ("basic unpadded", BASIC.rstrip("=")),
    ("raw password", f"password was {PASSWORD}"),
    ("password url-encoded", quote(PASSWORD, safe="")),
    ("user:password", f"{USER}:{PASSWORD}"),
    ("headers as json", json.dumps({"Authorization": f"Basic {BASIC}", "X": KEY})),
]
SECRETS = (KEY, PASSWORD, BASIC, BASIC.rstrip("="), quote(PASSWORD, safe=""))


@pytest.mark.parametrize("text", [f[1] for f in FORMS], ids=[f[0] for f in FORMS])
def test_every_form_of_a_secret_is_masked(text: str) -> None:
    """Raw, Bearer, Basic base64, URL-encoded, in JSON: none of it survives."""
    redactor = Redactor([KEY], basic=(USER, PASSWORD))
    cleaned = redactor.text(f"Unauthorized; {text}; try again")
    assert MASK in cleaned
    assert not any(secret in cleaned for secret in SECRETS), cleaned


def test_addresses_are_masked_in_text_and_kept_in_bodies_that_call_for_them() -> None:
    """An error's text names no customer; email-info's body keeps its recipients."""
    redactor = Redactor([KEY])
    assert redactor.text("no mailbox billing@example.com") == f"no mailbox {MASK}"
    assert redactor.text("billing@example.com", emails=False) == "billing@example.com"
    body = {"emails": [{"to": "owner@example.com", "note": f"sent with {KEY}"}]}
    assert redactor.json(body) == {
        "emails": [{"to": "owner@example.com", "note": f"sent with {MASK}"}]
    }


def test_control_characters_are_replaced_and_the_length_is_bounded_after_masking() -> None:
    """Newlines, NUL and ESC become spaces; a cut never leaves half a secret behind."""
    redactor = Redactor([KEY])
    assert redactor.text("line\none\x00two\x1b[31m") == "line one two [31m"
    cut = redactor.text("x" * 290 + KEY, limit=300)
    assert len(cut) <= 300
    assert KEY[:8] not in cut


def test_short_or_empty_secrets_mask_nothing() -> None:
    """A secret of a few characters would match ordinary words: it is not a form."""
    assert Redactor(["", "ab"]).text("ab about") == "ab about"
