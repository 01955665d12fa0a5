"""Integration fixtures: a vhost per test, the sandbox on a free port, real worker processes."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from sandbox import DEFAULT_ABILLIFY_PASSWORD, DEFAULT_ABILLIFY_USER, Sandbox
from tests.support.broker import Bus, VhostPool, require_rabbitmq
from tests.support.postgres import fresh_database, require_postgres
from tests.support.worker import WorkerProcess, worker_env

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def vhosts() -> Iterator[VhostPool]:
    pool = VhostPool()
    yield pool
    pool.close()


@pytest.fixture
def broker_url(vhosts: VhostPool) -> Iterator[str]:
    require_rabbitmq()
    with vhosts.fresh() as url:
        yield url


@pytest.fixture
def sandbox() -> Iterator[Sandbox]:
    with Sandbox() as sb:
        yield sb


@pytest.fixture
def ledger_url(tmp_path: Path) -> str:
    """A fresh SQLite ledger per test (tests that need PostgreSQL override this)."""
    return f"sqlite:///{tmp_path}/ledger.sqlite3"


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test."""
    require_postgres()
    with fresh_database() as url:
        yield url


@contextmanager
def fresh_ledger_url(backend: str, tmp_path: Path) -> Iterator[str]:
    """A fresh ledger of ``backend`` (SQLite in a directory that does not exist yet)."""
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path}/nested/dir/ledger.sqlite3"
        return
    require_postgres()
    with fresh_database() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def any_ledger_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Each ledger backend in turn, fresh."""
    with fresh_ledger_url(request.param, tmp_path) as url:
        yield url


MakeEnv = Callable[..., dict[str, str]]


@pytest.fixture
def env(broker_url: str, sandbox: Sandbox, ledger_url: str) -> MakeEnv:
    """The environment of a worker or CLI for this test; keyword arguments override."""

    def make(**overrides: Any) -> dict[str, str]:
        return worker_env(broker_url, sandbox.url, ledger_url, **overrides)

    return make


@pytest.fixture
def abillify(sandbox: Sandbox) -> dict[str, str]:
    """Worker settings for the Abillify provider against the sandbox."""
    return {
        "BILLING_PROVIDER": "abillify",
        "ABILLIFY_API_BASE_URL": sandbox.abillify_url,
        "ABILLIFY_USERNAME": DEFAULT_ABILLIFY_USER,
        "ABILLIFY_PASSWORD": DEFAULT_ABILLIFY_PASSWORD,
    }


@pytest.fixture
def bus(broker_url: str) -> Iterator[Bus]:
    b = Bus(broker_url)
    yield b
    b.close()


StartWorker = Callable[..., WorkerProcess]


@pytest.fixture
def start_worker(
    env: MakeEnv, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[StartWorker]:
    """Start worker processes against this test's vhost and sandbox; env overrides as kwargs."""
    workers: list[WorkerProcess] = []

    def start(
        *,
        concurrency: int = 8,
        wait: bool = True,
        app: str = "tasks",
        pool: str = "gevent",
        **overrides: Any,
    ) -> WorkerProcess:
        worker = WorkerProcess(
            env(**overrides), tmp_path, concurrency=concurrency, app=app, pool=pool
        )
        running = sum(1 for w in workers if w.proc is not None and w.proc.poll() is None)
        workers.append(worker.start(wait=wait, raw_consumers=running + 1))
        return worker

    yield start
    stop_and_report(workers, request)


def stop_and_report(workers: list[WorkerProcess], request: pytest.FixtureRequest) -> None:
    """Kill the test's workers; if the test failed, print the end of each one's log."""
    for worker in workers:
        worker.kill()
    if request.node.stash.get(_FAILED, False):
        for worker in workers:
            print(f"--- log of {worker.name} ---\n{worker.log()}")


_FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.when == "call" and report.failed:
        item.stash[_FAILED] = True
    return report
