"""The project's own local billing APIs (HostUp and Abillify), for tests, demo and bench."""

from sandbox._server import DEFAULT_API_KEY, Fault, RecordedRequest, Sandbox

__all__ = ["DEFAULT_API_KEY", "Fault", "RecordedRequest", "Sandbox"]
