"""The project's own local billing APIs (HostUp and Abillify), for tests, demo and bench."""

from sandbox._server import (
    DEFAULT_ABILLIFY_PASSWORD,
    DEFAULT_ABILLIFY_USER,
    DEFAULT_API_KEY,
    Fault,
    RecordedRequest,
    Sandbox,
)

__all__ = [
    "DEFAULT_ABILLIFY_PASSWORD",
    "DEFAULT_ABILLIFY_USER",
    "DEFAULT_API_KEY",
    "Fault",
    "RecordedRequest",
    "Sandbox",
]
