"""aios_reviews_resolved_late is read from a count kept as review rows change (schema version 7), not counted over
the resolved reviews at each scrape: a scrape costs the same at 10 k or 1 M of them (it took 159 ms at 1 M late
ones, growing with the store's history, every 15 s per scraper).

Real SQLite files; the count is checked against a direct count of the rows after every kind of change."""

from __future__ import annotations

import sqlite3

from test_review_queue import S, SettableClock, escalate

from kernel.review import ReviewQueue
from kernel.store import open_database
from kernel.testing.sqlite_work import read_steps
from kernel.store.schema import MIGRATIONS, migrate
from kernel.store.sqlite import DATABASE_FILE

LATE = "resolved = 1 AND sla_deadline_unix_ns > 0 AND resolved_unix_ns > sla_deadline_unix_ns"
COLUMNS = ("review_id, pipeline, tenant, task_id, resolved, lease_expires_unix_ns, sla_deadline_unix_ns, "
           "resolved_unix_ns, delivered, revision, body")


def _late_rows(conn: sqlite3.Connection, count: int, start: int = 0) -> None:
    """``count`` reviews resolved after their SLA deadline, over two pipelines, straight into the table."""
    conn.executemany(f"INSERT INTO reviews ({COLUMNS}) VALUES (?, ?, 't', '', 1, 0, 1000, 2000, 1, 0, x'')",
                     ((f"r{start + i}", f"p{i % 2}") for i in range(count)))
    conn.commit()


def _counted(db) -> dict[str, int]:
    """Per pipeline, as the metrics endpoint reads it, and as a count over the rows says it is."""
    gauges = {pipeline: counts["resolved_late"] for pipeline, counts in db.reviews.gauges(0).items()}
    with db.read() as conn:
        rows = dict(conn.execute(f"SELECT pipeline, count(*) FROM reviews WHERE {LATE} GROUP BY 1").fetchall())
    assert {p: n for p, n in gauges.items() if n} == rows
    return gauges


