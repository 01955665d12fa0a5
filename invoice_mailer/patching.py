"""Whether gevent's monkey-patching runs this process, asked without importing gevent.

The worker's default pool is gevent's, patched by Celery before anything else is
imported (``celery.__main__.maybe_patch_concurrency``); the CLI, the tests and the
threads pool run unpatched. The few places that act differently under patching ask
here, so that a process that never patched never imports gevent to find out.
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["original", "patched"]


def patched(module: str) -> bool:
    """Whether gevent has replaced the standard library's ``module`` in this process."""
    monkey = sys.modules.get("gevent.monkey")
    return monkey is not None and bool(monkey.is_module_patched(module))


def original(module: str, name: str) -> Any:
    """``module.name`` as it was before gevent's patching (as it is, if unpatched)."""
    if patched(module):
        return sys.modules["gevent.monkey"].get_original(module, name)
    return getattr(__import__(module), name)
