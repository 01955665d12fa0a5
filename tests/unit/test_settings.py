"""Settings: CONTRACT.md's names and defaults; a bad value stops the process, naming it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from settings import EXIT_CONFIG, Settings, SettingsError, load

CONTRACT_VARIABLES = {
    "CELERY_BROKER_URL",
    "BILLING_PROVIDER",
    "HOSTUP_API_BASE_URL",
    "HOSTUP_API_KEY",
    "ABILLIFY_API_BASE_URL",
    "ABILLIFY_USERNAME",
    "ABILLIFY_PASSWORD",
    "LEDGER_URL",
    "EVENTS_EXCHANGE",
    "HTTP_TIMEOUT_SECONDS",
    "RETRY_SERVER_ERROR_MAX_ATTEMPTS",
    "RETRY_SERVER_ERROR_BASE_SECONDS",
    "RETRY_SERVER_ERROR_MAX_SECONDS",
    "RETRY_RATE_LIMIT_MAX_WAIT_SECONDS",
    "SENTRY_DSN",
    "SENTRY_ENVIRONMENT",
    "FLOWER_BASIC_AUTH",
}


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in CONTRACT_VARIABLES:
        monkeypatch.delenv(name, raising=False)


OPERATIONS_VARIABLES = {
    "METRICS_PORT",
    "METRICS_HOST",
    "LOG_FORMAT",
    "EMAIL_INFO_LAG_SECONDS",
    "RETRY_OUTAGE_MAX_WAIT_SECONDS",
    "HOSTUP_MAX_REQUESTS_PER_SECOND",
    "ABILLIFY_MAX_REQUESTS_PER_SECOND",
    "DEAD_LETTER_QUEUE_TYPE",
}


def test_every_contract_variable_is_a_setting() -> None:
    """The settings object has CONTRACT.md's variables, plus the documented operations ones."""
    assert {name.upper() for name in Settings.model_fields} == (
        CONTRACT_VARIABLES | OPERATIONS_VARIABLES
    )


def test_defaults_are_the_contracts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unset variables take CONTRACT.md's defaults."""
    monkeypatch.setenv("HOSTUP_API_KEY", "k")
    s = load()
    assert s.celery_broker_url == "amqp://guest:guest@127.0.0.1:5672//"
    assert s.billing_provider == "hostup"
    assert str(s.hostup_api_base_url) == "https://cloud.hostup.se/api/v2"
    assert str(s.abillify_api_base_url) == "https://staging1.abillify.dev/api"
    assert s.ledger_url == "sqlite:///var/invoice-mailer.sqlite3"
    assert s.events_exchange == "billing.events"
    assert s.http_timeout_seconds == 10
    assert s.retry_server_error_max_attempts == 8
    assert s.retry_server_error_base_seconds == 2
    assert s.retry_server_error_max_seconds == 600
    assert s.retry_rate_limit_max_wait_seconds == 172800
    assert s.sentry_dsn is None
    assert s.sentry_environment is None
    assert s.flower_basic_auth is None


def test_settings_are_frozen(monkeypatch: pytest.MonkeyPatch) -> None:
    """Read once, never changed."""
    monkeypatch.setenv("HOSTUP_API_KEY", "k")
    s = load()
    with pytest.raises(ValueError, match="frozen"):
        s.http_timeout_seconds = 1  # type: ignore[misc]


