"""Every failure of the billing API ends well, per CONTRACT.md's retry table.

Real worker processes, real RabbitMQ (waits parked in its delay queues), the sandbox
scripted per invoice. Retry settings are shortened the same way an operator would,
through the environment.
"""

from __future__ import annotations

import itertools

import pytest

from sandbox import Fault, Sandbox
from tests.integration.conftest import StartWorker
from tests.support.broker import Bus, new_invoice, wait_until
from tests.support.worker import RAW_QUEUE, TASK_QUEUE

FAST = {
    "RETRY_SERVER_ERROR_BASE_SECONDS": "1",
    "RETRY_SERVER_ERROR_MAX_SECONDS": "4",
    # Five tries: more than Celery's default of three retries, which must not apply.
    "RETRY_SERVER_ERROR_MAX_ATTEMPTS": "5",
}


def _gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(times)]


def test_a_429_with_retry_after_waits_at_least_that_long(
    start_worker: StartWorker, bus: Bus, sandbox: Sandbox
) -> None:
    """429 Retry-After: 3 on resend: the second POST comes no sooner than 3 s later."""
    start_worker(**FAST)
    invoice = new_invoice()
    sandbox.script(invoice, "resend", [Fault(status=429, retry_after="3")])
    bus.reissue(invoice)

    [event] = bus.wait_for(1, timeout=30)

    posts = sandbox.requests(invoice=invoice, endpoint="resend")
    assert len(posts) == 2
    assert posts[1].at - posts[0].at >= 3.0
    assert event["type"] == "invoice.email_queued"
    assert len(sandbox.emails(invoice)) == 1


def test_server_errors_back_off_with_growing_gaps(
    start_worker: StartWorker, bus: Bus, sandbox: Sandbox
) -> None:
    """503, 503, 200: three POSTs, the second gap longer than the first, one event out."""
    start_worker(**FAST)
    invoice = new_invoice()
    sandbox.script(invoice, "resend", [Fault(status=503), Fault(status=503)])
    bus.reissue(invoice)

    [event] = bus.wait_for(1, timeout=30)

    times = [r.at for r in sandbox.requests(invoice=invoice, endpoint="resend")]
    assert len(times) == 3
    first, second = _gaps(times)
    assert first >= 0.5
    assert second > first
    assert event["type"] == "invoice.email_queued"


def test_server_errors_forever_give_up_after_max_attempts(
    start_worker: StartWorker, bus: Bus, sandbox: Sandbox
) -> None:
    """500 forever: exactly RETRY_SERVER_ERROR_MAX_ATTEMPTS POSTs, then failed + dead letter."""
    start_worker(**FAST)
    invoice = new_invoice()
    sandbox.script(invoice, "resend", [Fault(status=500) for _ in range(10)])
    cause = bus.reissue(invoice)

    [event] = bus.wait_for(1, timeout=60)

    assert len(sandbox.requests(invoice=invoice, endpoint="resend")) == 5
    assert sandbox.requests(invoice=invoice, endpoint="email_info") == []
    assert event["type"] == "invoice.email_failed"
    data = event["data"]
    assert data["attempts"] == 5
    assert data["reason"]["step"] == "resend"
    assert data["reason"]["status"] == 500
    assert data["reason"]["code"] == "internal_error"
    assert data["reissuedEvent"] == {"id": cause["id"], "source": cause["source"]}
    [letter] = bus.dead_letters()
    assert letter.headers["x-invoice-mailer-reason-code"] == "internal_error"
    assert letter.headers["x-invoice-mailer-attempts"] == 5
    assert letter.content_type == "application/cloudevents+json"


