"""The least a Python consumer can do: kombu + httpx + a thread pool, nothing else.

No Celery, no ledger, no retries, no validation beyond reading the id: consume
``invoice.reissued``, POST resend-email, GET email-info, publish
``invoice.email_queued`` with publisher confirms, ack. What invoice-mailer costs on
top of this is what the benchmark reports.

    python -m bench.baseline AMQP_URL HOSTUP_BASE_URL API_KEY --threads 32
"""

from __future__ import annotations

import argparse
import contextlib
import json
import queue
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
from kombu import Connection, Consumer, Exchange, Queue

QUEUE = "baseline.reissued"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("broker")
    parser.add_argument("api")
    parser.add_argument("key")
    parser.add_argument("--threads", type=int, default=32)
    parser.add_argument(
        "--queue-type",
        choices=["classic", "quorum"],
        default="classic",
        help="its source queue's type (invoice-mailer's raw-event queue is a quorum queue)",
    )
    args = parser.parse_args()

    exchange = Exchange("billing.events", "topic", durable=True)
    source = Queue(
        QUEUE,
        exchange,
        routing_key="invoice.reissued",
        durable=True,
        queue_arguments={"x-queue-type": args.queue_type},
    )
    http = httpx.Client(
        timeout=10,
        limits=httpx.Limits(max_connections=args.threads, max_keepalive_connections=args.threads),
        headers={"Authorization": f"Bearer {args.key}", "Accept": "application/json"},
    )
    local = threading.local()
    done: queue.SimpleQueue[Any] = queue.SimpleQueue()  # messages to ack, on the main thread

    def producer() -> Any:
        if not hasattr(local, "producer"):
            conn = Connection(args.broker, transport_options={"confirm_publish": True})
            local.producer = conn.Producer()
        return local.producer

    def work(message: Any) -> None:
        event = json.loads(message.body)
        invoice = event["data"]["invoiceId"]
        base = f"{args.api}/billing/invoices/{invoice}"
        sent = http.post(f"{base}/actions/resend-email").json()
        info = http.get(f"{base}/email-info").json()
        out = {
            "specversion": "1.0",
            "id": event["id"],
            "source": "/baseline",
            "type": "invoice.email_queued",
            "subject": invoice,
            "data": {
                "invoiceId": invoice,
                "email": sent.get("email"),
                "queuedAt": sent.get("queuedAt"),
                "emailInfo": info,
                "reissuedEvent": {"id": event["id"], "source": event["source"]},
            },
        }
        producer().publish(
            json.dumps(out).encode(),
            exchange=exchange,
            routing_key="invoice.email_queued",
            delivery_mode=2,
            content_type="application/cloudevents+json",
            content_encoding="utf-8",
        )
        done.put(message)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with Connection(args.broker) as conn, ThreadPoolExecutor(args.threads) as pool:
        channel = conn.channel()
        consumer = Consumer(
            channel,
            queues=[source],
            on_message=lambda m: pool.submit(work, m),
            prefetch_count=args.threads * 2,
        )
        consumer.consume()
        print("baseline ready", flush=True)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                conn.drain_events(timeout=0.01)
            while not done.empty():
                done.get().ack()


if __name__ == "__main__":
    main()
