"""aios_reviews_resolved_late is read from a count kept as review rows change (schema version 7), not counted over
the resolved reviews at each scrape: a scrape costs the same at 10 k or 1 M of them (it took 159 ms at 1 M late
ones, growing with the store's history, every 15 s per scraper).

Real SQLite files; the count is checked against a direct count of the rows after every kind of change."""

from __future__ import annotations

import sqlite3

from test_review_queue import S, SettableClock, escalate

from kernel.review import ReviewQueue
from kernel.store import open_database
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
    steps = []

    def work_at(late: int) -> int:
        db = open_database(tmp_path / str(late), read_connections=1)  # (one reader: the one traced below)
        try:
            with sqlite3.connect(db.path) as conn:
                _late_rows(conn, late)
            with db.read() as conn:
                conn.set_progress_handler(lambda: steps.append(1), 100)  # every 100 SQLite VM instructions
            steps.clear()
            assert db.reviews.gauges(0) == {f"p{i}": {"open": 0, "claimed": 0, "overdue": 0, "resolved_late": late // 2}
                                           for i in range(2)}
            return len(steps)
        finally:
            db.close()

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
