"""The pools the worker accepts: gevent patched, threads; nothing else."""

from __future__ import annotations

import pytest
from celery.concurrency.gevent import TaskPool as GeventPool
from celery.concurrency.prefork import TaskPool as PreforkPool
from celery.concurrency.solo import TaskPool as SoloPool
from celery.concurrency.thread import TaskPool as ThreadPool

from consumers._reissued import WrongPool, check_pool
from tests.support.patched import run_under_gevent


def test_the_threads_pool_is_accepted() -> None:
    check_pool(ThreadPool(limit=1))


@pytest.mark.parametrize("pool", [SoloPool, PreforkPool])
def test_a_pool_that_cannot_share_the_process_is_refused(pool: type) -> None:
    with pytest.raises(WrongPool, match="use --pool gevent"):
        check_pool(pool(limit=1))


def test_an_unpatched_gevent_pool_is_refused() -> None:
    """This process is not patched: the pool named only in the configuration."""
    with pytest.raises(WrongPool, match="give --pool gevent on the command line"):
        check_pool(GeventPool(limit=1))


def test_a_patched_gevent_pool_is_accepted() -> None:
    """As ``celery --pool gevent`` runs it: patched before anything else is imported."""
    done = run_under_gevent(
        "from celery.concurrency.gevent import TaskPool\n"
        "from consumers._reissued import check_pool\n"
        "check_pool(TaskPool(limit=1)); print('accepted')\n"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "accepted"
