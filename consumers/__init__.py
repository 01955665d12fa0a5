"""kombu consumers that run inside the Celery worker (bootsteps)."""

from consumers._reissued import PREFETCH, ReissuedEventConsumer

__all__ = ["PREFETCH", "ReissuedEventConsumer"]
