"""``invoice-mailer status``: one screen of what the service is doing, once, live
(``--watch``), or as JSON (``--json``)."""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from typing import Any

import click
from kombu.utils.url import maybe_sanitize_url

from broker import DeadLetterQueue, queue_depths
from cli._table import print_table
from invoice_mailer.dependencies import BUS, api, budget
from invoice_mailer.health import Health
from invoice_mailer.ledger import LedgerError, open_ledger
from settings import Settings, load_or_exit
from tasks import TASK_QUEUE, create_app

EXIT_BROKER = 2


@click.command()
@click.option("--watch", type=click.FloatRange(min=0.5), metavar="SECONDS",
              help="Redraw every SECONDS until interrupted (Ctrl-C).")  # fmt: skip
@click.option("--times", type=click.IntRange(min=1), hidden=True,
              help="With --watch: stop after this many screens (scripts, tests).")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="One JSON object (a line per screen).")
def status(watch: float | None, times: int | None, as_json: bool) -> None:
    """Queue depths, tasks in flight per worker, dead letters by reason, ledger counts,
    dependency health, and the workers that answer. Exit 2: the broker is unreachable."""
    settings = load_or_exit()
    app = create_app(settings.model_copy(update={"sentry_dsn": None}))
    shown = 0
    try:
        while True:
            snapshot = gather(settings, app)
            if as_json:
                click.echo(json.dumps(snapshot))
            else:
                if watch is not None:
                    click.clear()
                    click.echo(f"every {watch:g} s, Ctrl-C to stop")
                render(snapshot)
            shown += 1
            if snapshot["queues"] is None and watch is None:
                sys.exit(EXIT_BROKER)
            if watch is None or (times is not None and shown >= times):
                return
            time.sleep(watch)  # the refresh interval the operator asked for
    except KeyboardInterrupt:
        return
    finally:
        app.close()


def gather(settings: Settings, app: Any) -> dict[str, Any]:
    """Everything ``status`` shows, as plain data; a part that cannot be read says why."""
    topology = settings.topology()
    snapshot: dict[str, Any] = {
        "broker": maybe_sanitize_url(settings.celery_broker_url),
        "queues": None,
        "broker_error": None,
        "dead_letters": {},
        "ledger": None,
        "ledger_error": None,
        "parked": {},
        "dependencies": [],
        "workers": {},
    }
    try:
        depths = queue_depths(settings.celery_broker_url, topology.watched_queues(TASK_QUEUE))
    except Exception as exc:
        snapshot["broker_error"] = f"{type(exc).__name__}: {exc}"
        return snapshot
    snapshot["queues"] = {f"{q} {state}": n for (q, state), n in depths.items()}
    entries = DeadLetterQueue(settings.celery_broker_url, topology).entries()
    snapshot["dead_letters"] = dict(Counter(e.code for e in entries).most_common())
    try:
        ledger = open_ledger(settings.ledger_url)
        try:
            snapshot["ledger"] = dict(sorted(ledger.counts().items()))
            snapshot["parked"] = dict(sorted(ledger.parked().items()))
            now = time.time()
            snapshot["dependencies"] = [
                _health(ledger.health(d, now), now) for d in dependency_names(settings)
            ]
        finally:
            ledger.close()
    except LedgerError as exc:
        snapshot["ledger_error"] = str(exc)
    active = app.control.inspect(timeout=1.0).active() or {}
    replies = app.control.ping(timeout=1.0) or []
    for name in sorted(n for reply in replies for n in reply):
        snapshot["workers"][name] = {"in_flight": len(active.get(name) or [])}
    return snapshot


def render(snapshot: dict[str, Any]) -> None:
    click.echo(f"broker {snapshot['broker']}")
    if snapshot["queues"] is None:
        click.echo(f"broker unreachable: {snapshot['broker_error']}")
        return
    click.echo("\nqueues")
    rows = [(*name.split(" ", 1), str(n)) for name, n in snapshot["queues"].items()]
    print_table(("queue", "state", "messages"), rows)
    click.echo("\ndead letters by reason")
    if snapshot["dead_letters"]:
        print_table(("reason", "count"), [(c, str(n)) for c, n in snapshot["dead_letters"].items()])
    else:
        click.echo("none")
    click.echo("\nledger")
    if snapshot["ledger"] is None:
        click.echo(f"unavailable: {snapshot['ledger_error']}")
    else:
        print_table(
            ("state", "events"),
            [(s, str(n)) for s, n in snapshot["ledger"].items()] or [("(empty)", "0")],
        )
        click.echo("\nwaiting in the broker, by step and what for")
        if snapshot["parked"]:
            print_table(
                ("step", "waits for", "events"),
                [(*w.split(" ", 1), str(n)) for w, n in snapshot["parked"].items()],
            )
        else:
            click.echo("none")
        click.echo("\ndependencies (shared by every worker)")
        print_table(
            ("dependency", "state", "for", "why"),
            [(d["dependency"], d["state"], d["for"], d["why"]) for d in snapshot["dependencies"]],
        )
    click.echo("\nworkers")
    if snapshot["workers"]:
        print_table(
            ("worker", "ping", "in flight"),
            [(name, "pong", str(w["in_flight"])) for name, w in snapshot["workers"].items()],
        )
    else:
        click.echo("none answered")


def dependency_names(settings: Settings) -> list[str]:
    provider = settings.billing_provider
    return [api(provider), budget(provider), BUS]


def _health(health: Health, now: float) -> dict[str, Any]:
    dependency, state, lasted, why = health_row(health, now)
    return {"dependency": dependency, "state": state, "for": lasted, "why": why}


def health_row(health: Health, now: float | None = None) -> tuple[str, str, str, str]:
    """One dependency as a row: its state, for how long, and why (when unhealthy)."""
    if health.ok:
        return (health.dependency, "healthy", "", "")
    lasted = f"{(now or time.time()) - health.since:.0f} s"
    return (health.dependency, str(health.state), lasted, health.detail or "")