def test_a_scrape_reads_the_late_reviews_count_in_work_that_does_not_grow_with_them(tmp_path):
    def work_at(late: int) -> int:
        def read(db) -> None:
            assert db.reviews.gauges(0) == {f"p{i}": {"open": 0, "claimed": 0, "overdue": 0, "resolved_late": late // 2}
                                       for i in range(2)}

        return read_steps(tmp_path / str(late), lambda conn: _late_rows(conn, late), read)

    few, many = work_at(100), work_at(20_000)
    assert many <= few + 2, (few, many)  # (counting the rows: ~1,000 more progress calls at 20 k)


def test_the_count_follows_late_resolutions_withdrawals_and_retention(tmp_path):
    clock = SettableClock()
    db = open_database(tmp_path / "var")
    queue = ReviewQueue(db, clock=clock)
    try:
        on_time, late, later, withdrawn, other = (escalate(queue, sla=10, amount=n) for n in range(5))
        queue.claim(on_time.review_id, "ann", 60)
        queue.resolve(on_time.review_id, "ann", "approve")
        assert _counted(db) == {"claims": 0}
        clock.advance(11)  # past every 10 s deadline
        for review in (late, later):
            queue.claim(review.review_id, "bob", 60)
            queue.resolve(review.review_id, "bob", "deny")
        queue.withdraw(withdrawn.review_id, "its task was cancelled")  # (never a missed SLA)
        assert _counted(db) == {"claims": 2}
        queue.resolve(later.review_id, "bob", "deny")  # a repeated resolution changes nothing
        assert _counted(db) == {"claims": 2}
        clock.advance(3600)
        assert db.reviews.delete_resolved_before(clock() - 60 * S, 1000) == 4  # retention: only `other` stays
        assert _counted(db) == {"claims": 0}
        assert queue.get(other.review_id).state == "OPEN"
    finally:
        queue.close()
        db.close()


def test_a_store_from_before_the_count_has_its_late_reviews_counted_at_the_upgrade(tmp_path):
    (tmp_path / "var").mkdir()
    conn = sqlite3.connect(tmp_path / "var" / DATABASE_FILE)
    migrate(conn, MIGRATIONS[:6], "the test's store")  # as the release before schema version 7 left it
    _late_rows(conn, 301)
    conn.close()
    db = open_database(tmp_path / "var")
    try:
        assert _counted(db) == {"p0": 151, "p1": 150}
        with sqlite3.connect(db.path) as conn:  # another writer's rows (a restored copy, a tool) count too
            _late_rows(conn, 9, start=301)
        assert _counted(db) == {"p0": 156, "p1": 154}
    finally:
        db.close()


# -- the unresolved ones (schema version 8): open, claimed, overdue ------------------------------------------------
def _unresolved_rows(conn: sqlite3.Connection, count: int, now_ns: int) -> None:
    """``count`` unresolved reviews over two pipelines: every 10th claimed (a lease running past ``now_ns``), every
    3rd overdue (its SLA deadline before ``now_ns``), every 7th with no SLA, the rest due later."""
    def row(i: int):
        lease = now_ns + 60 * S if i % 10 == 0 else 0
        sla = 0 if i % 7 == 0 else now_ns - S if i % 3 == 0 else now_ns + 600 * S
        return f"u{i}", f"p{i % 2}", lease, sla
    conn.executemany(f"INSERT INTO reviews ({COLUMNS}) VALUES (?, ?, 't', '', 0, ?, ?, 0, 0, 0, x'')",
                     (row(i) for i in range(count)))
    conn.commit()


def _expected(db, now_ns: int) -> dict[str, dict[str, int]]:
    """The gauges as a count over every row computes them (what the endpoint read at each scrape before)."""
    expected: dict[str, dict[str, int]] = {}
    with db.read() as conn:
        for pipeline, claimed, overdue, late, count in conn.execute(
            "SELECT pipeline, resolved = 0 AND lease_expires_unix_ns > ?1,"
            " resolved = 0 AND sla_deadline_unix_ns > 0 AND ?1 > sla_deadline_unix_ns, "
            f"{LATE}, count(*) FROM reviews WHERE resolved = 0 OR ({LATE}) GROUP BY 1, 2, 3, 4", (now_ns,),
        ):
            counts = expected.setdefault(pipeline, {"open": 0, "claimed": 0, "overdue": 0, "resolved_late": 0})
            if late:
                counts["resolved_late"] += count
                continue
            counts["claimed" if claimed else "open"] += count
            counts["overdue"] += count if overdue else 0
    return expected


def _agree(db, now_ns: int) -> dict[str, dict[str, int]]:
    gauges = db.reviews.gauges(now_ns)
    assert {p: c for p, c in gauges.items() if any(c.values())} == _expected(db, now_ns)
    return gauges


def test_the_unresolved_reviews_gauges_cost_the_same_at_any_backlog(tmp_path):
    now = 1_700_000_000 * S
    steps = []

    def work_at(backlog: int) -> int:
        db = open_database(tmp_path / str(backlog), read_connections=1)
        try:
            with sqlite3.connect(db.path) as conn:
                _unresolved_rows(conn, backlog, now)
                # (the claims and SLAs not due yet are a range of an index each: kept to 100 whatever the backlog)
                conn.execute("UPDATE reviews SET lease_expires_unix_ns = 0, sla_deadline_unix_ns = ? WHERE rowid > 100"
                             " AND sla_deadline_unix_ns > ?", (now - S, now))
                conn.execute("UPDATE reviews SET lease_expires_unix_ns = 0 WHERE rowid > 100")
            _agree(db, now)
            with db.read() as conn:
                conn.set_progress_handler(lambda: steps.append(1), 100)
            steps.clear()
            db.reviews.gauges(now)
            return len(steps)
        finally:
            db.close()

    few, many = work_at(200), work_at(20_000)
    assert many <= few + 2, (few, many)  # (reading every unresolved row: ~2,000 more progress calls at 20 k)


def test_the_unresolved_counts_follow_claims_lapsed_leases_resolutions_and_withdrawals(tmp_path):
    clock = SettableClock()
    db = open_database(tmp_path / "var")
    queue = ReviewQueue(db, clock=clock)
    try:
        first, second, third, no_sla = (escalate(queue, sla=10 if n < 3 else 0, amount=n) for n in range(4))
        assert _agree(db, clock())["claims"] == {"open": 4, "claimed": 0, "overdue": 0, "resolved_late": 0}
        queue.claim(first.review_id, "ann", 5)
        queue.claim(second.review_id, "bob", 60)
        assert _agree(db, clock())["claims"] == {"open": 2, "claimed": 2, "overdue": 0, "resolved_late": 0}
        clock.advance(11)  # ann's lease lapsed; every SLA passed
        assert _agree(db, clock())["claims"] == {"open": 3, "claimed": 1, "overdue": 3, "resolved_late": 0}
        queue.resolve(second.review_id, "bob", "deny")
        queue.withdraw(third.review_id, "its task was cancelled")
        assert _agree(db, clock())["claims"] == {"open": 2, "claimed": 0, "overdue": 1, "resolved_late": 1}
        _agree(db, 0)  # (any time: before every deadline)
        assert queue.get(no_sla.review_id).state == "OPEN"
    finally:
        queue.close()
        db.close()


def test_a_store_from_before_the_backlog_count_has_its_unresolved_reviews_counted_at_the_upgrade(tmp_path):
    now = 1_700_000_000 * S
    (tmp_path / "var").mkdir()
    conn = sqlite3.connect(tmp_path / "var" / DATABASE_FILE)
    migrate(conn, MIGRATIONS[:7], "the test's store")  # as schema version 7 left it
    _unresolved_rows(conn, 301, now)
    conn.close()
    db = open_database(tmp_path / "var")
    try:
        _agree(db, now)
        with sqlite3.connect(db.path) as conn:  # another writer's rows count too
            _unresolved_rows(conn, 0, now)
            conn.execute("UPDATE reviews SET resolved = 1, resolved_unix_ns = ? WHERE rowid % 5 = 0", (now,))
        _agree(db, now)
        _agree(db, now + 3600 * S)
    finally:
        db.close()
