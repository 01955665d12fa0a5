"""Commands: demo, publish-reissued, check."""

from __future__ import annotations

import json
import sys
import time
import uuid
from datetime import UTC, datetime
from typing import Any, NoReturn

import click
import httpx
from kombu import Connection
from kombu.utils.url import maybe_sanitize_url

from broker import EventPublisher
from cli._deadletters import dead_letters
from cli._ledger import ledger
from cli._status import dependency_names, health_row, status
from invoice_mailer.billing import build_http_client
from invoice_mailer.errors import PublishError
from invoice_mailer.events import CLOUDEVENTS_CONTENT_TYPE, REISSUED
from invoice_mailer.ledger import LedgerError, open_ledger
from settings import Settings, load_or_exit

EXIT_BROKER = 2
EXIT_API = 3
EXIT_LEDGER = 4
EXIT_UNHEALTHY = 5
"""A dependency is unhealthy for the fleet (shared health): events wait for it."""


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """invoice-mailer: invoice.reissued -> resend the invoice email -> invoice.email_queued."""


@main.command()
@click.option("--quiet", is_flag=True, help="Print only the summary table.")
def demo(quiet: bool) -> None:
    """Run the whole pipeline in one process: in-memory broker, local billing sandbox."""
    from cli._demo import run_demo

    sys.exit(run_demo(verbose=not quiet))


@main.command("publish-reissued")
@click.argument("invoices", nargs=-1)
@click.option("--count", default=1, show_default=True, type=click.IntRange(min=1),
              help="Events per invoice, each with an id of its own.")  # fmt: skip
@click.option("--from-file", "from_file", type=click.File("r"),
              help="Invoices, one per line ('-': standard input).")  # fmt: skip
@click.option("--event-id", default=None, help="CloudEvent id (one event only; default: new).")
@click.option("--source", default="/billing", show_default=True)
def publish_reissued(
    invoices: tuple[str, ...], count: int, from_file: Any, event_id: str | None, source: str
) -> None:
    """Publish invoice.reissued for each INVOICE (an id, or a reference for abillify):
    one connection for them all, one confirmed publish each, a JSON line each."""
    wanted = list(invoices)
    if from_file is not None:
        wanted += [line.strip() for line in from_file if line.strip()]
    if not wanted:
        raise click.UsageError("name an INVOICE, or --from-file")
    if event_id is not None and len(wanted) * count != 1:
        raise click.UsageError("--event-id names one event: one INVOICE, --count 1")
    settings = load_or_exit()
    field = "invoiceReference" if settings.billing_provider == "abillify" else "invoiceId"
    topology = settings.topology()
    publisher = EventPublisher.connect(settings.celery_broker_url, topology, pool_size=1)
    started, published = time.monotonic(), 0
    try:
        with Connection(settings.celery_broker_url, connect_timeout=10) as conn:
            topology.declare(conn)  # the event waits in its queue even if no worker runs yet
        for invoice in wanted:
            for _ in range(count):
                event = _reissued(invoice, field, event_id or f"evt_{uuid.uuid4().hex}", source)
                publisher.publish_raw(
                    json.dumps(event).encode(),
                    routing_key=REISSUED,
                    content_type=CLOUDEVENTS_CONTENT_TYPE,
                    message_id=event["id"],
                )
                published += 1
                click.echo(json.dumps(event))
    except (PublishError, OSError, *publisher.connection_errors) as exc:
        click.echo(f"invoice-mailer: could not publish ({published} published): {exc}", err=True)
        sys.exit(EXIT_BROKER)
    finally:
        publisher.close()
    if published > 1:
        took = time.monotonic() - started
        click.echo(f"published {published} event(s) in {took:.1f} s", err=True)


def _reissued(invoice: str, field: str, event_id: str, source: str) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": event_id,
        "source": source,
        "type": REISSUED,
        "time": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        "datacontenttype": "application/json",
        "data": {field: invoice},
    }


@main.command()
def asyncapi() -> None:
    """Print the AsyncAPI 3.0 document of the queues and events in and out (JSON)."""
    from importlib.metadata import version

    from invoice_mailer.contracts import asyncapi as document

    click.echo(json.dumps(document(version("invoice-mailer")), indent=2, sort_keys=True))


