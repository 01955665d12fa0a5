"""Sentry for the worker: give-ups reported once and grouped; nothing secret or personal sent.

Initialised when the app is created, i.e. when ``celery -A tasks`` imports it,
before any task runs (sentry-python#1512: ``worker_process_init`` is too late).
Retries are Celery ``Retry`` exceptions, which the Celery integration never
reports; a give-up is reported by ``SentryObserver`` as one message per event,
fingerprinted by provider and code so each cause is one Sentry issue.
"""

from __future__ import annotations

import sentry_sdk
from sentry_sdk.integrations.celery import CeleryIntegration
from sentry_sdk.scrubber import DEFAULT_DENYLIST, EventScrubber
from sentry_sdk.transport import Transport

from invoice_mailer.observe import StepRecord
from invoice_mailer.untrusted import Redactor
from settings import Settings

__all__ = ["SentryObserver", "init_sentry", "redactor"]

# Keys whose values Sentry must never see, besides its own list.
DENYLIST = [
    *DEFAULT_DENYLIST,
    "hostup_api_key",
    "abillify_password",
    "idempotency-key",
    "idempotency_key",
    "email",
    "emails",
    "to",
    "ccrecipients",
    "currenttargets",
    "emailinfo",
    "email_info",
    "body",
    "job",
    "kwargs",
]
CREDENTIAL_CODES = {401, 403}


def init_sentry(settings: Settings, *, transport: Transport | None = None) -> None:
    """Start Sentry if ``SENTRY_DSN`` is set (``transport`` is the test seam)."""
    if settings.sentry_dsn is None:
        return
    masks = redactor(settings)
    sentry_sdk.init(
        dsn=settings.sentry_dsn.get_secret_value(),
        environment=settings.sentry_environment,
        integrations=[CeleryIntegration(propagate_traces=False)],
        # send_default_pii stays at its default (off); data_collection is not used
        # because it switches the EventScrubber off.
        event_scrubber=EventScrubber(denylist=DENYLIST, recursive=True),
        include_local_variables=False,  # frames' locals hold keys, bodies, addresses
        # No sentry-trace/baggage headers to the billing APIs (or anywhere).
        trace_propagation_targets=[],
        traces_sample_rate=0.0,
        before_send=lambda event, hint: masks.scrub(event),
        before_breadcrumb=lambda crumb, hint: masks.scrub(crumb),
        transport=transport,
    )


class SentryObserver:
    """One Sentry event per give-up, grouped by provider and code."""

    def on_step(self, r: StepRecord) -> None:
        if r.outcome not in ("published_failure", "invalid"):
            return
        credentials = r.status in CREDENTIAL_CODES
        with sentry_sdk.new_scope() as scope:
            scope.fingerprint = ["invoice-mailer", "give-up", r.provider, r.code or "unknown"]
            scope.set_tag("provider", r.provider)
            scope.set_tag("code", r.code or "unknown")
            scope.set_tag("step", r.failed_step or r.step)
            scope.set_tag("status", str(r.status))
            if credentials:
                scope.set_tag("operator_action", "fix billing API credentials")
            scope.set_context("event", {"id": r.event_id, "invoice": r.invoice})
            what = "credentials rejected by" if credentials else "gave up on"
            sentry_sdk.capture_message(
                f"{what} {r.provider}: {r.code} ({r.failed_step or r.step}, status {r.status})",
                level="error" if credentials else "warning",
            )


def redactor(settings: Settings) -> Redactor:
    """Every secret of the settings, in every form it travels in (``untrusted.Redactor``)."""
    values = [settings.hostup_api_key, settings.flower_basic_auth]
    found = [v.get_secret_value() for v in values if v is not None]
    if "@" in settings.celery_broker_url and "://" in settings.celery_broker_url:
        credentials = settings.celery_broker_url.split("://", 1)[1].split("@", 1)[0]
        found.append(credentials.split(":", 1)[-1])
    basic = None
    if settings.abillify_password is not None:
        basic = (settings.abillify_username or "", settings.abillify_password.get_secret_value())
    return Redactor(found, basic=basic)
