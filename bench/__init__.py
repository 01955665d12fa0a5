"""Benchmarks: invoice-mailer against a minimal kombu + httpx baseline (``python -m bench``)."""
