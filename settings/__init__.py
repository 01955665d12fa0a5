"""Settings from the environment: ``load()`` once at start, pass values on.

A bad setting stops the process with one line naming the variable
(``load_or_exit``); nothing else in the service reads ``os.environ``.
"""

from __future__ import annotations

import sys
from typing import NoReturn

from settings._settings import Settings, SettingsError, load

__all__ = [
    "EXIT_CONFIG",
    "Settings",
    "SettingsError",
    "exit_config",
    "load",
    "load_or_exit",
]

EXIT_CONFIG = 78  # sysexits.h EX_CONFIG: supervisors can tell "fix the config" from a crash


def load_or_exit(*, require_provider: bool = False, **overrides: object) -> Settings:
    """``load()``, or print ``invoice-mailer: VARIABLE: problem`` to stderr and exit 78."""
    try:
        return load(require_provider=require_provider, **overrides)
    except SettingsError as exc:
        exit_config(exc)


def exit_config(exc: SettingsError) -> NoReturn:
    """The one line naming what is wrong, and exit 78."""
    print(f"invoice-mailer: invalid setting {exc}", file=sys.stderr)
    raise SystemExit(EXIT_CONFIG) from None
