"""``invoice-mailer ledger show | prune``."""

from __future__ import annotations

import json
import re
import sys
import time

import click

from invoice_mailer.ledger import Ledger, LedgerError, open_ledger
from settings import load_or_exit

_DURATION = re.compile(r"^(\d+)([smhd])$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


@click.group()
def ledger() -> None:
    """Inspect and prune the idempotency ledger (LEDGER_URL)."""


@ledger.command()
@click.argument("event_id")
def show(event_id: str) -> None:
    """Print what the ledger knows of EVENT_ID (every source), as JSON."""
    records = _open().find(event_id)
    if not records:
        click.echo(f"no ledger record for event {event_id!r}", err=True)
        sys.exit(1)
    click.echo(json.dumps([r.to_dict() for r in records], indent=2))


@ledger.command()
@click.option("--older-than", "older_than", required=True, help="Age, e.g. 30d, 12h, 90m.")
def prune(older_than: str) -> None:
    """Delete finished records (published or failed) last touched before the given age.

    A redelivery of a pruned event would run it again: keep records longer than
    any upstream might redeliver (the broker's message TTL, replays).
    """
    match = _DURATION.match(older_than)
    if match is None:
        raise click.BadParameter(
            "use a number and s, m, h or d (e.g. 30d)", param_hint="--older-than"
        )
    seconds = int(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    removed = _open().prune(older_than=time.time() - seconds)
    click.echo(f"pruned {removed} record(s) older than {older_than}")


def _open() -> Ledger:
    settings = load_or_exit()
    try:
        return open_ledger(settings.ledger_url)
    except LedgerError as exc:
        click.echo(f"invoice-mailer: {exc}", err=True)
        sys.exit(2)
