"""`invoice-mailer dead-letters list | replay | purge` against the real broker."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid

from kombu import Producer

from invoice_mailer.events import CLOUDEVENTS_CONTENT_TYPE as CE
from invoice_mailer.events import REISSUED
from invoice_mailer.publishing import DeadLetter
from sandbox import Fault, Sandbox
from tests.integration.conftest import MakeEnv, StartWorker
from tests.support.broker import Bus

DLQ = "invoice-mailer.dead-letter"
REISSUED_QUEUE = "invoice-mailer.reissued"


def _cli(env: dict[str, str], *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from cli import main; main()", "dead-letters", *args],
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_dead_letters_are_listed_replayed_and_purged(
    start_worker: StartWorker, bus: Bus, env: MakeEnv, sandbox: Sandbox
) -> None:
    """A replayed dead letter is processed and leaves the queue; the others stay until purged."""
    start_worker()
    cli_env = env()
    missing, bad = f"inv_{uuid.uuid4().hex[:10]}", f"inv_{uuid.uuid4().hex[:10]}"
    sandbox.script(missing, "resend", [Fault(status=404)])  # once: it exists on replay
    sandbox.script(bad, "resend", [Fault(status=400)])
    cause = bus.reissue(missing, event_id="evt_missing")
    bus.reissue(bad, event_id="evt_bad")
    bus.wait_for(2, where=lambda e: e["type"] == "invoice.email_failed")
    assert bus.queue_depth(DLQ) == 2

    listed = _cli(cli_env, "list")
    assert listed.returncode == 0, listed.stderr
    rows = {line.split()[0]: line for line in listed.stdout.splitlines()[2:] if line}
    assert "not_found" in rows["evt_missing"]
    assert missing in rows["evt_missing"]
    assert "invalid_request" in rows["evt_bad"]
    assert "2 dead letter(s)" in listed.stdout
    assert bus.queue_depth(DLQ) == 2  # listing takes nothing away

    dry = _cli(cli_env, "replay", "--reason", "not_found", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "would replay 1 dead letter(s)" in dry.stdout
    assert bus.queue_depth(DLQ) == 2

    replayed = _cli(cli_env, "replay", "--reason", "not_found")
    assert replayed.returncode == 0, replayed.stderr
    assert "replayed 1 dead letter(s)" in replayed.stdout
    [queued] = bus.wait_for(1, where=lambda e: e["type"] == "invoice.email_queued")
    assert queued["data"]["invoiceId"] == missing
    assert queued["data"]["reissuedEvent"] == {"id": cause["id"], "source": cause["source"]}
    assert bus.queue_depth(DLQ) == 1

    refused = _cli(cli_env, "purge", stdin="n\n")
    assert refused.returncode == 1
    assert bus.queue_depth(DLQ) == 1
    purged = _cli(cli_env, "purge", "--yes")
    assert purged.returncode == 0, purged.stderr
    assert "purged 1 dead letter(s)" in purged.stdout
    assert bus.queue_depth(DLQ) == 0


def test_replay_needs_a_selection(env: MakeEnv) -> None:
    """Replaying everything by accident is not possible: a selector is required."""
    result = _cli(env(), "replay")
    assert result.returncode == 2
    assert "--id, --reason, --invoice, an age or --all" in result.stderr


def _letter(bus: Bus, event_id: str, invoice: str, code: str) -> None:
    """A dead letter as the service writes it, straight onto the queue."""
    body = json.dumps(
        {"specversion": "1.0", "id": event_id, "source": "/billing", "type": REISSUED,
         "data": {"invoiceId": invoice}}
    ).encode()  # fmt: skip
    letter = DeadLetter(body=body, content_type=CE, code=code, detail=f"{code} here", attempts=1)
    with bus.conn.channel() as channel:
        Producer(channel).publish(
            body, exchange="", routing_key=DLQ, content_type=CE, content_encoding="utf-8",
            headers=letter.headers(),
        )  # fmt: skip


def test_dead_letters_are_filtered_grouped_and_replayed_once_per_event(
    bus: Bus, env: MakeEnv
) -> None:
    """Filters, --limit, --json and the grouped view; a replay by filter publishes each
    event once although it was dead-lettered twice; a purge by filter takes only those."""
    cli_env = env()
    assert _cli(cli_env, "list").returncode == 0  # declares the queues
    _letter(bus, "evt_a", "inv_a", "not_found")
    _letter(bus, "evt_a", "inv_a", "not_found")  # the same event, dead-lettered again
    _letter(bus, "evt_b", "inv_b", "invalid_request")

    listed = _cli(cli_env, "list", "--json", "--reason", "not_found")
    assert listed.returncode == 0, listed.stderr
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [(r["event_id"], r["invoice"], r["code"]) for r in rows] == [
        ("evt_a", "inv_a", "not_found")
    ] * 2
    assert all(0 <= r["age_seconds"] < 120 for r in rows)
    assert "1 dead letter(s)" in _cli(cli_env, "list", "--limit", "1").stdout
    assert "0 dead letter(s)" in _cli(cli_env, "list", "--older-than", "1h").stdout

    summary = _cli(cli_env, "summary", "--json")
    assert summary.returncode == 0, summary.stderr
    groups = [(g["code"], g["count"]) for g in json.loads(summary.stdout)]
    assert groups == [("not_found", 2), ("invalid_request", 1)]
    assert "3 dead letter(s) in 2 group(s)" in _cli(cli_env, "summary").stdout

    replayed = _cli(cli_env, "replay", "--invoice", "inv_a")
    assert replayed.returncode == 0, replayed.stderr
    assert "replayed 1 dead letter(s)" in replayed.stdout
    assert bus.queue_depth(REISSUED_QUEUE) == 1  # evt_a once, no worker to take it
    assert bus.queue_depth(DLQ) == 1  # both of evt_a's are gone

    assert "no dead letters" in _cli(cli_env, "purge", "--reason", "not_found").stdout
    purged = _cli(cli_env, "purge", "--invoice", "inv_b", "--yes")
    assert "purged 1 dead letter(s)" in purged.stdout
    assert bus.queue_depth(DLQ) == 0
