"""What a worker process does not need, it does not import (peak RSS, issue 23).

Each module below is several MB of every worker's memory: SQLAlchemy's compiler 12 MB
(needed only to bind PostgreSQL's and the threads pool's statements), sentry-sdk 5 MB
(needed only with ``SENTRY_DSN``).
"""

from __future__ import annotations

from pathlib import Path

from tests.support.patched import run_under_gevent


def test_among_greenlets_the_sqlite_ledger_binds_names_without_a_compiler(
    tmp_path: Path,
) -> None:
    result = run_under_gevent(
        f"""
import sys
from invoice_mailer.ledger import open_ledger, Claimed
ledger = open_ledger("sqlite:///{tmp_path}/ledger.sqlite3")
claim = ledger.claim(
    ("/billing", "evt_1"), invoice="inv_1", provider="hostup", owner="a",
    lease_seconds=30.0, now=1.0, begin_resend=True,
)
print(isinstance(claim, Claimed), ledger._writer is None, "sqlalchemy" in sys.modules)
"""
    )
    assert result.stdout.split() == ["True", "True", "False"], result.stderr


def test_the_worker_app_loads_sentry_only_when_it_reports_to_sentry() -> None:
    body = """
import sys
from tasks import app
print("sentry_sdk" in sys.modules)
"""
    without = run_under_gevent(body, env={"SENTRY_DSN": ""})
    assert without.stdout.split() == ["False"], without.stderr
    with_dsn = run_under_gevent(body, env={"SENTRY_DSN": "https://public@127.0.0.1:9/1"})
    assert with_dsn.stdout.split() == ["True"], with_dsn.stderr
