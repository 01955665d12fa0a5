"""kombu consumers that run inside the Celery worker (bootsteps)."""

from consumers._reissued import PREFETCH, ReissuedEventConsumer, raw_body

__all__ = ["PREFETCH", "ReissuedEventConsumer", "raw_body"]