@pytest.mark.parametrize(
    ("status", "code"),
    [(404, "not_found"), (401, "unauthorized"), (403, "forbidden"), (400, "invalid_request")],
)
def test_client_errors_are_not_retried(
    start_worker: StartWorker, bus: Bus, sandbox: Sandbox, status: int, code: str
) -> None:
    """404, 401, 403, 400: one POST, invoice.email_failed with the API's code, a dead letter."""
    start_worker(**FAST)
    invoice = new_invoice()
    sandbox.script(invoice, "resend", [Fault(status=status)])
    bus.reissue(invoice)

    [event] = bus.wait_for(1, timeout=30)

    assert len(sandbox.requests(invoice=invoice, endpoint="resend")) == 1
    assert event["type"] == "invoice.email_failed"
    assert event["data"]["reason"] == {
        "step": "resend",
        "status": status,
        "code": code,
        "detail": event["data"]["reason"]["detail"],
    }
    assert event["data"]["attempts"] == 1
    [letter] = bus.dead_letters()
    assert letter.headers["x-invoice-mailer-reason-code"] == code


def test_email_info_retries_never_repeat_the_resend(
    start_worker: StartWorker, bus: Bus, sandbox: Sandbox
) -> None:
    """email-info 503, then 429, then 200: one POST, three GETs, one email_queued."""
    start_worker(**FAST)
    invoice = new_invoice()
    sandbox.script(invoice, "email_info", [Fault(status=503), Fault(status=429, retry_after="1")])
    bus.reissue(invoice)

    [event] = bus.wait_for(1, timeout=30)

    assert len(sandbox.requests(invoice=invoice, endpoint="resend")) == 1
    assert len(sandbox.requests(invoice=invoice, endpoint="email_info")) == 3
    assert event["type"] == "invoice.email_queued"
    assert event["data"]["emailInfo"]["currentTargets"]["to"] == "billing@example.com"


def test_email_info_giving_up_still_reports_the_queued_email(
    start_worker: StartWorker, bus: Bus, sandbox: Sandbox
) -> None:
    """email-info fails for good after the email was queued: email_queued, emailInfo null."""
    start_worker(**FAST)
    invoice = new_invoice()
    sandbox.script(invoice, "email_info", [Fault(status=500) for _ in range(10)])
    bus.reissue(invoice)

    [event] = bus.wait_for(1, timeout=60)

    assert len(sandbox.requests(invoice=invoice, endpoint="resend")) == 1
    assert len(sandbox.requests(invoice=invoice, endpoint="email_info")) == 5
    assert event["type"] == "invoice.email_queued"
    assert event["data"]["email"] == "billing@example.com"
    assert event["data"]["emailInfo"] is None
    assert event["data"]["emailInfoError"].startswith("internal_error: ")
    assert bus.dead_letters() == []


@pytest.mark.parametrize(
    "fault",
    [Fault(status=503, delay=3.0), Fault(status=None, drop=True)],  # neither queues an email
    ids=["timeout", "dropped-connection"],
)
def test_timeouts_and_dropped_connections_are_retried_like_5xx(
    start_worker: StartWorker, bus: Bus, sandbox: Sandbox, fault: Fault
) -> None:
    """No answer in time, or the connection cut: retried with backoff, then success."""
    start_worker(HTTP_TIMEOUT_SECONDS="1", **FAST)
    invoice = new_invoice()
    sandbox.script(invoice, "resend", [fault])
    bus.reissue(invoice)

    [event] = bus.wait_for(1, timeout=30)

    posts = sandbox.requests(invoice=invoice, endpoint="resend")
    assert len(posts) == 2
    assert posts[1].at - posts[0].at >= 1.0  # a backoff, not an immediate retry
    assert event["type"] == "invoice.email_queued"
    assert len(sandbox.emails(invoice)) == 1


