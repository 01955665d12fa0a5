"""The Celery app, configured from a Settings object alone.

Every setting that differs from Celery's default says why.
"""

from __future__ import annotations

from typing import Any

from celery import Celery, signals
from kombu import Exchange, Queue

from invoice_mailer.pipeline import Checkpoint
from settings import Settings
from tasks._logging import set_format as set_log_format
from tasks._metrics import IN_FLIGHT, forget_process
from tasks._queues import TASK_DELIVERY_LIMIT, TASK_QUEUE
from tasks._runtime import Runtime

__all__ = ["TASK_QUEUE", "InvoiceMailerCelery", "create_app"]


class InvoiceMailerCelery(Celery):  # type: ignore[misc]
    """A Celery app that carries its settings and per-process runtime."""

    settings: Settings
    runtime: Runtime


def create_app(
    settings: Settings, *, main: str = "invoice_mailer", checkpoint: Checkpoint | None = None
) -> InvoiceMailerCelery:
    """The app; ``checkpoint`` observes the pipeline's progress (tests crash it there)."""
    if settings.sentry_dsn is not None:  # sentry-sdk is 5 MB of a worker's memory
        from tasks._sentry import init_sentry

        init_sentry(settings)
    set_log_format(settings.log_format)
    app = InvoiceMailerCelery(main, set_as_current=False)
    app.settings = settings
    app.runtime = Runtime(settings, checkpoint=checkpoint)
    memory = settings.celery_broker_url.startswith("memory://")
    task_exchange = Exchange(TASK_QUEUE, type="topic", durable=True)
    topology = settings.topology()
    app.conf.update(
        broker_url=settings.celery_broker_url,
        # Keep trying when the broker is not up yet at start (deploys, reboots).
        broker_connection_retry_on_startup=True,
        # A node that dies without closing its sockets (a host lost, a cable cut) is
        # noticed after two silent intervals, 20 s, instead of Celery's 240 s; the
        # worker then fails over to the next URL of CELERY_BROKER_URL. The heartbeat
        # is sent from the worker's event loop, which no task blocks (threads pool).
        broker_heartbeat=10,
        # Celery 5.7 declares each worker's remote-control queue exclusive to its
        # connection. A worker whose link came back reconnects before the broker has
        # given up on the old connection (two silent heartbeats), the declaration is
        # refused (RESOURCE_LOCKED) and Celery stops the worker as "unrecoverable"
        # (tests/integration/test_cluster.py, the host cut off). Not exclusive, the
        # queue still goes away 10 s after its last consumer (control_queue_expires).
        control_queue_exclusive=False,
        # Without confirms a broker-side reject (memory/disk alarm) is silent (celery#5410).
        broker_transport_options=(
            {"polling_interval": 0.05} if memory else {"confirm_publish": True}
        ),
        # Ack after the task ran, and requeue if the worker dies: a killed worker
        # must not lose the event (celery#1628). The pipeline is idempotent.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # A task that raised (a bug, not an API answer: those are handled) is
        # rejected, so the task queue dead-letters it instead of acking it away.
        task_acks_on_failure=False,
        # One message per thread: a deep prefetch hides work from other workers.
        worker_prefetch_multiplier=1,
        # A quorum queue on a topic exchange: Celery's native delayed delivery then
        # parks retries in RabbitMQ's delay queues, not in a worker's memory.
        task_queues=[
            Queue(
                TASK_QUEUE,
                task_exchange,
                routing_key=TASK_QUEUE,
                durable=True,
                queue_arguments={
                    "x-queue-type": "quorum",
                    # A task that kills its worker every time is dead-lettered after
                    # this many deliveries instead of looping; so is a retry Celery
                    # could not publish (it rejects without requeue).
                    "x-delivery-limit": TASK_DELIVERY_LIMIT,
                    "x-dead-letter-exchange": topology.dead_letter_exchange,
                    "x-dead-letter-routing-key": topology.dead_letter_queue,
                },
            )
        ],
        task_default_queue=TASK_QUEUE,
        task_default_exchange=TASK_QUEUE,
        task_default_exchange_type="topic",
        task_default_routing_key=TASK_QUEUE,
        task_create_missing_queues=False,  # a typo in a queue name is a bug, not a new queue
        # The work is HTTP and broker round-trips: the Procfile runs ``--pool gevent``,
        # whose greenlets share one HTTP pool per process and fork nothing, like threads,
        # without threads' contention for the interpreter lock (two thirds of the CPU
        # per event: python -m bench, bench/RESULTS.md). gevent must be named on the
        # command line, where Celery patches before anything is imported; here it would
        # run unpatched (Celery warns, the consumer refuses). Without ``--pool`` a worker
        # runs threads: correct, and slower.
        worker_pool="threads",
        # Tasks in flight per process: 48 x 2 API calls of 50 ms is 480 events/s, more
        # than one process's CPU allows (python -m bench, README).
        worker_concurrency=48,
        # Outcomes are events on the bus, not results: no result backend to run.
        task_ignore_result=True,
        result_backend=None,
        # Celery keeps a backend per thread unless told it is thread-safe; under gevent
        # that is one per greenlet, rebuilt for every task (3% of the CPU, py-spy).
        # The disabled backend has no state to share.
        result_backend_thread_safe=True,
        task_serializer="json",
        accept_content=["json"],
        # Flower shows tasks only when workers send events (first attempts included:
        # they are task executions too). They are best effort: this consumer
        # publishes them without confirms (tasks/_workarounds.py).
        worker_send_task_events=True,
        task_send_sent_event=True,
        worker_consumer="tasks._workarounds:Consumer",
        # SIGQUIT (or REMAP_SIGTERM=SIGQUIT) first waits this long for running tasks,
        # under the 30 s most platforms allow between SIGTERM and SIGKILL. A plain
        # SIGTERM (warm shutdown) waits for them anyway; a task is bounded by its
        # HTTP timeouts, so that ends well inside the same grace.
        worker_soft_shutdown_timeout=20,
        # Our logging configuration stays ours.
        worker_hijack_root_logger=False,
        # A task still running when the broker connection drops goes on: the threads
        # pool could never stop one, and gevent's stops it by killing its greenlet
        # wherever it is, between an API's 2xx and the ledger write that records it
        # included, or holding a ledger connection (seen: every PostgreSQL connection
        # of a worker lost that way, and the worker stalled). Its redelivered copy
        # waits for its lease; a takeover never POSTs a resend the ledger holds.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        enable_utc=True,
    )
    # The raw-event consumer, by name: consumers depend on tasks, not the reverse.
    app.steps["consumer"].add("consumers:ReissuedEventConsumer")
    app.steps["consumer"].add("tasks._startup:DelayedDeliveryCheck")
    app.steps["worker"].add("tasks._startup:ProviderCredentials")
    app.steps["worker"].add("tasks._startup:MetricsServer")
    from tasks import pipeline

    pipeline.register(app)
    return app


@signals.task_prerun.connect
def _task_started(**_: Any) -> None:
    IN_FLIGHT.labels("task").inc()


@signals.task_postrun.connect
def _task_ended(**_: Any) -> None:
    IN_FLIGHT.labels("task").dec()


@signals.worker_shutdown.connect
def _close_runtime(sender: Any = None, **_: Any) -> None:
    app = getattr(sender, "app", None)
    runtime = getattr(app, "runtime", None)
    if isinstance(runtime, Runtime):
        runtime.close()
    forget_process()
