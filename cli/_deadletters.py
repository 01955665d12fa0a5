"""``invoice-mailer dead-letters list | summary | replay | purge``.

Every command takes the same filters (``--id``, ``--reason``, ``--invoice``,
``--older-than``, ``--newer-than``); ``--json`` prints for scripts. Exit codes: 0 done,
1 declined at the prompt, 2 usage or a replay the broker stopped.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import click

from broker import DeadLetterEntry, DeadLetterQueue, Selection, by_reason
from cli._table import print_table
from invoice_mailer.errors import PublishError
from settings import load_or_exit

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_age(text: str) -> float:
    """``90s``, ``30m``, ``2h``, ``7d`` (or plain seconds) -> seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if match is None:
        raise click.BadParameter(f"{text!r}: a number and s, m, h or d (30m, 2h, 7d)")
    return float(match.group(1)) * _UNITS[match.group(2) or "s"]


class _Age(click.ParamType):
    name = "age"

    def convert(self, value: Any, param: Any, ctx: Any) -> float:
        return value if isinstance(value, float) else parse_age(str(value))


def _filters(command: Callable[..., Any]) -> Callable[..., Any]:
    """The selection options every command shares."""
    options = [
        click.option("--id", "ids", multiple=True, help="Event id (repeatable)."),
        click.option("--reason", "reasons", multiple=True, help="Reason code (repeatable)."),
        click.option("--invoice", "invoices", multiple=True, help="Invoice (repeatable)."),
        click.option("--older-than", type=_Age(), help="Dead-lettered longer ago (30m, 2h, 7d)."),
        click.option("--newer-than", type=_Age(), help="Dead-lettered more recently."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _selection(
    ids: tuple[str, ...],
    reasons: tuple[str, ...],
    invoices: tuple[str, ...],
    older_than: float | None,
    newer_than: float | None,
) -> Selection:
    return Selection(
        ids=frozenset(ids),
        reasons=frozenset(reasons),
        invoices=frozenset(invoices),
        older_than=older_than,
        newer_than=newer_than,
    )


def _queue() -> DeadLetterQueue:
    settings = load_or_exit()
    return DeadLetterQueue(settings.celery_broker_url, settings.topology())


@click.group("dead-letters")
def dead_letters() -> None:
    """Inspect, replay and purge events the service gave up on."""


@dead_letters.command("list")
@_filters
@click.option("--limit", type=click.IntRange(min=1), help="Show at most this many.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def list_(limit: int | None, as_json: bool, **filters: Any) -> None:
    """Dead letters, oldest first: event id, invoice, reason, attempts, age."""
    entries = _queue().entries(_selection(**filters), limit=limit)
    if as_json:
        now = datetime.now(UTC)
        for entry in entries:
            click.echo(json.dumps(entry.as_json(now)))
        return
    _print(entries)
    click.echo(f"{len(entries)} dead letter(s)")


@dead_letters.command()
@_filters
@click.option("--json", "as_json", is_flag=True, help="A JSON array of the groups.")
def summary(as_json: bool, **filters: Any) -> None:
    """Dead letters grouped by reason: how many, the oldest and newest, an example."""
    groups = by_reason(_queue().entries(_selection(**filters)))
    now = datetime.now(UTC)
    if as_json:
        click.echo(
            json.dumps(
                [
                    {
                        "code": g.code,
                        "count": g.count,
                        "oldest": g.oldest.isoformat() if g.oldest else None,
                        "newest": g.newest.isoformat() if g.newest else None,
                        "example": g.example,
                    }
                    for g in groups
                ]
            )
        )
        return
    rows = [
        (g.code, str(g.count), _age(now, g.oldest), _age(now, g.newest), g.example[:60])
        for g in groups
    ]
    if rows:
        print_table(("reason", "count", "oldest", "newest", "example"), rows)
    click.echo(f"{sum(g.count for g in groups)} dead letter(s) in {len(groups)} group(s)")


@dead_letters.command()
@_filters
@click.option("--all", "everything", is_flag=True, help="Replay every dead letter.")
@click.option("--dry-run", is_flag=True, help="Show what would be replayed; change nothing.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per replayed event.")
def replay(everything: bool, dry_run: bool, as_json: bool, **filters: Any) -> None:
    """Re-publish dead letters to billing.events / invoice.reissued, each event once.

    A dead letter leaves the queue only once the broker confirmed its replay; a second
    dead letter of an event already replayed is removed without a second publish.
    """
    select = _selection(**filters)
    if select.everything and not everything:
        raise click.UsageError("say what to replay: --id, --reason, --invoice, an age or --all")
    queue = _queue()
    # The bar counts the dead letters looked at, against the queue's depth: one passive
    # declare, not a browse of the whole queue before the one that replays.
    with click.progressbar(
        length=queue.depth(), label="replaying", file=sys.stderr, show_pos=True
    ) as bar:  # drawn only on a terminal
        try:
            replayed = queue.replay(select, dry_run=dry_run, progress=lambda _: bar.update(1))
        except PublishError as exc:
            click.echo(
                f"invoice-mailer: replay stopped, the rest stay dead-lettered: {exc}", err=True
            )
            sys.exit(2)
    if as_json:
        now = datetime.now(UTC)
        for entry in replayed:
            click.echo(json.dumps(entry.as_json(now)))
        return
    _print(replayed)
    verb = "would replay" if dry_run else "replayed"
    click.echo(f"{verb} {len(replayed)} dead letter(s)")


@dead_letters.command()
@_filters
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def purge(yes: bool, **filters: Any) -> None:
    """Delete the selected dead letters (every one, without a filter), after confirmation."""
    select = _selection(**filters)
    queue = _queue()
    count = len(queue.entries(select))
    if count == 0:
        click.echo("no dead letters")
        return
    if not yes:
        click.confirm(f"Delete {count} dead letter(s) for good?", abort=True)
    click.echo(f"purged {queue.purge(select)} dead letter(s)")


def _print(entries: list[DeadLetterEntry]) -> None:
    now = datetime.now(UTC)
    rows = [
        (
            e.event_id or "-",
            e.invoice or "-",
            f"{e.code}: {e.detail}"[:70],
            "-" if e.attempts is None else str(e.attempts),
            _age(now, e.failed_at),
            e.origin,
        )
        for e in entries
    ]
    if rows:
        print_table(("event", "invoice", "reason", "attempts", "age", "origin"), rows)


def _age(now: datetime, then: datetime | None) -> str:
    if then is None:
        return "-"
    seconds = max(0, int((now - then.astimezone(UTC)).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"
