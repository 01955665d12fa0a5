"""The ledger's contract, against both backends on real databases (SQLite file, PostgreSQL)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from invoice_mailer.billing import ResendResult
from invoice_mailer.ledger import (
    AlreadyDone,
    Busy,
    Claim,
    Claimed,
    InvoiceBusy,
    Ledger,
    LedgerError,
    open_ledger,
)
from invoice_mailer.ledger._sqlite import SqliteLedger
from invoice_mailer.ledger._statements import for_psycopg, for_sqlite
from tests.integration.conftest import fresh_ledger_url

KEY = ("/billing", "evt_1")
T0 = 1_800_000_000.0
LEASE = 30.0
RESULT = ResendResult(queued_at="2026-11-21T10:00:00.000Z", email="billing@example.com")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """SQLite's two ways of running statements (its writer thread, for the threads pool;
    inline, as among gevent's greenlets, binding ``:name`` itself) each get the whole
    contract; PostgreSQL has one way."""
    if "ledger" in metafunc.fixturenames:
        cases = [("sqlite", False), ("sqlite", True), ("postgresql", False)]
        ids = ["sqlite-writer", "sqlite-inline", "postgresql"]
        metafunc.parametrize(
            "any_ledger_url, sqlite_inline", cases, ids=ids, indirect=["any_ledger_url"]
        )
    elif "any_ledger_url" in metafunc.fixturenames:
        metafunc.parametrize("any_ledger_url", ["sqlite", "postgresql"], indirect=True)


@pytest.fixture
def any_ledger_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """As conftest's, parametrized here with SQLite's mode (``pytest_generate_tests``)."""
    with fresh_ledger_url(request.param, tmp_path) as url:
        yield url


@pytest.fixture
def ledger(any_ledger_url: str, sqlite_inline: bool) -> Iterator[Ledger]:
    if any_ledger_url.startswith("sqlite:///"):
        path = any_ledger_url.removeprefix("sqlite:///")
        ledger: Ledger = SqliteLedger(path, inline=sqlite_inline)
    else:
        ledger = open_ledger(any_ledger_url)
    yield ledger
    ledger.close()


def _claim(
    ledger: Ledger, owner: str, now: float = T0, key: tuple[str, str] = KEY, **kw: bool
) -> Claim:
    return ledger.claim(
        key, invoice="inv_1", provider="hostup", owner=owner, lease_seconds=LEASE, now=now, **kw
    )


def test_a_new_event_is_claimed_with_nothing_done(ledger: Ledger) -> None:
    """First sight of an event: claimed, open, no effects recorded."""
    claim = _claim(ledger, "a")
    assert isinstance(claim, Claimed)
    record = claim.record
    assert (record.state, record.lease_owner, record.lease_expires_at) == ("open", "a", T0 + LEASE)
    assert record.resend is None
    assert not record.resend_in_flight
    assert not record.email_info_done


def test_a_live_lease_makes_others_wait(ledger: Ledger) -> None:
    """A second run while the first holds the lease is told to come back later."""
    _claim(ledger, "a")
    claim = _claim(ledger, "b", now=T0 + 10)
    assert isinstance(claim, Busy)
    assert claim.retry_in == pytest.approx(LEASE - 10)


def test_an_expired_lease_is_taken_over(ledger: Ledger) -> None:
    """A run that died leaves a lease that expires; then another run takes over."""
    _claim(ledger, "a")
    claim = _claim(ledger, "b", now=T0 + LEASE + 1)
    assert isinstance(claim, Claimed)
    assert claim.record.lease_owner == "b"


def test_a_released_lease_is_free_at_once(ledger: Ledger) -> None:
    """Before a retry waits in the broker the lease is given back."""
    _claim(ledger, "a")
    ledger.release(KEY, "a")
    assert isinstance(_claim(ledger, "b", now=T0 + 1), Claimed)


def test_release_by_someone_else_changes_nothing(ledger: Ledger) -> None:
    """Only the holder can give a lease back."""
    _claim(ledger, "a")
    ledger.release(KEY, "b")
    assert isinstance(_claim(ledger, "b", now=T0 + 1), Busy)


def test_what_a_released_event_waits_for_is_counted_until_it_is_claimed(
    ledger: Ledger,
) -> None:
    """``status`` shows what waits in the broker, by step and kind: the release says
    it, the next claim (or the end) clears it."""
    other = ("/billing", "evt_other")
    _claim(ledger, "a")
    ledger.release(KEY, "a", waiting="resend rate_limited", until=T0 + 6)
    _claim(ledger, "b", key=other)
    ledger.release(other, "b", waiting="resend rate_limited", until=T0 + 6)
    assert ledger.parked() == {"resend rate_limited": 2}
    _claim(ledger, "c", now=T0 + 6)
    assert ledger.parked() == {"resend rate_limited": 1}
    ledger.release(KEY, "c", waiting="publish paused", until=T0 + 10)
    assert ledger.parked() == {"resend rate_limited": 1, "publish paused": 1}
    ledger.record_published(other, "out-2", now=T0 + 7)
    assert ledger.parked() == {"publish paused": 1}


def test_published_events_are_done(ledger: Ledger) -> None:
    """After publication every later delivery is a duplicate."""
    _claim(ledger, "a")
    ledger.record_published(KEY, "out-1", now=T0 + 1)
    claim = _claim(ledger, "b", now=T0 + 2)
    assert isinstance(claim, AlreadyDone)
    assert (claim.record.state, claim.record.outcome_event_id) == ("published", "out-1")
    assert isinstance(_claim(ledger, "c", now=T0 + 3, reopen_failed=True), AlreadyDone)


def test_failed_events_are_done_unless_replayed(ledger: Ledger) -> None:
    """A failed event is a duplicate, except for a replay from the dead-letter queue."""
    _claim(ledger, "a")
    ledger.record_failure(KEY, {"code": "not_found"}, owner="a", now=T0, lease_seconds=LEASE)
    ledger.record_failed(KEY, "out-f", now=T0 + 1)
    assert isinstance(_claim(ledger, "b", now=T0 + 2), AlreadyDone)
    claim = _claim(ledger, "c", now=T0 + 3, reopen_failed=True)
    assert isinstance(claim, Claimed)
    assert (claim.record.state, claim.record.failure) == ("open", None)


def test_a_replay_forgets_the_workers_lost_before(ledger: Ledger) -> None:
    """An event given up as poison (or one in flight beside it) runs again when replayed,
    instead of being given up at once for the takeovers counted before."""
    for n, owner in enumerate("abcd"):
        _claim(ledger, owner, now=T0 + n * (LEASE + 1))  # each holder dies: its lease expires
    ledger.record_failed(KEY, "out-f", now=T0 + 4 * LEASE)
    [failed] = ledger.find(KEY[1])
    assert (failed.state, failed.takeovers) == ("failed", 3)
    claim = _claim(ledger, "e", now=T0 + 5 * LEASE, reopen_failed=True)
    assert isinstance(claim, Claimed)
    assert claim.record.takeovers == 0


def test_resend_in_flight_is_remembered_with_its_first_start(ledger: Ledger) -> None:
    """A resend begun but not answered stays in flight; the first start time is kept."""
    _claim(ledger, "a")
    assert ledger.begin_resend(KEY, owner="a", now=T0 + 1, lease_seconds=LEASE) == T0 + 1
    assert ledger.begin_resend(KEY, owner="a", now=T0 + 5, lease_seconds=LEASE) == T0 + 1
    claim = _claim(ledger, "b", now=T0 + 5 + LEASE + 1)
    assert isinstance(claim, Claimed)
    assert claim.record.resend_in_flight
    assert claim.record.resend_first_started_at == T0 + 1


def test_a_resend_cannot_begin_without_the_lease(ledger: Ledger) -> None:
    """A run whose lease was taken over must not send: begin_resend says so."""
    _claim(ledger, "a")
    _claim(ledger, "b", now=T0 + LEASE + 1)
    assert ledger.begin_resend(KEY, owner="a", now=T0 + LEASE + 2, lease_seconds=LEASE) is None


def test_recorded_effects_are_read_back(ledger: Ledger) -> None:
    """Resend and email-info results survive to the next claim."""
    _claim(ledger, "a")
    ledger.begin_resend(KEY, owner="a", now=T0, lease_seconds=LEASE)
    ledger.record_resend(
        KEY,
        RESULT,
        owner="a",
        now=T0 + 1,
        lease_seconds=LEASE,
        email_info={"emails": [], "currentTargets": None},
    )
    ledger.release(KEY, "a")
    claim = _claim(ledger, "b", now=T0 + 3)
    assert isinstance(claim, Claimed)
    assert claim.record.resend == RESULT
    assert not claim.record.resend_in_flight
    assert claim.record.email_info == {"emails": [], "currentTargets": None}
    assert claim.record.email_info_done


def test_an_email_info_given_up_is_recorded_with_why(ledger: Ledger) -> None:
    """email-info's give-up is a fact like its answer: recorded, then published."""
    _claim(ledger, "a")
    record = ledger.record_email_info(
        KEY, owner="a", now=T0 + 1, lease_seconds=LEASE, email_info=None, error="x: down"
    )
    assert (record.email_info, record.email_info_error, record.email_info_done) == (
        None,
        "x: down",
        True,
    )
    record = ledger.record_published(KEY, "out-1", now=T0 + 2)
    assert (record.state, record.outcome_event_id, record.lease_owner) == (
        "published",
        "out-1",
        None,
    )
    assert record.email_info_error == "x: down"


