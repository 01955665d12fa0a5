"""The billing APIs of ../shared/api/ as a local process: HostUp and Abillify, with faults.

HostUp is served under /api/v2 (Bearer key), Abillify under /abillify/api (Basic auth).
Every switch below can also be changed while it runs: POST /_sandbox/configure with a
JSON object of the same names (latency, failure_rates, clock_offset, email_info_lag,
send_after, trickle, rate_limit); POST /_sandbox/script scripts faults per invoice, GET
/_sandbox/requests lists what was received, POST /_sandbox/reset forgets it all.
"""

from __future__ import annotations

import argparse
import signal
import threading

from sandbox import DEFAULT_ABILLIFY_PASSWORD, DEFAULT_ABILLIFY_USER, DEFAULT_API_KEY, Sandbox


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sandbox",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (%(default)s)")
    p.add_argument("--port", type=int, default=8765, help="port to listen on (%(default)s)")
    p.add_argument(
        "--api-key",
        default=DEFAULT_API_KEY,
        help="HostUp's Bearer key: HOSTUP_API_KEY (%(default)s)",
    )
    p.add_argument(
        "--abillify-user",
        default=DEFAULT_ABILLIFY_USER,
        help="Abillify's Basic user: ABILLIFY_USERNAME (%(default)s)",
    )
    p.add_argument(
        "--abillify-password",
        default=DEFAULT_ABILLIFY_PASSWORD,
        help="Abillify's Basic password: ABILLIFY_PASSWORD (%(default)s)",
    )
    p.add_argument("--latency", type=float, default=0.0, help="seconds added to each answer")
    p.add_argument("--rate-5xx", type=float, default=0.0, help="share of requests -> 500")
    p.add_argument("--rate-429", type=float, default=0.0, help="share of requests -> 429")
    p.add_argument(
        "--clock-offset",
        type=float,
        default=0.0,
        help="seconds the API's clock is ahead of ours (negative: behind); Date headers, "
        "createdAt, queuedAt and problem timestamps all read it",
    )
    p.add_argument(
        "--email-info-lag",
        type=float,
        default=0.0,
        help="seconds after a resend before email-info lists its email",
    )
    p.add_argument(
        "--send-after",
        type=float,
        default=1.0,
        help="seconds after a resend before its email turns from queued to sent (%(default)s)",
    )
    p.add_argument(
        "--trickle",
        type=float,
        default=0.0,
        help="drip every answer's body a byte at a time over this many seconds",
    )
    p.add_argument(
        "--rate-limit",
        type=int,
        default=None,
        help="an account budget of HostUp requests per second (X-RateLimit-* on every "
        "answer, 429 rate_limit_exceeded over it)",
    )
    p.add_argument("--seed", type=int, default=None, help="seed of the random faults")
    return p


def main() -> None:
    args = parser().parse_args()
    rates = {500: args.rate_5xx, 429: args.rate_429}
    sandbox = Sandbox(
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        abillify_user=args.abillify_user,
        abillify_password=args.abillify_password,
        latency=args.latency,
        failure_rates={k: v for k, v in rates.items() if v},
        seed=args.seed,
        clock_offset=args.clock_offset,
        email_info_lag=args.email_info_lag,
        send_after=args.send_after,
        trickle=args.trickle,
        rate_limit=args.rate_limit,
    ).start()
    print(f"billing sandbox on {sandbox.url} (HostUp {sandbox.hostup_url})", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    sandbox.stop()


if __name__ == "__main__":
    main()
