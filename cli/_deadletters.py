"""``invoice-mailer dead-letters list | replay | purge``."""

from __future__ import annotations

import sys
from datetime import UTC, datetime

import click

from broker import DeadLetterEntry, DeadLetterQueue
from cli._table import print_table
from invoice_mailer.errors import PublishError
from settings import load_or_exit


def _queue() -> DeadLetterQueue:
    settings = load_or_exit()
    return DeadLetterQueue(settings.celery_broker_url, settings.topology())


@click.group("dead-letters")
def dead_letters() -> None:
    """Inspect and re-publish events the service gave up on."""


@dead_letters.command("list")
def list_() -> None:
    """Show every dead letter: event id, invoice, reason, attempts, age."""
    entries = _queue().entries()
    _print(entries)
    click.echo(f"{len(entries)} dead letter(s)")


@dead_letters.command()
@click.option("--id", "ids", multiple=True, help="Event id to replay (repeatable).")
@click.option("--reason", "reasons", multiple=True, help="Reason code to replay (repeatable).")
@click.option("--all", "everything", is_flag=True, help="Replay every dead letter.")
@click.option("--dry-run", is_flag=True, help="Show what would be replayed; change nothing.")
def replay(ids: tuple[str, ...], reasons: tuple[str, ...], everything: bool, dry_run: bool) -> None:
    """Re-publish dead letters to billing.events / invoice.reissued.

    Each is removed from the dead-letter queue only once the broker confirmed its replay.
    """
    if not (ids or reasons or everything):
        raise click.UsageError("say what to replay: --id, --reason or --all")

    def select(entry: DeadLetterEntry) -> bool:
        return everything or entry.event_id in ids or entry.code in reasons

    try:
        replayed = _queue().replay(select, dry_run=dry_run)
    except PublishError as exc:
        click.echo(f"invoice-mailer: replay stopped, the rest stay dead-lettered: {exc}", err=True)
        sys.exit(2)
    _print(replayed)
    verb = "would replay" if dry_run else "replayed"
    click.echo(f"{verb} {len(replayed)} dead letter(s)")


@dead_letters.command()
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def purge(yes: bool) -> None:
    """Delete every dead letter, after confirmation."""
    queue = _queue()
    count = len(queue.entries())
    if count == 0:
        click.echo("no dead letters")
        return
    if not yes:
        click.confirm(f"Delete {count} dead letter(s) for good?", abort=True)
    click.echo(f"purged {queue.purge()} dead letter(s)")


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