def test_every_write_by_the_holder_renews_its_lease(ledger: Ledger) -> None:
    """A run that makes progress keeps its event: each write pushes the lease out; a
    write by a run that lost the lease records its fact but leaves the lease alone."""
    _claim(ledger, "a")
    record = ledger.record_resend(KEY, RESULT, owner="a", now=T0 + 20, lease_seconds=LEASE)
    assert record.lease_expires_at == T0 + 20 + LEASE
    assert isinstance(_claim(ledger, "b", now=T0 + LEASE + 1), Busy)
    record = ledger.record_email_info(
        KEY, owner="z", now=T0 + 25, lease_seconds=LEASE, email_info={"emails": []}
    )
    assert (record.lease_owner, record.lease_expires_at) == ("a", T0 + 20 + LEASE)
    assert record.email_info == {"emails": []}


def test_a_give_up_and_its_dead_letter_are_recorded_before_the_event(ledger: Ledger) -> None:
    """The failure, then the dead letter, each its own fact; the event is not final until
    email_failed is recorded, and a claim meanwhile begins no resend."""
    failure = {"step": "resend", "status": 404, "code": "not_found", "detail": "gone"}
    _claim(ledger, "a", begin_resend=True)
    ledger.resend_not_sent(KEY)
    record = ledger.record_failure(KEY, failure, owner="a", now=T0 + 1, lease_seconds=LEASE)
    assert (record.failure, record.dead_lettered, record.final) == (failure, False, False)
    record = ledger.record_dead_lettered(KEY, owner="a", now=T0 + 2, lease_seconds=LEASE)
    assert record.dead_lettered
    ledger.release(KEY, "a")
    claim = _claim(ledger, "b", now=T0 + 3, begin_resend=True)
    assert isinstance(claim, Claimed)
    assert (claim.resend_begun_at, claim.record.resend_in_flight) == (None, False)
    assert claim.record.dead_lettered
    record = ledger.record_failed(KEY, "out-1", now=T0 + 4)
    assert (record.state, record.failure) == ("failed", failure)


