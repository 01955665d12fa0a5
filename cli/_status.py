"""``invoice-mailer status``: one screen of what the service is doing."""

from __future__ import annotations

import sys
import time
from collections import Counter

import click
from kombu.utils.url import maybe_sanitize_url

from broker import DeadLetterQueue, queue_depths
from cli._table import print_table
from invoice_mailer.dependencies import BUS, api, budget
from invoice_mailer.health import Health
from invoice_mailer.ledger import LedgerError, open_ledger
from settings import Settings, load_or_exit
from tasks import TASK_QUEUE, create_app


@click.command()
def status() -> None:
    """Queue depths, dead letters by reason, ledger counts, and the workers that answer."""
    settings = load_or_exit()
    topology = settings.topology()
    click.echo(f"broker {maybe_sanitize_url(settings.celery_broker_url)}")
    try:
        depths = queue_depths(
            settings.celery_broker_url,
            {
                "reissued": topology.reissued_queue,
                "tasks": TASK_QUEUE,
                "dead_letter": topology.dead_letter_queue,
            },
        )
    except Exception as exc:
        click.echo(f"broker unreachable: {type(exc).__name__}: {exc}")
        sys.exit(2)
    click.echo("\nqueues")
    print_table(
        ("queue", "state", "messages"), [(q, state, str(n)) for (q, state), n in depths.items()]
    )

    letters = Counter(
        e.code for e in DeadLetterQueue(settings.celery_broker_url, topology).entries()
    )
    click.echo("\ndead letters by reason")
    if letters:
        print_table(("reason", "count"), [(code, str(n)) for code, n in letters.most_common()])
    else:
        click.echo("none")

    click.echo("\nledger")
    try:
        ledger = open_ledger(settings.ledger_url)
        counts = ledger.counts()
        health = [ledger.health(d, time.time()) for d in dependency_names(settings)]
        ledger.close()
        print_table(
            ("state", "events"),
            [(s, str(n)) for s, n in sorted(counts.items())] or [("(empty)", "0")],
        )
        click.echo("\ndependencies (shared by every worker)")
        print_table(("dependency", "state", "for", "why"), [health_row(h) for h in health])
    except LedgerError as exc:
        click.echo(f"unavailable: {exc}")

    click.echo("\nworkers")
    app = create_app(settings.model_copy(update={"sentry_dsn": None}))
    replies = app.control.ping(timeout=1.0) or []
    names = sorted(name for reply in replies for name in reply)
    if names:
        print_table(("worker", "ping"), [(name, "pong") for name in names])
    else:
        click.echo("none answered")
    app.close()


def dependency_names(settings: Settings) -> list[str]:
    provider = settings.billing_provider
    return [api(provider), budget(provider), BUS]


def health_row(health: Health) -> tuple[str, str, str, str]:
    """One dependency as a row: its state, for how long, and why (when unhealthy)."""
    if health.ok:
        return (health.dependency, "healthy", "", "")
    lasted = f"{time.time() - health.since:.0f} s"
    return (health.dependency, str(health.state), lasted, health.detail or "")