def test_secrets_stay_out_of_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    """The API key, passwords and the broker URL's password never print."""
    monkeypatch.setenv("HOSTUP_API_KEY", "hk_secret_value")
    monkeypatch.setenv("CELERY_BROKER_URL", "amqp://user:brokerpass@rabbit:5672//")
    monkeypatch.setenv("ABILLIFY_PASSWORD", "abillify_secret")
    text = repr(load()) + str(load())
    for secret in ("hk_secret_value", "brokerpass", "abillify_secret"):
        assert secret not in text


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({}, "HOSTUP_API_KEY"),
        ({"HOSTUP_API_KEY": ""}, "HOSTUP_API_KEY"),
        ({"BILLING_PROVIDER": "stripe", "HOSTUP_API_KEY": "k"}, "BILLING_PROVIDER"),
        ({"BILLING_PROVIDER": "abillify"}, "ABILLIFY_USERNAME"),
        ({"BILLING_PROVIDER": "abillify", "ABILLIFY_USERNAME": "u"}, "ABILLIFY_PASSWORD"),
        ({"HOSTUP_API_KEY": "k", "HTTP_TIMEOUT_SECONDS": "ten"}, "HTTP_TIMEOUT_SECONDS"),
        ({"HOSTUP_API_KEY": "k", "HTTP_TIMEOUT_SECONDS": "0"}, "HTTP_TIMEOUT_SECONDS"),
        ({"HOSTUP_API_KEY": "k", "HOSTUP_API_BASE_URL": "not a url"}, "HOSTUP_API_BASE_URL"),
        ({"HOSTUP_API_KEY": "k", "CELERY_BROKER_URL": "redis://x"}, "CELERY_BROKER_URL"),
        ({"HOSTUP_API_KEY": "k", "LEDGER_URL": "mysql://x"}, "LEDGER_URL"),
        (
            {"HOSTUP_API_KEY": "k", "RETRY_SERVER_ERROR_MAX_ATTEMPTS": "0"},
            "RETRY_SERVER_ERROR_MAX_ATTEMPTS",
        ),
        (
            {"HOSTUP_API_KEY": "k", "RETRY_SERVER_ERROR_BASE_SECONDS": "-1"},
            "RETRY_SERVER_ERROR_BASE_SECONDS",
        ),
        (
            {
                "HOSTUP_API_KEY": "k",
                "RETRY_SERVER_ERROR_BASE_SECONDS": "10",
                "RETRY_SERVER_ERROR_MAX_SECONDS": "5",
            },
            "RETRY_SERVER_ERROR_MAX_SECONDS",
        ),
        (
            {"HOSTUP_API_KEY": "k", "RETRY_RATE_LIMIT_MAX_WAIT_SECONDS": "forever"},
            "RETRY_RATE_LIMIT_MAX_WAIT_SECONDS",
        ),
        ({"HOSTUP_API_KEY": "k", "FLOWER_BASIC_AUTH": "nocolon"}, "FLOWER_BASIC_AUTH"),
        ({"HOSTUP_API_KEY": "k", "METRICS_PORT": "70000"}, "METRICS_PORT"),
        ({"HOSTUP_API_KEY": "k", "LOG_FORMAT": "xml"}, "LOG_FORMAT"),
        ({"HOSTUP_API_KEY": "k", "DEAD_LETTER_QUEUE_TYPE": "mirrored"}, "DEAD_LETTER_QUEUE_TYPE"),
    ],
)
def test_a_bad_setting_names_its_variable(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], variable: str
) -> None:
    """Missing or malformed: one line that starts with the variable's name."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as info:
        load(require_provider=True)
    message = str(info.value)
    assert message.startswith(f"{variable}: ")
    assert "\n" not in message


def test_a_bad_secret_is_not_echoed(monkeypatch: pytest.MonkeyPatch) -> None:
    """The error about a malformed secret does not print the secret."""
    monkeypatch.setenv("HOSTUP_API_KEY", "k")
    monkeypatch.setenv("FLOWER_BASIC_AUTH", "adminhunter2")
    with pytest.raises(SettingsError) as info:
        load()
    assert "hunter2" not in str(info.value)


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in CONTRACT_VARIABLES}
    return subprocess.run(
        args, env={**base, **env}, capture_output=True, text=True, timeout=60, check=False
    )


@pytest.mark.parametrize(
    "command",
    [
        [sys.executable, "-m", "celery", "-A", "tasks", "worker", "--pool", "solo"],
        [sys.executable, "-c", "from cli import main; main()", "check"],
    ],
    ids=["worker", "cli"],
)
def test_processes_stop_at_start_with_one_line_and_no_traceback(command: list[str]) -> None:
    """A worker or CLI with a bad setting exits 78 with one stderr line naming it."""
    result = _run(command, {"HOSTUP_API_KEY": "k", "HTTP_TIMEOUT_SECONDS": "soon"})
    assert result.returncode == EXIT_CONFIG
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [
        "invoice-mailer: invalid setting HTTP_TIMEOUT_SECONDS: "
        "Input should be a valid number, unable to parse string as a number"
    ]
    assert "Traceback" not in result.stdout + result.stderr


def test_missing_api_key_stops_the_worker() -> None:
    """No HOSTUP_API_KEY with the default provider: the worker refuses to start (the
    check is the worker's: Celery may warn about running as root before it)."""
    result = _run([sys.executable, "-m", "celery", "-A", "tasks", "worker"], {})
    assert result.returncode == EXIT_CONFIG
    assert result.stderr.strip().splitlines()[-1] == (
        "invoice-mailer: invalid setting HOSTUP_API_KEY: required when BILLING_PROVIDER=hostup"
    )
    assert "Traceback" not in result.stdout + result.stderr


@pytest.mark.parametrize(
    "command",
    [
        ["-m", "celery", "-A", "tasks", "inspect", "ping", "--timeout", "0.1"],
        ["-m", "celery", "-A", "tasks", "report"],
        ["-c", "from cli import main; main()", "dead-letters", "--help"],
        ["-c", "import tasks; print(tasks.app.main)"],  # what Flower builds
    ],
    ids=["inspect", "report", "dead-letters", "flower's app"],
)
def test_operators_tools_need_no_billing_secret(command: list[str]) -> None:
    """Flower, ``celery inspect`` and the CLI's operator commands run without the key
    that sends emails: only the worker and ``check`` need it."""
    result = _run([sys.executable, *command], {})
    assert result.returncode != EXIT_CONFIG, result.stderr
    assert "HOSTUP_API_KEY" not in result.stderr


def test_check_needs_the_billing_secret() -> None:
    result = _run([sys.executable, "-c", "from cli import main; main()", "check"], {})
    assert result.returncode == EXIT_CONFIG
    assert "HOSTUP_API_KEY: required" in result.stderr


def test_every_bad_setting_is_named_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not only the first: an operator fixes them all in one go (the credentials are
    checked once the values are well-formed)."""
    monkeypatch.setenv("HTTP_TIMEOUT_SECONDS", "soon")
    monkeypatch.setenv("METRICS_PORT", "70000")
    monkeypatch.setenv("LOG_FORMAT", "xml")
    with pytest.raises(SettingsError) as info:
        load(require_provider=True)
    message = str(info.value)
    assert "\n" not in message
    for variable in ("HTTP_TIMEOUT_SECONDS", "METRICS_PORT", "LOG_FORMAT"):
        assert f"{variable}: " in message


def test_a_misspelled_setting_is_refused_with_the_name_it_resembles(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HOSTUP_APIKEY", "hk_live_secret")
    monkeypatch.setenv("RETRY_SERVER_ERROR_MAX_ATTEMPT", "3")
    with pytest.raises(SettingsError) as info:
        load()
    message = str(info.value)
    assert "HOSTUP_APIKEY: not a setting (did you mean HOSTUP_API_KEY?)" in message
    assert "RETRY_SERVER_ERROR_MAX_ATTEMPT: not a setting (did you mean " in message
    assert "hk_live_secret" not in message


def test_names_other_tools_read_are_not_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """sentry-sdk, Flower, proxies and Celery read variables of their own."""
    for name in ("SENTRY_RELEASE", "FLOWER_PORT", "HTTP_PROXY", "CELERY_CONFIG_MODULE"):
        monkeypatch.setenv(name, "x")
    assert load(hostup_api_key="k").hostup_api_key is not None


@pytest.mark.parametrize(
    ("variable", "value"), [("LOG_FORMAT", "JSON"), ("BILLING_PROVIDER", "HostUp")]
)
def test_choices_are_not_case_sensitive(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    assert getattr(load(hostup_api_key="k"), variable.lower()) == value.lower()


@pytest.mark.parametrize(
    ("value", "arguments"),
    [(None, None), ("classic", None), ("Quorum", {"x-queue-type": "quorum"})],
)
def test_the_dead_letter_queue_is_declared_of_the_type_set(
    monkeypatch: pytest.MonkeyPatch, value: str | None, arguments: dict[str, str] | None
) -> None:
    """Classic by default (as existing deployments declared it); quorum on a cluster."""
    if value is not None:
        monkeypatch.setenv("DEAD_LETTER_QUEUE_TYPE", value)
    assert load().topology().dead_letters().queue_arguments == arguments