def test_a_replay_clears_the_give_up_and_its_dead_letter(ledger: Ledger) -> None:
    """A replayed failed event starts its give-up afresh: a new failure gets a new letter."""
    _claim(ledger, "a")
    ledger.record_failure(KEY, {"code": "x"}, owner="a", now=T0, lease_seconds=LEASE)
    ledger.record_dead_lettered(KEY, owner="a", now=T0, lease_seconds=LEASE)
    ledger.record_failed(KEY, "out-1", now=T0)
    claim = _claim(ledger, "b", now=T0 + 1, reopen_failed=True)
    assert isinstance(claim, Claimed)
    assert (claim.record.failure, claim.record.dead_lettered) == (None, False)


def test_find_prune_and_counts(ledger: Ledger) -> None:
    """`ledger show` and `ledger prune`: find by id, delete only old final records."""
    for n, state in enumerate(["published", "failed", "open"]):
        key = ("/billing", f"evt_{n}")
        _claim(ledger, "a", key=key)
        if state == "published":
            ledger.record_published(key, "o", now=T0)
        elif state == "failed":
            ledger.record_failure(key, {"code": "x"}, owner="a", now=T0, lease_seconds=LEASE)
            ledger.record_failed(key, "o", now=T0)
    assert ledger.counts() == {"published": 1, "failed": 1, "open": 1}
    assert [r.source for r in ledger.find("evt_0")] == ["/billing"]
    assert ledger.prune(older_than=T0 - 1) == 0
    assert ledger.prune(older_than=T0 + 1) == 2
    assert ledger.counts() == {"open": 1}


