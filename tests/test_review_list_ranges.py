"""The review queue's listings at a backlog read index ranges, and answer what a walk of every review answers.

At 200,000 waiting reviews each ClaimNextReview and each page of OPEN or UNRESOLVED reviews sorted the backlog
(reviews_by_filter was ordered by pipeline and tenant: ~250 ms), a page of every state or RESOLVED for one tenant
walked every review kept (40-90 ms), and every page counted its filter's missed SLAs row by row (~150 ms). Schema
version 10 reads them from ranges in list order (reviews_by_tenant; each pipeline's never claimed waiting reviews in
reviews_unresolved_by_lease), merged, and the SLA count from kept counts less the reviews not due yet. Here: the same
answers as the old queries (a walk of every review) for every filter, paged, claimed and counted, before and after
leases lapse; a schema 9 store with reviews migrates and lists as before; the plans name index ranges and sort no
backlog; the work of a page, a claim and a count does not grow with the backlog (SQLite's steps, not time). Real
SQLite files.
"""

from __future__ import annotations

import random
import sqlite3

import pytest
from test_review_queue import S, SettableClock

from kernel import paging
from kernel._proto.aios.kernel.v1 import kernel_pb2 as kpb
from kernel.errors import NotFound
from kernel.review import ReviewQueue
from kernel.store import open_database
from kernel.store.schema import MIGRATIONS, latest_version, migrate
from kernel.store.sqlite_reviews import _INSERT, _row
from kernel.testing.sqlite_work import read_steps

NOW = 1_700_000_000 * S
STATES = ("", "OPEN", "CLAIMED", "UNRESOLVED", "RESOLVED")
PIPELINES = ("", "p0", "p1", "rare", "none")
TENANTS = ("", "t0", "t1", "rare", "none")

# What ListReviews read before version 10: every review, walked in list order, and its SLA count row by row.
_OLD_STATE = {"": "1", "OPEN": "resolved = 0 AND lease_expires_unix_ns <= :now",
              "CLAIMED": "resolved = 0 AND lease_expires_unix_ns > :now", "UNRESOLVED": "resolved = 0",
              "RESOLVED": "resolved > 0"}
_OLD_LATE_WAITING = "resolved = 0 AND sla_deadline_unix_ns > 0 AND :now > sla_deadline_unix_ns"
_OLD_LATE_RESOLVED = "resolved = 1 AND sla_deadline_unix_ns > 0 AND resolved_unix_ns > sla_deadline_unix_ns"


def _old_filter(pipeline: str, tenant: str, state: str) -> str:
    return (_OLD_STATE[state] + (" AND pipeline = :pipeline" if pipeline else "")
            + (" AND tenant = :tenant" if tenant else ""))


def _old_rows(conn, pipeline: str, tenant: str, state: str, now: int) -> list[tuple[int, str]]:
    return conn.execute(f"SELECT seq, review_id FROM reviews NOT INDEXED WHERE {_old_filter(pipeline, tenant, state)}"
                        " ORDER BY seq", dict(now=now, pipeline=pipeline, tenant=tenant)).fetchall()


def _old_sla_missed(conn, pipeline: str, tenant: str, state: str, now: int) -> int:
    args, where, missed = dict(now=now, pipeline=pipeline, tenant=tenant), _old_filter(pipeline, tenant, state), 0
    if state != "RESOLVED":
        missed += conn.execute(f"SELECT count(*) FROM reviews NOT INDEXED WHERE {where} AND {_OLD_LATE_WAITING}",
                               args).fetchone()[0]
    if state in ("", "RESOLVED"):
        missed += conn.execute(f"SELECT count(*) FROM reviews NOT INDEXED WHERE {where} AND {_OLD_LATE_RESOLVED}",
                               args).fetchone()[0]
    return missed


def _reviews(count: int, seed: int = 5, first: int = 0) -> list[kpb.Review]:
    """``count`` reviews of every kind, interleaved: resolved on time and late, withdrawn, waiting never claimed,
    under a running lease, under a lease run out; with and without an SLA, due and overdue; pipelines p0 and p1
    (and a few 'rare'), tenants t0-t2 (and a few 'rare')."""
    rnd, made = random.Random(seed), []
    for n in range(first, first + count):
        created = NOW - 3600 * S + n * S // 10
        review = kpb.Review(review_id=f"r{n:06d}", request_id=str(n), state="OPEN", created_unix_ns=created,
                            actions=["approve", "deny"],
                            pipeline="rare" if n % 397 == 5 else rnd.choice(("p0", "p0", "p1")),
                            tenant="rare" if n % 211 == 3 else rnd.choice(("t0", "t0", "t1", "t2")))
        kind = rnd.random()
        if rnd.random() < 0.8:
            review.sla_deadline_unix_ns = created + rnd.choice((60, 600, 7200)) * S  # some not due yet at NOW
        if kind < 0.3:
            review.state, review.resolved_action, review.resolved_by = "RESOLVED", "approve", "ann"
            review.resolved_unix_ns = created + rnd.choice((30, 900)) * S
        elif kind < 0.35:
            review.state, review.resolved_by, review.comment = "RESOLVED", "kernel", "withdrawn: cancelled"
            review.resolved_unix_ns = created + 5 * S
        elif kind < 0.42:
            review.state, review.claimed_by = "CLAIMED", "bob"
            review.lease_expires_unix_ns = NOW + rnd.choice((-100, 30, 300)) * S  # run out, running, longer
        made.append(review)
    return made


