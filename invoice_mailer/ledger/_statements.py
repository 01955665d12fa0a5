"""Ledger statements are written once, with ``:name`` parameters, and compiled per driver.

The compiler is SQLAlchemy's, for ``text()`` statements: it knows each driver's
parameter style and escaping (SQLite's ``?``, psycopg's ``%(name)s`` with literal
``%`` doubled), leaves casts (``x::text``) and quoted colons alone, and is kept by
people whose job that is. Only the compiler is used, not SQLAlchemy's engine or
pool: the SQLite backend keeps its writer thread (``_sqlite.py`` says why) and the
PostgreSQL one its ``psycopg_pool``. Each statement text is compiled once per
process (0.14 ms) and cached; every statement is a module constant, so the cache
never evicts.
"""

from __future__ import annotations

import functools

from sqlalchemy import text
from sqlalchemy.dialects import postgresql, sqlite

__all__ = ["for_psycopg", "for_sqlite"]

_SQLITE = sqlite.dialect()
# SQLAlchemy leaves the psycopg dialect's constructor unannotated.
_PSYCOPG = postgresql.dialect(paramstyle="pyformat")  # type: ignore[no-untyped-call]


@functools.lru_cache(maxsize=128)
def for_sqlite(sql: str) -> tuple[str, tuple[str, ...]]:
    """The statement with ``?`` parameters, and the parameter names in their order."""
    compiled = text(sql).compile(dialect=_SQLITE)
    return compiled.string, tuple(compiled.positiontup or ())


@functools.lru_cache(maxsize=128)
def for_psycopg(sql: str) -> str:
    """The statement with ``%(name)s`` parameters, literal ``%`` doubled."""
    return text(sql).compile(dialect=_PSYCOPG).string
