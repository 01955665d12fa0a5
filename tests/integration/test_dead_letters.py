"""`invoice-mailer dead-letters list | replay | purge` against the real broker."""

from __future__ import annotations

import subprocess
import sys
import uuid

from sandbox import Fault, Sandbox
from tests.integration.conftest import MakeEnv, StartWorker
from tests.support.broker import Bus

DLQ = "invoice-mailer.dead-letter"


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
    assert "--id, --reason or --all" in result.stderr
