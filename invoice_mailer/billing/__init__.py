"""Billing API clients behind one small interface (``BillingProvider``)."""

from invoice_mailer.billing._hostup import HostUpClient
from invoice_mailer.billing._http import HttpConfig, build_http_client
from invoice_mailer.billing._provider import BillingProvider, ResendResult

__all__ = ["BillingProvider", "HostUpClient", "HttpConfig", "ResendResult", "build_http_client"]