main.add_command(dead_letters)
main.add_command(ledger)
main.add_command(status)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object: each check, and why.")
def check(as_json: bool) -> None:
    """Check settings (exit 78), the broker (2), the billing API (3), the ledger (4), and
    the dependency health the fleet shares (5: one is unhealthy, events wait for it)."""
    settings = load_or_exit(require_provider=True)
    report = _Report(as_json)
    report.line("settings", True, f"provider={settings.billing_provider}")
    broker = maybe_sanitize_url(settings.celery_broker_url)
    try:
        with Connection(settings.celery_broker_url, connect_timeout=5) as conn:
            conn.ensure_connection(max_retries=1)
    except Exception as exc:
        report.fail("broker", f"{broker}: {type(exc).__name__}: {exc}", EXIT_BROKER)
    report.line("broker", True, broker)
    ok, line = _check_api(settings)
    if not ok:
        report.fail("billing", line, EXIT_API)
    report.line("billing", True, line)
    try:
        ledger = open_ledger(settings.ledger_url)
    except LedgerError as exc:
        report.fail("ledger", str(exc), EXIT_LEDGER)
    try:
        health = [ledger.health(d, time.time()) for d in dependency_names(settings)]
    finally:
        ledger.close()
    report.line("ledger", True, "")
    sick = [h for h in health if not h.ok]
    for unhealthy in sick:  # what the fleet sees, whatever this one call saw
        name, state, lasted, why = health_row(unhealthy)
        report.unhealthy(name, state, lasted, why)
    report.done(EXIT_UNHEALTHY if sick else 0)
    if sick:
        sys.exit(EXIT_UNHEALTHY)


class _Report:
    """``check``'s lines, or with ``--json`` one object at the end:
    ``{"ok": bool, "exit": code, "checks": {name: {"ok": bool, "detail": str}},
    "unhealthy": [{"dependency", "state", "for", "why"}]}``."""

    def __init__(self, as_json: bool) -> None:
        self._json = as_json
        self._checks: dict[str, dict[str, Any]] = {}
        self._unhealthy: list[dict[str, str]] = []

    def line(self, name: str, ok: bool, detail: str) -> None:
        self._checks[name] = {"ok": ok, "detail": detail}
        if not self._json:
            click.echo(f"{name:<10} {'ok    ' if ok else 'FAILED'}  {detail}".rstrip())

    def fail(self, name: str, detail: str, code: int) -> NoReturn:
        self.line(name, False, detail)
        self.done(code)
        sys.exit(code)

    def unhealthy(self, name: str, state: str, lasted: str, why: str) -> None:
        self._unhealthy.append({"dependency": name, "state": state, "for": lasted, "why": why})
        if not self._json:
            click.echo(f"{name:<10} {state.upper():<7} for {lasted}: {why}")

    def done(self, code: int) -> None:
        """With ``--json``, the object, once every check is in (the caller exits)."""
        if self._json:
            report = {"ok": code == 0, "exit": code, "checks": self._checks}
            click.echo(json.dumps({**report, "unhealthy": self._unhealthy}))


def _check_api(settings: Settings) -> tuple[bool, str]:
    """Reach the API without side effects: HostUp email-info of an invoice that cannot exist."""
    with build_http_client(settings.http_config(max_connections=1)) as http:
        if settings.billing_provider == "hostup":
            base = str(settings.hostup_api_base_url).rstrip("/")
            assert settings.hostup_api_key is not None
            url = f"{base}/billing/invoices/inv_0invoicemailercheck/email-info"
            headers = {"Authorization": f"Bearer {settings.hostup_api_key.get_secret_value()}"}
        else:
            base = str(settings.abillify_api_base_url).rstrip("/")
            url, headers = base, {}
        try:
            response = http.get(url, headers={**headers, "Accept": "application/json"})
        except httpx.HTTPError as exc:
            return False, f"{base}: {type(exc).__name__}"
    if response.status_code in (401, 403):
        return False, f"{base}: credentials rejected ({response.status_code})"
    if response.status_code >= 500:
        return False, f"{base}: server error ({response.status_code})"
    return True, f"{base} (answered {response.status_code})"
