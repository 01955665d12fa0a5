"""Start-up check: retries must wait in RabbitMQ, or the worker must not start.

Celery's DelayedDelivery step logs and carries on when it cannot declare its
delay queues; a worker in that state would hold every retry as an in-memory ETA,
which RabbitMQ's consumer timeout cancels after 30 minutes. Better not to run.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import bootsteps

from broker import DelayedDeliveryMissing, check_delayed_delivery
from settings import SettingsError, exit_config

__all__ = ["DelayedDeliveryCheck", "DelayedDeliveryMissing", "ProviderCredentials"]

log = logging.getLogger("invoice_mailer.startup")


class ProviderCredentials(bootsteps.Step):  # type: ignore[misc]
    """A worker calls the billing API: without the provider's credentials it must not
    start (exit 78, one line). Flower and ``celery inspect`` build the same app and do
    not need them, so the check is the worker's, not the app's."""

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        try:
            worker.app.settings.require_provider()
        except SettingsError as exc:
            exit_config(exc)


class DelayedDeliveryCheck(bootsteps.StartStopStep):  # type: ignore[misc]
    requires = ("tasks._workarounds:LiveNodeDelayedDelivery",)

    def start(self, c: Any) -> None:
        if c.connection.transport.driver_type != "amqp":
            log.warning("broker is not RabbitMQ: retries wait in worker memory (demo only)")
            return
        check_delayed_delivery(c.connection)
        log.info("native delayed delivery in place: retries wait in RabbitMQ")


class MetricsServer(bootsteps.StartStopStep):  # type: ignore[misc]
    """Serves /metrics, /livez and /readyz on METRICS_HOST:METRICS_PORT (port 0: off).

    With several workers on one host only the first binds the port; give them a
    shared PROMETHEUS_MULTIPROC_DIR and it serves all of their counters.
    """

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self._server: Any = None

    def start(self, worker: Any) -> None:
        from tasks._app import TASK_QUEUE
        from tasks._metrics import QueueDepthCollector, registry_for_export, serve_metrics

        app = worker.app
        port = app.settings.metrics_port
        if not port:
            return
        registry = registry_for_export(
            [
                QueueDepthCollector(
                    app.settings.celery_broker_url, app.settings.topology(), TASK_QUEUE
                )
            ]
        )
        try:
            self._server = serve_metrics(
                port,
                host=app.settings.metrics_host,
                registry=registry,
                ready=lambda: app.runtime.ready and not app.runtime.unhealthy_because,
            )
        except OSError as exc:
            log.info("metrics not served by this process (port %s: %s)", port, exc.strerror)
            return
        log.info("metrics, liveness and readiness on port %s", port)

    def stop(self, worker: Any) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
