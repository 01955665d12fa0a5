"""Billing API clients behind one small interface (``BillingProvider``).

A provider is one module with a client class; ``PROVIDERS`` maps the
``BILLING_PROVIDER`` name to it. Tasks and consumers only ever see the interface.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx

from invoice_mailer.billing._abillify import AbillifyClient
from invoice_mailer.billing._hostup import HostUpClient
from invoice_mailer.billing._http import HttpConfig, ShardedTransport, build_http_client
from invoice_mailer.billing._provider import BillingProvider, ResendResult

__all__ = [
    "PROVIDERS",
    "AbillifyClient",
    "BillingProvider",
    "HostUpClient",
    "HttpConfig",
    "ResendResult",
    "ShardedTransport",
    "build_http_client",
    "build_provider",
]

PROVIDERS: dict[str, Callable[..., BillingProvider]] = {
    "hostup": HostUpClient,
    "abillify": AbillifyClient,
}


def build_provider(name: str, *, http: httpx.Client, **options: Any) -> BillingProvider:
    """The client for provider ``name``, sharing ``http``; ``options`` are its settings."""
    return PROVIDERS[name](http=http, **options)
