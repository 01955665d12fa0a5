"""The process environment, read once into one frozen object (CONTRACT.md, "Environment")."""

from __future__ import annotations

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
    log_format: Literal["console", "json"] = "console"
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

    @model_validator(mode="after")
    def _provider_credentials(self) -> Self:
        if self.billing_provider == "hostup" and self.hostup_api_key is None:
            raise _Missing("hostup_api_key", "required when BILLING_PROVIDER=hostup")
        if self.billing_provider == "abillify":
            if not self.abillify_username:
                raise _Missing("abillify_username", "required when BILLING_PROVIDER=abillify")
            if self.abillify_password is None:
                raise _Missing("abillify_password", "required when BILLING_PROVIDER=abillify")
        if self.retry_server_error_max_seconds < self.retry_server_error_base_seconds:
            raise _Missing(
                "retry_server_error_max_seconds",
                "must not be below RETRY_SERVER_ERROR_BASE_SECONDS",
            )
        return self

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
        return Topology(events_exchange=self.events_exchange)

    def http_config(self, *, max_connections: int = 100) -> HttpConfig:
        return HttpConfig(
            timeout_seconds=self.http_timeout_seconds, max_connections=max_connections
        )


class _Missing(ValueError):
    """A cross-field check that names its variable."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def load(**overrides: object) -> Settings:
    """Read the environment (``overrides`` win); raise SettingsError naming the variable."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise SettingsError(_one_line(exc)) from None
    except _Missing as exc:
        raise SettingsError(f"{exc.field.upper()}: {exc}") from None


def _one_line(exc: ValidationError) -> str:
    error = exc.errors(include_url=False, include_input=False)[0]
    field = str(error["loc"][0]).upper() if error["loc"] else "settings"
    cause = error.get("ctx", {}).get("error")
    if isinstance(cause, _Missing):
        return f"{cause.field.upper()}: {cause}"
    message = str(error["msg"]).removeprefix("Value error, ")
    return f"{field}: {message}"
