"""``python -m sandbox --port 8765 --latency 0.05``: the sandbox as its own process."""

from __future__ import annotations

import argparse
import signal
import threading

from sandbox import Sandbox


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m sandbox", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds added to each answer")
    parser.add_argument("--rate-5xx", type=float, default=0.0, help="share of requests -> 500")
    parser.add_argument("--rate-429", type=float, default=0.0, help="share of requests -> 429")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()
    rates = {500: args.rate_5xx, 429: args.rate_429}
    sandbox = Sandbox(
        host=args.host,
        port=args.port,
        latency=args.latency,
        failure_rates={k: v for k, v in rates.items() if v},
        seed=args.seed,
    ).start()
    print(f"billing sandbox on {sandbox.url} (HostUp {sandbox.hostup_url})", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    sandbox.stop()


if __name__ == "__main__":
    main()