def _check_every_listing(queue: ReviewQueue, db, now: int, page_size: int = 97) -> None:
    """Every filter's pages, tokens and SLA count, against the walk of every review."""
    with db.read() as conn:
        for pipeline in PIPELINES:
            for tenant in TENANTS:
                for state in STATES:
                    expected = _old_rows(conn, pipeline, tenant, state, now)
                    missed = _old_sla_missed(conn, pipeline, tenant, state, now)
                    token, start, where = "", 0, (pipeline, tenant, state)
                    while True:
                        page = queue.list(pipeline=pipeline, tenant=tenant, state=state, page_size=page_size,
                                          page_token=token)
                        chunk = expected[start:start + page_size]
                        assert [r.review_id for r in page.reviews] == [rid for _, rid in chunk], where
                        assert page.sla_missed == missed, where
                        more = len(expected) > start + page_size
                        assert page.next_page_token == (paging.encode(chunk[-1][0], where) if more else ""), where
                        if not more:
                            break
                        token, start = page.next_page_token, start + page_size


def _check_claims(queue: ReviewQueue, db, now: int) -> None:
    """ClaimNextReview takes the oldest OPEN review of its filters, as a walk of every review finds it."""
    for pipeline, tenant in (("", ""), ("p1", ""), ("", "t2"), ("p0", "t1"), ("rare", ""), ("", "rare")):
        with db.read() as conn:
            expected = _old_rows(conn, pipeline, tenant, "OPEN", now)
        if not expected:
            with pytest.raises(NotFound):
                queue.claim_next("carol", 60, pipeline=pipeline, tenant=tenant)
            continue
        got = queue.claim_next("carol", 60, pipeline=pipeline, tenant=tenant)
        assert got.review_id == expected[0][1], (pipeline, tenant)


@pytest.fixture
def store(tmp_path):
    clock = SettableClock(NOW)
    db = open_database(tmp_path / "var")
    queue = ReviewQueue(db, clock=clock)
    yield db, queue, clock
    queue.close()
    db.close()


def test_every_listing_claim_and_sla_count_is_what_a_walk_of_every_review_finds(store):
    db, queue, clock = store
    db.reviews.insert_many(_reviews(2500), durable=False)
    with db.write() as conn:
        conn.execute("UPDATE reviews SET delivered = 1 WHERE resolved > 0")
    _check_every_listing(queue, db, clock())
    _check_claims(queue, db, clock())
    clock.advance(200)  # leases run out (the 30 s ones, and the claims above), more SLAs pass
    _check_every_listing(queue, db, clock(), page_size=500)
    _check_claims(queue, db, clock())
    queue.withdraw(queue.list(state="OPEN", tenant="t1").reviews[0].review_id, "its task was cancelled")
    assert db.reviews.delete_resolved_before(clock() + 3600 * S, 300) == 300  # retention, as it deletes
    _check_every_listing(queue, db, clock(), page_size=1000)  # (the largest page: 1,001 positions looked up)


