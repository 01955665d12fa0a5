"""Test helpers that drive the service from the outside: broker, worker processes, sandbox."""