def test_opening_twice_keeps_the_schema_and_the_data(any_ledger_url: str, ledger: Ledger) -> None:
    """Migrations run once; a second process opening the ledger changes nothing."""
    _claim(ledger, "a")
    again = open_ledger(any_ledger_url)
    try:
        assert isinstance(_claim(again, "b", now=T0 + 1), Busy)
    finally:
        again.close()


def test_concurrent_claims_have_exactly_one_winner(ledger: Ledger) -> None:
    """8 threads race for each of 40 events: one Claimed per event, never two."""
    winners: dict[int, list[str]] = {n: [] for n in range(40)}
    barrier = threading.Barrier(8)
    errors: list[BaseException] = []

    def race(owner: str) -> None:
        try:
            for n in range(40):
                barrier.wait()
                claim = _claim(ledger, owner, key=("/race", f"evt_{n}"))
                if isinstance(claim, Claimed):
                    winners[n].append(owner)
        except BaseException as exc:  # surfaced below
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=race, args=(f"o{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert all(len(w) == 1 for w in winners.values()), winners


def test_taking_over_an_expired_lease_is_counted(ledger: Ledger) -> None:
    """Each takeover from a holder that died is counted; releases and re-claims are not."""
    _claim(ledger, "a")
    ledger.release(KEY, "a")
    _claim(ledger, "b", now=T0 + 1)
    _claim(ledger, "b", now=T0 + 2)
    assert isinstance(claim := _claim(ledger, "c", now=T0 + 2 + LEASE + 1), Claimed)
    assert claim.record.takeovers == 1
    assert isinstance(claim := _claim(ledger, "d", now=T0 + 4 + 2 * LEASE), Claimed)
    assert claim.record.takeovers == 2


def test_a_claim_can_begin_the_resend_in_the_same_write(ledger: Ledger) -> None:
    """The claim marks the resend in flight; the record still shows the state before it."""
    claim = _claim(ledger, "a", begin_resend=True)
    assert isinstance(claim, Claimed)
    assert claim.resend_begun_at == T0
    assert not claim.record.resend_in_flight  # nothing was in flight before this run
    # "a" died mid-resend: the next run sees it in flight, first start kept.
    claim = _claim(ledger, "b", now=T0 + LEASE + 1, begin_resend=True)
    assert isinstance(claim, Claimed)
    assert claim.record.resend_in_flight
    assert claim.record.resend_first_started_at == T0
    assert claim.resend_begun_at == T0


def test_a_definite_failure_clears_the_resend_in_flight(ledger: Ledger) -> None:
    """After an error answer, the next run's resend is not taken for an uncertain one."""
    _claim(ledger, "a", begin_resend=True)
    ledger.resend_not_sent(KEY)
    ledger.release(KEY, "a")
    claim = _claim(ledger, "b", now=T0 + 1, begin_resend=True)
    assert isinstance(claim, Claimed)
    assert not claim.record.resend_in_flight


def test_a_claim_does_not_begin_a_resend_already_recorded(ledger: Ledger) -> None:
    _claim(ledger, "a", begin_resend=True)
    ledger.record_resend(KEY, RESULT, owner="a", now=T0, lease_seconds=LEASE)
    ledger.release(KEY, "a")
    claim = _claim(ledger, "b", now=T0 + 1, begin_resend=True)
    assert isinstance(claim, Claimed)
    assert claim.resend_begun_at is None
    assert (claim.record.resend, claim.record.resend_in_flight) == (RESULT, False)


def test_a_run_that_lost_its_lease_still_records_its_resend(ledger: Ledger) -> None:
    """The resend happened whoever holds the lease now; only the lease stays theirs."""
    _claim(ledger, "a", begin_resend=True)
    _claim(ledger, "b", now=T0 + LEASE + 1)
    ledger.record_resend(KEY, RESULT, owner="a", now=T0 + LEASE + 2, lease_seconds=LEASE)
    ledger.release(KEY, "a")
    [record] = ledger.find(KEY[1])
    assert (record.resend, record.resend_in_flight, record.lease_owner) == (RESULT, False, "b")


@pytest.mark.parametrize("inline", [False, True], ids=["writer thread", "inline"])
def test_sqlite_an_error_answers_its_caller_and_the_writer_goes_on(
    tmp_path: Path, inline: bool
) -> None:
    """Statements run on the ledger's writer thread (inline among gevent's greenlets):
    an error is its caller's alone, a broken constraint is InvoiceBusy."""
    ledger = SqliteLedger(str(tmp_path / "ledger.sqlite3"), inline=inline)
    try:
        with pytest.raises(LedgerError, match="no_such_table"):
            ledger._execute("INSERT INTO no_such_table VALUES (:v)", {"v": 1})
        assert isinstance(_claim(ledger, "a"), Claimed)
        assert isinstance(_claim(ledger, "b", key=OTHER), Claimed)  # inv_1 too
        with pytest.raises(InvoiceBusy):  # two events of inv_1 holding its one slot
            ledger._execute("UPDATE invoice_mailer_ledger SET holds_invoice = :one", {"one": 1})
    finally:
        ledger.close()
    with pytest.raises(LedgerError, match="closed"):
        _claim(ledger, "b")


def test_statements_compile_for_each_driver_leaving_casts_quotes_and_percent_alone(
    tmp_path: Path,
) -> None:
    """``:name`` becomes ``?`` (names in order) for SQLite and ``%(name)s`` for psycopg;
    casts, quoted colons and a literal ``%`` (doubled for psycopg) stay what they were."""
    source = "SELECT :a, :b, :a, x::text, 'y:z', '5%' FROM t WHERE c = :b_2"
    sql, names = for_sqlite(source)
    assert sql == "SELECT ?, ?, ?, x::text, 'y:z', '5%' FROM t WHERE c = ?"
    assert names == ("a", "b", "a", "b_2")
    assert for_psycopg(source) == (
        "SELECT %(a)s, %(b)s, %(a)s, x::text, 'y:z', '5%%' FROM t WHERE c = %(b_2)s"
    )
    ledger = SqliteLedger(str(tmp_path / "ledger.sqlite3"))
    try:
        rows = ledger._execute("SELECT :b AS b, :a AS a, :b || :a AS ba", {"a": "1", "b": "2"})
    finally:
        ledger.close()
    assert rows == [{"b": "2", "a": "1", "ba": "21"}]


OTHER = ("/billing", "evt_2")  # another event of the same invoice (inv_1)


def test_one_resend_in_flight_per_invoice(ledger: Ledger) -> None:
    """While one event's resend of inv_1 has an unknown outcome, another event of inv_1
    is claimed without one, and cannot begin one until the first is settled."""
    assert isinstance(_claim(ledger, "a", begin_resend=True), Claimed)
    claim = _claim(ledger, "b", key=OTHER, begin_resend=True)
    assert isinstance(claim, Claimed)
    assert claim.resend_begun_at is None
    assert not claim.record.resend_in_flight
    with pytest.raises(InvoiceBusy):
        ledger.begin_resend(OTHER, owner="b", now=T0, lease_seconds=LEASE)
    # Released for a retry in the broker, the first resend's outcome is still unknown.
    ledger.release(KEY, "a")
    with pytest.raises(InvoiceBusy):
        ledger.begin_resend(OTHER, owner="b", now=T0 + 1, lease_seconds=LEASE)
    # Another invoice is not held up.
    third = ledger.claim(
        ("/billing", "evt_3"),
        invoice="inv_2",
        provider="hostup",
        owner="c",
        lease_seconds=LEASE,
        now=T0,
        begin_resend=True,
    )
    assert isinstance(third, Claimed)
    assert third.resend_begun_at == T0
    ledger.record_resend(KEY, RESULT, owner="a", now=T0 + 2, lease_seconds=LEASE)
    assert ledger.begin_resend(OTHER, owner="b", now=T0 + 3, lease_seconds=LEASE) == T0 + 3
    assert ledger.resends_of_invoice(OTHER, "inv_1", "hostup") == [RESULT]
    assert ledger.resends_of_invoice(KEY, "inv_1", "hostup") == []


@pytest.mark.parametrize("settle", ["not_sent", "failure", "published"])
def test_every_settled_outcome_frees_the_invoice(ledger: Ledger, settle: str) -> None:
    _claim(ledger, "a", begin_resend=True)
    if settle == "not_sent":
        ledger.resend_not_sent(KEY)
    elif settle == "failure":
        failure = {"step": "resend", "status": 403, "code": "forbidden", "detail": "no"}
        ledger.record_failure(KEY, failure, owner="a", now=T0, lease_seconds=LEASE)
    else:
        ledger.record_published(KEY, "out_1", now=T0)
    claim = _claim(ledger, "b", key=OTHER, begin_resend=True)
    assert isinstance(claim, Claimed)
    assert claim.resend_begun_at == T0


def test_concurrent_events_of_one_invoice_begin_one_resend_at_a_time(ledger: Ledger) -> None:
    """8 events of inv_1 race to begin their resends: exactly one wins the slot."""
    barrier = threading.Barrier(8)
    begun: list[str] = []
    errors: list[BaseException] = []

    def race(n: int) -> None:
        try:
            barrier.wait()
            claim = _claim(ledger, f"o{n}", key=("/race", f"evt_{n}"), begin_resend=True)
            if isinstance(claim, Claimed) and claim.resend_begun_at is not None:
                begun.append(f"o{n}")
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=race, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(begun) == 1


def test_new_events_get_the_new_id_scheme_and_recorded_ones_keep_theirs(
    any_ledger_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Migration 4 on a ledger 0.2 wrote: its records name their outgoing ids as 0.2
    did (scheme 1), new ones by ``ID_SCHEME``; and its in-flight resend holds no slot."""
    from invoice_mailer.events import ID_SCHEME
    from invoice_mailer.ledger import _sql

    full = list(_sql.MIGRATIONS)
    monkeypatch.setattr(_sql, "MIGRATIONS", [m for m in full if m[0] <= 3])
    monkeypatch.setattr(_sql, "_CLAIM", _CLAIM_0_2)
    old = open_ledger(any_ledger_url)
    _claim(old, "a", begin_resend=True)
    old.close()
    monkeypatch.undo()
    ledger = open_ledger(any_ledger_url)
    try:
        claim = _claim(ledger, "b", key=OTHER, begin_resend=True)
        assert isinstance(claim, Claimed)
        assert claim.resend_begun_at == T0
        schemes = {r.event_id: r.id_scheme for r in ledger.find("evt_1") + ledger.find("evt_2")}
        assert schemes == {"evt_1": 1, "evt_2": ID_SCHEME}
    finally:
        ledger.close()


# 0.2's claim, for a ledger at migration 3.
_CLAIM_0_2 = """INSERT INTO invoice_mailer_ledger (source, event_id, invoice, provider, state,
        lease_owner, lease_expires_at, resend_in_flight, resend_first_started_at,
        created_at, updated_at)
    VALUES (:source, :event_id, :invoice, :provider, 'open',
        :owner, :expires, :begin, CASE WHEN :begin = 1 THEN :now END, :now, :now)
    RETURNING *"""


def test_shared_health_is_one_row_per_dependency_changed_by_conditional_writes(
    ledger: Ledger,
) -> None:
    """The fleet's dependency health lives beside the ledger: two processes that both see
    an outage open it once; one probe at a time; reservations spread waiting events."""
    from invoice_mailer.health import BreakerPolicy, State, gate, healthy, on_probe, opened

    policy = BreakerPolicy()
    assert ledger.health("api:hostup", T0).ok
    first = opened(healthy("api:hostup", T0), T0, "503", policy)
    assert ledger.put(first, expect=State.HEALTHY)
    assert not ledger.put(
        opened(healthy("api:hostup", T0), T0 + 1, "503", policy), expect=State.HEALTHY
    )
    stored = ledger.health("api:hostup", T0 + 1)
    assert (stored.state, stored.retry_at, stored.detail) == (State.OPEN, first.retry_at, "503")
    assert not ledger.take_probe("api:hostup", "a", T0 + 1, 30)  # not due yet
    assert ledger.take_probe("api:hostup", "a", T0 + 2, 30)
    assert not ledger.take_probe("api:hostup", "b", T0 + 2, 30)  # one probe at a time
    assert ledger.take_probe("api:hostup", "b", T0 + 33, 30)  # the holder's lease ran out
    probing = ledger.health("api:hostup", T0 + 33)
    assert (probing.state, probing.probe_owner) == (State.PROBING, "b")
    assert ledger.put(on_probe(probing, True, T0 + 34, "ok", policy), expect=State.PROBING)
    assert ledger.health("api:hostup", T0 + 34).ok
    ledger.put(gate("budget:hostup", T0 + 5, T0, "429"))
    slots = [ledger.reserve("budget:hostup", T0 + 5, 0.5) for _ in range(3)]
    assert slots == [T0 + 5, T0 + 5.5, T0 + 6]