def test_a_store_at_schema_9_with_reviews_migrates_and_lists_as_before(tmp_path):
    folder = tmp_path / "var"
    folder.mkdir()
    conn = sqlite3.connect(folder / "kernel.sqlite3", isolation_level=None)
    migrate(conn, MIGRATIONS[:9], "the test's store")  # as the release before schema version 10 left it
    conn.execute("BEGIN")
    conn.executemany(_INSERT, [_row(review) for review in _reviews(1500)])
    conn.execute("COMMIT")
    conn.execute("UPDATE reviews SET delivered = 1 WHERE resolved > 0")
    gauges_before = {pipeline: (unresolved, with_sla) for pipeline, unresolved, with_sla in conn.execute(
        "SELECT pipeline, unresolved, with_sla FROM review_backlog")}
    conn.close()
    clock = SettableClock(NOW)
    with open_database(folder) as db:
        assert db.schema_version == latest_version() == 10
        with db.read() as conn:
            kept = conn.execute("SELECT pipeline, tenant, unresolved, with_sla FROM review_backlog"
                                " ORDER BY pipeline, tenant").fetchall()
            counted = conn.execute("SELECT pipeline, tenant, count(*), count(*) FILTER (WHERE sla_deadline_unix_ns > 0)"
                                   " FROM reviews WHERE resolved = 0 GROUP BY pipeline, tenant"
                                   " ORDER BY pipeline, tenant").fetchall()
            assert kept == counted
            indexes = {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
            assert "reviews_by_filter" not in indexes and {"reviews_by_tenant", "reviews_withdrawn_at"} <= indexes
        gauges = db.reviews.gauges(NOW)
        assert {p: (g["open"] + g["claimed"]) for p, g in gauges.items()} == \
            {p: unresolved for p, (unresolved, _) in gauges_before.items()}
        queue = ReviewQueue(db, clock=clock)
        try:
            _check_every_listing(queue, db, NOW, page_size=400)
            _check_claims(queue, db, NOW)
            db.reviews.insert_many(_reviews(300, seed=9, first=1500), durable=False)  # the triggers count new rows
            _check_every_listing(queue, db, NOW, page_size=400)
        finally:
            queue.close()


def _claim(queue: ReviewQueue, pipeline: str, tenant: str) -> None:
    try:
        queue.claim_next("dan", 60, pipeline=pipeline, tenant=tenant)
    except NotFound:
        pass  # (none open for these filters)


def _plans(db, read) -> list[tuple[str, str]]:
    """``(statement, its plan)`` of every statement ``read(queue)`` runs on the store's one reader."""
    statements: list[str] = []
    with db.read() as conn:
        conn.set_trace_callback(statements.append)
    try:
        read()
    finally:
        with db.read() as conn:
            conn.set_trace_callback(None)
            return [(sql, " | ".join(row[-1] for row in conn.execute("EXPLAIN QUERY PLAN " + sql)))
                    for sql in statements if sql.lstrip().upper().startswith("SELECT")]


def test_a_page_of_waiting_or_a_tenants_reviews_a_claim_and_a_count_read_index_ranges(tmp_path):
    """No full scan of the reviews or of an index of them, and no sort but of the reviews claimed at some time
    (a lease running or run out: bounded by the claims, not by the backlog)."""
    db = open_database(tmp_path / "var", read_connections=1)
    queue = ReviewQueue(db, clock=lambda: NOW)
    try:
        db.reviews.insert_many(_reviews(600), durable=False)

        def read() -> None:
            for pipeline in ("", "p0", "rare"):
                for tenant in ("", "t1"):
                    for state in ("OPEN", "UNRESOLVED", "CLAIMED") + (("", "RESOLVED") if tenant else ()):
                        queue.list(pipeline=pipeline, tenant=tenant, state=state, page_size=20)
                    _claim(queue, pipeline, tenant)
            for state in ("", "RESOLVED"):  # (no tenant: the table in list order, as before; its count from counts)
                queue.sla_missed_count(pipeline="p1", state=state)

        plans = _plans(db, read)
        assert len(plans) > 50
        for sql, plan in plans:
            if "FROM review_backlog" in sql and "reviews" not in sql.replace("review_backlog", ""):
                continue  # (the counts per pipeline and tenant: a row each)
            if "seq IN ()" in sql:
                continue  # (no position matched: SQLite's plan says SCAN, but an empty IN reads no row)
            assert "SCAN reviews" not in plan and "SCAN review_counts" not in plan.replace(
                "LIST SUBQUERY", ""), (sql, plan)
            if "TEMP B-TREE" in plan:
                assert "lease_expires_unix_ns >" in sql or "lease_expires_unix_ns <" in sql, (sql, plan)
    finally:
        queue.close()
        db.close()


def _backlog(waiting: int):
    """The same 60 history reviews and 20 of each kind waiting at the head, then ``waiting`` more, all overdue."""
    def fill(conn: sqlite3.Connection) -> None:
        head = _reviews(200, seed=3)
        tail = []
        for n in range(waiting):
            review = kpb.Review(review_id=f"w{n:06d}", state="OPEN", created_unix_ns=NOW - 7200 * S,
                                sla_deadline_unix_ns=NOW - 60 * S, actions=["approve"],
                                pipeline=("p0", "p1")[n % 2], tenant=("t0", "t1", "t2")[n % 3])
            tail.append(review)
        conn.executemany(_INSERT, [_row(review) for review in head + tail])
        conn.commit()
    return fill


def test_the_work_of_a_page_a_claim_or_a_count_does_not_grow_with_the_backlog(tmp_path):
    def read(db) -> None:
        queue = ReviewQueue(db, clock=lambda: NOW)
        for pipeline, tenant in (("", ""), ("p1", ""), ("", "t2"), ("rare", ""), ("", "rare"), ("p0", "rare")):
            for state in ("OPEN", "UNRESOLVED", "CLAIMED"):
                queue.list(pipeline=pipeline, tenant=tenant, state=state, page_size=10)
            _claim(queue, pipeline, tenant)
        for tenant in ("t1", "rare"):
            for state in ("", "RESOLVED"):
                queue.list(tenant=tenant, state=state, page_size=10)
        queue.close()

    few = read_steps(tmp_path / "few", _backlog(300), read)
    many = read_steps(tmp_path / "many", _backlog(6000), read)
    assert many <= few + 5, (few, many)  # (sorting or counting the backlog: thousands of steps more)
