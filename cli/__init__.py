"""``invoice-mailer``: the operator's command line."""

from cli._main import main

__all__ = ["main"]
