"""The process environment, read once into one frozen object (CONTRACT.md, "Environment")."""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from typing import Any, Literal, Self

from pydantic import Field, HttpUrl, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from broker import Topology
from invoice_mailer.billing import HttpConfig
from invoice_mailer.policy import RetryPolicy

__all__ = ["Settings", "SettingsError", "load"]


class SettingsError(Exception):
    """A setting is missing or malformed; ``str()`` is one line naming it."""


class Settings(BaseSettings):
    """Every variable of CONTRACT.md, with its default. Secrets are ``SecretStr``."""

    model_config = SettingsConfigDict(
        frozen=True,
        case_sensitive=False,
        env_ignore_empty=True,  # VAR= in a Procfile .env means "unset", not ""
        extra="ignore",
    )

    celery_broker_url: str = Field(  # may hold the broker password: kept out of repr
        default="amqp://guest:guest@127.0.0.1:5672//", repr=False
    )
    billing_provider: Literal["hostup", "abillify"] = "hostup"
    hostup_api_base_url: HttpUrl = HttpUrl("https://cloud.hostup.se/api/v2")
    hostup_api_key: SecretStr | None = None
    abillify_api_base_url: HttpUrl = HttpUrl("https://staging1.abillify.dev/api")
    abillify_username: str | None = None
    abillify_password: SecretStr | None = None
    ledger_url: str = "sqlite:///var/invoice-mailer.sqlite3"
    events_exchange: str = Field(default="billing.events", min_length=1, max_length=255)
    http_timeout_seconds: float = Field(default=10.0, gt=0, le=300)
    retry_server_error_max_attempts: int = Field(default=8, ge=1, le=100)
    retry_server_error_base_seconds: float = Field(default=2.0, gt=0)
    retry_server_error_max_seconds: float = Field(default=600.0, gt=0)
    retry_rate_limit_max_wait_seconds: float = Field(default=172_800.0, ge=0)
    sentry_dsn: SecretStr | None = None
    sentry_environment: str | None = None
    flower_basic_auth: SecretStr | None = None
    # Beyond CONTRACT.md (operations; README "Configuration"):
    metrics_port: int = Field(default=9808, ge=0, le=65535)
    metrics_host: str = Field(default="0.0.0.0", min_length=1)  # noqa: S104 (scraped from outside)
    log_format: Literal["console", "json"] = "console"
    dead_letter_queue_type: Literal["classic", "quorum"] = "classic"
    email_info_lag_seconds: float = Field(default=5.0, ge=0, le=3600)
    retry_outage_max_wait_seconds: float | None = Field(default=None, ge=0)
    hostup_max_requests_per_second: float | None = Field(default=None, gt=0)
    abillify_max_requests_per_second: float | None = Field(default=None, gt=0)

    @field_validator("celery_broker_url")
    @classmethod
    def _broker_scheme(cls, value: str) -> str:
        scheme = value.split("://", 1)[0] if "://" in value else ""
        if scheme not in {"amqp", "pyamqp", "amqps", "memory"}:
            raise ValueError("must be an amqp:// URL (or memory:// for the demo)")
        return value

    @field_validator("ledger_url")
    @classmethod
    def _ledger_scheme(cls, value: str) -> str:
        if not value.startswith(("sqlite:///", "postgresql://", "postgres://")):
            raise ValueError("must start with sqlite:/// or postgresql://")
        return value

    @field_validator("flower_basic_auth")
    @classmethod
    def _user_colon_password(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and ":" not in value.get_secret_value():
            raise ValueError("must be user:password")
        return value

    @field_validator("billing_provider", "log_format", "dead_letter_queue_type", mode="before")
    @classmethod
    def _lower_case(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.retry_server_error_max_seconds < self.retry_server_error_base_seconds:
            raise _Missing(
                "retry_server_error_max_seconds",
                "must not be below RETRY_SERVER_ERROR_BASE_SECONDS",
            )
        return self

    def require_provider(self) -> None:
        """The configured provider's credentials are set, or SettingsError naming them.
        Only what calls the billing API needs them (the worker, ``check``, the demo):
        Flower, ``status``, ``dead-letters``, ``ledger`` and ``celery inspect`` do not."""
        missing = []
        if self.billing_provider == "hostup" and self.hostup_api_key is None:
            missing.append("HOSTUP_API_KEY: required when BILLING_PROVIDER=hostup")
        if self.billing_provider == "abillify":
            if not self.abillify_username:
                missing.append("ABILLIFY_USERNAME: required when BILLING_PROVIDER=abillify")
            if self.abillify_password is None:
                missing.append("ABILLIFY_PASSWORD: required when BILLING_PROVIDER=abillify")
        if missing:
            raise SettingsError("; ".join(missing))

    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(
            server_error_max_attempts=self.retry_server_error_max_attempts,
            server_error_base_seconds=self.retry_server_error_base_seconds,
            server_error_max_seconds=self.retry_server_error_max_seconds,
            rate_limit_max_wait_seconds=self.retry_rate_limit_max_wait_seconds,
        )

    def provider_options(self) -> dict[str, Any]:
        """Constructor arguments of the configured provider's client (secrets included)."""
        if self.billing_provider == "hostup":
            assert self.hostup_api_key is not None  # checked at load
            return {
                "base_url": str(self.hostup_api_base_url),
                "api_key": self.hostup_api_key.get_secret_value(),
                "max_requests_per_second": self.hostup_max_requests_per_second,
            }
        assert self.abillify_username is not None
        assert self.abillify_password is not None
        return {
            "base_url": str(self.abillify_api_base_url),
            "username": self.abillify_username,
            "password": self.abillify_password.get_secret_value(),
            "max_requests_per_second": self.abillify_max_requests_per_second,
        }

    def outage_max_wait_seconds(self) -> float:
        """How long one event may wait, in all, on an unhealthy billing API."""
        if self.retry_outage_max_wait_seconds is not None:
            return self.retry_outage_max_wait_seconds
        return self.retry_rate_limit_max_wait_seconds

    def resend_settles_seconds(self) -> float:
        """After a resend's try began, how long until email-info must list its email:
        the whole request (``HTTP_TIMEOUT_SECONDS``), then email-info's lag behind it."""
        return self.http_timeout_seconds + self.email_info_lag_seconds

    def lease_seconds(self) -> float:
        """How long a run may hold an event: two HTTP calls at most, plus a publish.

        A worker killed mid-event holds it this long; then another run takes over.
        """
        return 2 * self.http_timeout_seconds + 5

    def topology(self) -> Topology:
        return Topology(
            events_exchange=self.events_exchange,
            dead_letter_queue_type=self.dead_letter_queue_type,
        )

    def http_config(self, *, max_connections: int = 100) -> HttpConfig:
        return HttpConfig(
            timeout_seconds=self.http_timeout_seconds, max_connections=max_connections
        )


class _Missing(ValueError):
    """A cross-field check that names its variable."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


# Prefixes only this service reads: a variable that has one and is not a setting is a
# typo (HOSTUP_APIKEY), refused rather than silently ignored. SENTRY_, FLOWER_, HTTP_ and
# CELERY_ are not among them: sentry-sdk, Flower, proxies and Celery read their own.
OWN_PREFIXES = ("HOSTUP_", "ABILLIFY_", "RETRY_", "LEDGER_", "BILLING_", "EMAIL_INFO_", "METRICS_")


def load(*, require_provider: bool = False, **overrides: object) -> Settings:
    """Read the environment (``overrides`` win); raise SettingsError naming every bad
    variable, in one line. ``require_provider``: the provider's credentials too."""
    problems = _unknown(os.environ)
    settings = None
    try:
        settings = Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems += _lines(exc)
    except _Missing as exc:
        problems.append(f"{exc.field.upper()}: {exc}")
    if settings is not None and require_provider:
        try:
            settings.require_provider()
        except SettingsError as exc:
            problems.append(str(exc))
    if problems or settings is None:
        raise SettingsError("; ".join(problems))
    return settings


def _unknown(environ: Mapping[str, str]) -> list[str]:
    known = [name.upper() for name in Settings.model_fields]
    found = []
    for name in sorted(environ):
        upper = name.upper()
        if upper.startswith(OWN_PREFIXES) and upper not in known:
            close = difflib.get_close_matches(upper, known, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            found.append(f"{upper}: not a setting{hint}")
    return found


def _lines(exc: ValidationError) -> list[str]:
    lines = []
    for error in exc.errors(include_url=False, include_input=False):
        field = str(error["loc"][0]).upper() if error["loc"] else "settings"
        cause = error.get("ctx", {}).get("error")
        if isinstance(cause, _Missing):
            lines.append(f"{cause.field.upper()}: {cause}")
            continue
        lines.append(f"{field}: {str(error['msg']).removeprefix('Value error, ')}")
    return lines
