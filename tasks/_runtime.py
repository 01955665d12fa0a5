"""Per-process resources: one HTTP client, one publisher, one pipeline.

Built as the worker starts (``Runtime.warm``, before its first raw event), or on
first use in the process that uses them (after any fork), closed at worker
shutdown. Nothing here exists at import time.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time

import httpx

from broker import EventPublisher
from invoice_mailer.billing import build_http_client, build_provider
from invoice_mailer.dependencies import Dependencies
from invoice_mailer.job import Job
from invoice_mailer.ledger import Ledger, LedgerError, open_ledger
from invoice_mailer.observe import LoggingObserver, Observer, Observers
from invoice_mailer.pipeline import (
    LEDGER_REMINDER_SECONDS,
    Checkpoint,
    Pipeline,
    RetryLater,
    wait_for_ledger,
)
from settings import Settings
from tasks._metrics import MetricsObserver, record_health

__all__ = ["Runtime"]

log = logging.getLogger("invoice_mailer.pipeline")

# After the ledger failed to open, threads asking within this long get that failure
# again at once instead of each waiting on the database in turn.
LEDGER_REOPEN_SECONDS = 2.0


class Runtime:
    """Per-process, thread-safe holder of the worker's resources, built once per process."""

    def __init__(
        self,
        settings: Settings,
        *,
        max_connections: int = 100,
        checkpoint: Checkpoint | None = None,
    ) -> None:
        self.settings = settings
        self.checkpoint = checkpoint
        self.ready = False
        """True while the raw-event consumer is consuming (readiness)."""
        observers: list[Observer] = [LoggingObserver(), MetricsObserver()]
        if settings.sentry_dsn is not None:
            from tasks._sentry import SentryObserver

            observers.append(SentryObserver())
        self.observer = Observers(observers)
        self._max_connections = max_connections
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._http: httpx.Client | None = None
        self._publisher: EventPublisher | None = None
        self._ledger: Ledger | None = None
        self._pipeline: Pipeline | None = None
        self._ledger_failed: tuple[float, LedgerError] | None = None
        self._ledger_logged_at = -LEDGER_REMINDER_SECONDS
        self._ledger_down_since = 0.0
        self._rng = random.Random()
        self.paused_because: list[str] = []
        """Unhealthy dependencies that hold intake, refreshed by ``watch_health``: the
        consumer takes no raw event while any (an outage whose probe is due lets them
        in, so that one can be the probe)."""
        self.unhealthy_because: list[str] = []
        """Every unhealthy dependency, refreshed by ``watch_health``: readiness says so."""
        self._watcher: threading.Thread | None = None
        self._stop_watch = threading.Event()

    @property
    def publisher(self) -> EventPublisher:
        self._ensure()
        assert self._publisher is not None
        return self._publisher

    @property
    def ledger(self) -> Ledger:
        self._ensure()
        assert self._ledger is not None
        return self._ledger

    @property
    def pipeline(self) -> Pipeline:
        self._ensure()
        assert self._pipeline is not None
        return self._pipeline

    def wait_for_ledger(self, job: Job, exc: LedgerError) -> RetryLater:
        """The job's retry while the ledger cannot even be opened (logged once a minute)."""
        retry = wait_for_ledger(job, self.settings.retry_policy(), self._rng)
        now = time.monotonic()
        if now - self._ledger_logged_at >= LEDGER_REMINDER_SECONDS:
            self._ledger_logged_at = now
            log.error("ledger unavailable: %s; events wait in the broker", exc)
        return retry

    def unhealthy(self, *, for_intake: bool = False) -> list[str]:
        """What keeps this process from making progress (empty when nothing does);
        ``for_intake``: what keeps it from taking raw events (``Pipeline.unhealthy``)."""
        if self._ledger_failed is not None:
            return [f"ledger: {self._ledger_failed[1]}"]
        if self._pipeline is None:
            return []
        return self._pipeline.unhealthy(for_intake=for_intake)

    def warm(self, wait: float = 2.0) -> None:
        """Build the runtime now, as the worker starts, so that no event waits for it:
        the ledger opened and migrated, the HTTP client and the publisher's connection
        made. The start waits for it ``wait`` seconds at most: a PostgreSQL that does
        not answer holds a connect for 10 s, and the consumer's connection must not go
        unserved that long. A ledger that cannot be opened is left to the health watch,
        which pauses intake and retries; anything else to the first event."""
        builder = threading.Thread(target=self._warm, name="runtime-warm", daemon=True)
        builder.start()
        builder.join(wait)

    def _warm(self) -> None:
        try:
            self._ensure()
            assert self._publisher is not None
            self._publisher.warm()
        except LedgerError:
            pass
        except Exception as exc:
            # The class only: a driver's message may quote the URL it failed to reach.
            log.warning(
                "could not prepare at start (%s); the first event tries again", type(exc).__name__
            )

    def watch_health(self, every: float = 1.0, *, first_turn_wait: float = 0.0) -> None:
        """Keep ``paused_because`` and ``unhealthy_because`` current from a thread of
        its own: the consumer reads them on the event loop, which must never wait on
        the ledger's database. It also retries opening a ledger that could not be
        opened, since with intake paused no event may come to do it.

        A watch started now takes its first turn at once, and the call waits for it
        up to ``first_turn_wait`` seconds: a worker that starts while the fleet waits
        for a dependency learns it before it takes a raw event."""
        turned = threading.Event()

        def loop() -> None:
            while True:
                try:
                    if self._ledger_failed is not None or self._pipeline is not None:
                        self._ensure()
                    self._settle_blocked()
                    self.unhealthy_because = self.unhealthy()
                    self.paused_because = self.unhealthy(for_intake=True)
                    if self._pipeline is not None:
                        # Paused for the gauge through a probe's window too: it lasts a
                        # second or two, and would make the outage's alert flap.
                        record_health(
                            self._pipeline.dependency_states(),
                            bool(self.unhealthy_because),
                            self._pipeline.budget(),
                        )
                except LedgerError as exc:
                    self.paused_because = self.unhealthy_because = [f"ledger: {exc}"]
                except Exception:
                    log.exception("health watch failed; trying again")
                turned.set()
                if self._stop_watch.wait(every):
                    return

        if self._watcher is None or not self._watcher.is_alive():
            self._stop_watch.clear()
            self._watcher = threading.Thread(target=loop, name="health-watch", daemon=True)
            self._watcher.start()
            turned.wait(first_turn_wait)

    def _settle_blocked(self) -> None:
        """Publishes a blocked broker held: those it took since are recorded as out."""
        publisher, pipeline = self._publisher, self._pipeline
        if publisher is not None and pipeline is not None and publisher.blocked:
            pipeline.confirmed_late(publisher.settle_blocked())

    def close(self) -> None:
        self._stop_watch.set()
        with self._lock:
            if self._http is not None:
                self._http.close()
            if self._publisher is not None:
                self._publisher.close()
            if self._ledger is not None:
                self._ledger.close()
            self._http = self._publisher = self._ledger = self._pipeline = None
            self._pid = None

    def _ensure(self) -> None:
        if self._pid == os.getpid():
            return
        with self._lock:
            if self._pid == os.getpid():
                return
            # After a fork the parent's sockets are not ours: build anew, never reuse.
            # The ledger first: when it cannot be opened nothing else is built, and
            # the next caller tries again (after LEDGER_REOPEN_SECONDS).
            if self._ledger_failed is not None:
                failed_at, error = self._ledger_failed
                if time.monotonic() - failed_at < LEDGER_REOPEN_SECONDS:
                    raise error
            try:
                self._ledger = open_ledger(self.settings.ledger_url)
            except LedgerError as exc:
                if self._ledger_failed is None:
                    self._ledger_down_since = time.monotonic()
                self._ledger_failed = (time.monotonic(), exc)
                raise
            if self._ledger_failed is not None:
                down = time.monotonic() - self._ledger_down_since
                log.warning("ledger available again after %.0f s", down)
            self._ledger_failed = None
            self._http = build_http_client(
                self.settings.http_config(max_connections=self._max_connections)
            )
            self._publisher = EventPublisher.connect(
                self.settings.celery_broker_url, self.settings.topology()
            )
            self._pipeline = Pipeline(
                provider=build_provider(
                    self.settings.billing_provider,
                    http=self._http,
                    **self.settings.provider_options(),
                ),
                publisher=self._publisher,
                ledger=self._ledger,
                policy=self.settings.retry_policy(),
                lease_seconds=self.settings.lease_seconds(),
                resend_settles_seconds=self.settings.resend_settles_seconds(),
                checkpoint=self.checkpoint,
                observer=self.observer,
                dependencies=Dependencies(self._ledger),
                outage_max_wait_seconds=self.settings.outage_max_wait_seconds(),
            )
            self._pid = os.getpid()
