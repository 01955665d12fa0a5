"""kombu consumers that run inside the Celery worker (bootsteps)."""

from consumers._reissued import PREFETCH_PER_THREAD, ReissuedEventConsumer

__all__ = ["PREFETCH_PER_THREAD", "ReissuedEventConsumer"]