def _park_behind_a_429(
    start_worker: StartWorker, bus: Bus, sandbox: Sandbox, wait_seconds: int
) -> tuple[str, float]:
    """Publish an event whose resend answers the resend-limit 429, then kill the worker
    once the retry is parked; return the invoice and when the first POST was made.

    After SIGKILL the broker requeues whatever the worker held unacknowledged, so empty
    task and raw queues prove the worker held nothing: the wait lives in the broker.
    """
    worker = start_worker(**FAST)
    invoice = new_invoice()
    sandbox.script(invoice, "resend", [Fault(status=429, retry_after_seconds=wait_seconds)])
    bus.reissue(invoice)
    wait_until(lambda: bus.delayed_messages() == 1, timeout=30, what="a parked retry")
    worker.kill()
    wait_until(lambda: bus.consumers(RAW_QUEUE) == 0, timeout=30, what="the broker to see it go")
    assert bus.queue_depth(TASK_QUEUE) == 0
    assert bus.queue_depth(RAW_QUEUE) == 0
    assert bus.delayed_messages() == 1
    [post] = sandbox.requests(invoice=invoice, endpoint="resend")
    return invoice, post.at


def test_a_day_long_429_is_parked_in_the_broker_not_the_worker(
    start_worker: StartWorker, bus: Bus, sandbox: Sandbox
) -> None:
    """recovery.retryAfterSeconds 86400: one POST, nothing unacked, the task in a delay queue."""
    invoice, _ = _park_behind_a_429(start_worker, bus, sandbox, 86400)
    # 86400 s and up to 5 min of jitter: the highest bit set is 2^16, so level 16 holds it.
    assert bus.queue_depth("celery_delayed_16") == 1
    assert len(sandbox.requests(invoice=invoice, endpoint="resend")) == 1
    assert bus.drain() == []


def test_a_parked_retry_survives_a_worker_restart_and_runs_when_due(
    start_worker: StartWorker, bus: Bus, sandbox: Sandbox
) -> None:
    """The same path with a 2 s wait: a new worker gets the retry when it is due."""
    invoice, first_post = _park_behind_a_429(start_worker, bus, sandbox, 2)
    start_worker(**FAST)

    [event] = bus.wait_for(1, timeout=30)

    posts = sandbox.requests(invoice=invoice, endpoint="resend")
    assert len(posts) == 2
    assert posts[1].at - first_post >= 2.0
    assert event["type"] == "invoice.email_queued"
    assert bus.delayed_messages() == 0


def test_a_worker_without_native_delayed_delivery_refuses_to_start(
    start_worker: StartWorker, bus: Bus
) -> None:
    """If RabbitMQ's delay queues cannot be set up, the worker stops instead of parking
    retries in memory (where the consumer timeout would cancel them)."""
    with bus.conn.channel() as channel:  # squat a delay queue's name with the wrong type
        channel.queue_declare("celery_delayed_27", durable=True, arguments={})
    worker = start_worker(wait=False)
    assert worker.proc is not None
    returncode = worker.proc.wait(timeout=60)
    assert returncode != 0
    assert "native delayed delivery is not set up" in worker.whole_log()


def test_429s_give_up_once_the_total_wait_would_pass_the_limit(
    start_worker: StartWorker, bus: Bus, sandbox: Sandbox
) -> None:
    """RETRY_RATE_LIMIT_MAX_WAIT_SECONDS=4, two 429s asking 2 s: the second gives up."""
    start_worker(RETRY_RATE_LIMIT_MAX_WAIT_SECONDS="4", **FAST)
    invoice = new_invoice()
    sandbox.script(invoice, "resend", [Fault(status=429, retry_after="2") for _ in range(5)])
    bus.reissue(invoice)

    [event] = bus.wait_for(1, timeout=30)

    assert len(sandbox.requests(invoice=invoice, endpoint="resend")) == 2
    assert event["type"] == "invoice.email_failed"
    assert event["data"]["reason"]["code"] == "rate_limit_exceeded"
    assert event["data"]["reason"]["status"] == 429
    assert len(bus.dead_letters()) == 1


def test_a_worker_on_another_pool_refuses_to_start(start_worker: StartWorker) -> None:
    """Attempts run in the gevent or threads pool; a solo or prefork worker stops at start."""
    worker = start_worker(wait=False, pool="solo")
    assert worker.proc is not None
    assert worker.proc.wait(timeout=60) != 0
    log = worker.whole_log()
    assert "invoice-mailer runs on the gevent or threads pool: use --pool gevent" in log
