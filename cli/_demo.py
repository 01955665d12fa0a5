"""``invoice-mailer demo``: the whole service in one process, nothing to install.

An in-memory kombu broker stands in for RabbitMQ, the project's sandbox for the
billing API, and a real Celery worker (threads pool, in a thread) runs the real
consumer bootstep and pipeline task. A handful of events show the happy path,
retries that tell 429 from 5xx, a rejection and a malformed event.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import click
from celery.contrib.testing.worker import start_worker
from kombu import Connection, Queue, binding

from cli._table import print_table
from invoice_mailer.events import CLOUDEVENTS_CONTENT_TYPE, EMAIL_FAILED, EMAIL_QUEUED, REISSUED
from sandbox import DEFAULT_API_KEY, Fault, Sandbox
from settings import load_or_exit
from tasks import create_app

TIMEOUT_SECONDS = 60
MEMORY_BROKER = "memory://localhost/"


@dataclass(frozen=True)
class _Case:
    event_id: str
    invoice: str
    story: str
    faults: tuple[tuple[str, tuple[Fault, ...]], ...] = ()
    missing: bool = False


CASES = (
    _Case("evt_demo_1", "inv_demo1", "happy path"),
    _Case(
        "evt_demo_2",
        "inv_demo2",
        "resend answers 503, then 200",
        (("resend", (Fault(status=503),)),),
    ),
    _Case(
        "evt_demo_3",
        "inv_demo3",
        "resend answers 429 Retry-After: 2, then 200",
        (("resend", (Fault(status=429, retry_after="2"),)),),
    ),
    _Case("evt_demo_4", "inv_demo4", "invoice unknown to the API (404)", missing=True),
    _Case(
        "evt_demo_5",
        "inv_demo5",
        "email-info keeps failing (500)",
        (("email_info", tuple(Fault(status=500) for _ in range(5))),),
    ),
    _Case("evt_demo_6", "../../admin", "malformed invoice id"),
)


def run_demo(*, verbose: bool) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    with Sandbox() as sandbox, tempfile.TemporaryDirectory() as ledger_dir:
        settings = load_or_exit(
            require_provider=True,
            celery_broker_url=MEMORY_BROKER,
            billing_provider="hostup",
            hostup_api_base_url=sandbox.hostup_url,
            hostup_api_key=DEFAULT_API_KEY,
            retry_server_error_max_attempts=3,
            retry_server_error_base_seconds=1,
            retry_server_error_max_seconds=2,
            ledger_url=f"sqlite:///{ledger_dir}/ledger.sqlite3",
            metrics_port=0,
            sentry_dsn=None,  # the demo reports nothing anywhere
        )
        for case in CASES:
            for endpoint, faults in case.faults:
                sandbox.script(case.invoice, endpoint, faults)
            if case.missing:
                sandbox.mark_missing(case.invoice)
        app = create_app(settings)
        click.echo("invoice-mailer demo: in-memory broker, billing sandbox at " + sandbox.url)
        with (
            start_worker(
                app,
                pool="threads",
                concurrency=4,
                perform_ping_check=False,
                loglevel="WARNING",
                shutdown_timeout=30,
            ),
            Connection(MEMORY_BROKER) as conn,
        ):
            outgoing = _collect(conn, settings.topology().events())
            started = time.monotonic()
            with conn.Producer() as producer:
                for case in CASES:
                    producer.publish(
                        json.dumps(_event(case)).encode(),
                        exchange=settings.events_exchange,
                        routing_key=REISSUED,
                        content_type=CLOUDEVENTS_CONTENT_TYPE,
                        content_encoding="utf-8",
                    )
            results = _wait_for_outcomes(conn, outgoing, started)
        app.runtime.close()
        _print_table(results, sandbox)
        if verbose:
            click.echo("\nOutgoing events:")
            for event in results.values():
                click.echo(json.dumps(event, indent=2))
    missing = [c.event_id for c in CASES if c.event_id not in results]
    if missing:
        click.echo(f"\nno outcome within {TIMEOUT_SECONDS}s for: {', '.join(missing)}", err=True)
        return 1
    return 0


def _event(case: _Case) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": case.event_id,
        "source": "/billing/demo",
        "type": REISSUED,
        "time": "2026-11-21T10:00:00Z",
        "datacontenttype": "application/json",
        "data": {"invoiceId": case.invoice},
    }


def _collect(conn: Connection, exchange: Any) -> Queue:
    capture = Queue(
        "demo.outgoing",
        bindings=[binding(exchange, routing_key=key) for key in (EMAIL_QUEUED, EMAIL_FAILED)],
        auto_delete=True,
    )
    capture.bind(conn.default_channel).declare()
    return capture


def _wait_for_outcomes(conn: Connection, capture: Queue, started: float) -> dict[str, Any]:
    results: dict[str, Any] = {}
    inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()

    def on_message(message: Any) -> None:
        inbox.put(message.body)
        message.ack()

    with conn.Consumer(capture, on_message=on_message):
        while len(results) < len(CASES) and time.monotonic() - started < TIMEOUT_SECONDS:
            with contextlib.suppress(TimeoutError):
                conn.drain_events(timeout=0.2)
            while not inbox.empty():
                event = json.loads(inbox.get())
                cause = event["data"]["reissuedEvent"]["id"]
                results[cause] = event
    return results


def _print_table(results: dict[str, Any], sandbox: Sandbox) -> None:
    rows = []
    for case in CASES:
        event = results.get(case.event_id)
        posts = len(sandbox.requests(invoice=case.invoice, endpoint="resend"))
        gets = len(sandbox.requests(invoice=case.invoice, endpoint="email_info"))
        if event is None:
            outcome, detail = "(none)", ""
        elif event["type"] == "invoice.email_queued":
            data = event["data"]
            outcome = "email_queued"
            detail = f"to {data['email']}" + (
                f"; emailInfo null ({data['emailInfoError'].split(':')[0]})"
                if data.get("emailInfoError")
                else f"; currentTargets.to {data['emailInfo']['currentTargets']['to']}"
            )
        else:
            reason = event["data"]["reason"]
            outcome = "email_failed"
            detail = f"{reason['step']}: {reason['code']} (dead-lettered)"
        rows.append(
            (case.event_id, case.invoice, case.story, outcome, str(posts), str(gets), detail)
        )
    click.echo("")
    print_table(("event", "invoice", "scenario", "outcome", "POSTs", "GETs", "detail"), rows)
