"""A real ``celery -A tasks worker`` process, configured from the environment only."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from celery import Celery
from kombu import Connection

from sandbox import DEFAULT_API_KEY

RAW_QUEUE, TASK_QUEUE = "invoice-mailer.reissued", "invoice-mailer.tasks"
_SCRUBBED_PREFIXES = ("CELERY_", "HOSTUP_", "ABILLIFY_", "BILLING_", "RETRY_", "SENTRY_", "LEDGER_")


def worker_env(
    broker_url: str, sandbox_url: str, ledger_url: str, **overrides: Any
) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_SCRUBBED_PREFIXES)}
    env.update(
        CELERY_BROKER_URL=broker_url,
        LEDGER_URL=ledger_url,
        HOSTUP_API_BASE_URL=sandbox_url + "/api/v2",
        HOSTUP_API_KEY=DEFAULT_API_KEY,
        PYTHONUNBUFFERED="1",
    )
    env.update({k: str(v) for k, v in overrides.items()})
    return env


def _raw_consumers(conn: Connection) -> int:
    with conn.channel() as channel:
        try:
            return int(channel.queue_declare(RAW_QUEUE, passive=True).consumer_count)
        except conn.channel_errors:
            return 0


class WorkerProcess:
    """Start, wait for, stop and kill a worker; its output goes to a log file."""

    def __init__(
        self,
        env: dict[str, str],
        log_dir: Path,
        *,
        concurrency: int = 8,
        name: str | None = None,
        app: str = "tasks",
        pool: str = "gevent",
        prefix: list[str] | None = None,
        host: str = "test",
    ) -> None:
        """``prefix`` runs the worker inside something (``ip netns exec <ns>``: a host);
        ``host`` is its node name's domain, as Celery's ``%h`` would be on that host."""
        self.env = env
        self.prefix = prefix or []
        self.app = app
        self.pool = pool
        self.name = f"{name or 'w' + uuid.uuid4().hex[:6]}@{host}"
        self.log_path = log_dir / f"{self.name.split('@')[0]}.log"
        self.concurrency = concurrency
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *, wait: bool = True, raw_consumers: int = 1) -> WorkerProcess:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [
                *self.prefix,
                sys.executable,
                "-m",
                "celery",
                "-A",
                self.app,
                "worker",
                "--pool",
                self.pool,
                "--concurrency",
                str(self.concurrency),
                "--hostname",
                self.name,
                "--without-gossip",
                "--without-mingle",
                "--loglevel",
                "INFO",
            ],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        if wait:
            self.wait_ready(raw_consumers=raw_consumers)
        return self

    def wait_ready(self, timeout: float = 60.0, *, raw_consumers: int = 1) -> None:
        """Ready: it answers a ping, and the raw-event queue has ``raw_consumers`` consumers.

        The ping alone is not enough: Celery may start remote control before the
        consumer bootstep that declares and consumes the raw-event queue.
        """
        url = self.env["CELERY_BROKER_URL"]
        control = Celery(broker=url, set_as_current=False)
        deadline = time.monotonic() + timeout
        try:
            with Connection(url) as conn:
                while time.monotonic() < deadline:
                    assert self.proc is not None
                    if self.proc.poll() is not None:
                        raise AssertionError(
                            f"worker exited with {self.proc.returncode}:\n{self.log()}"
                        )
                    pinged = control.control.ping(destination=[self.name], timeout=0.5)
                    if pinged and _raw_consumers(conn) >= raw_consumers:
                        return
            raise AssertionError(f"worker not ready within {timeout}s:\n{self.log()}")
        finally:
            control.close()

    def idle(self) -> bool:
        """No task running or reserved, asked of the worker itself over the broker."""
        control = Celery(broker=self.env["CELERY_BROKER_URL"], set_as_current=False)
        try:
            inspect = control.control.inspect(destination=[self.name], timeout=1)
            active, reserved = inspect.active(), inspect.reserved()
        finally:
            control.close()
        if not active or not reserved:  # no reply: cannot tell, so not idle
            return False
        return not any(active.values()) and not any(reserved.values())

    def stop(self, timeout: float = 60.0) -> int:
        """Warm shutdown (SIGTERM): running tasks finish first."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"worker did not stop within {timeout}s:\n{self.log()}") from None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def log(self) -> str:
        """The log's last 6,000 characters: for failure messages."""
        return self.log_path.read_text(errors="replace")[-6000:]

    def whole_log(self) -> str:
        """The whole log: for counting its lines, or finding what was said at the start."""
        return self.log_path.read_text(errors="replace")
