"""aios_tasks (queued, running, waiting for a review) is read from a count kept per state as task rows change (schema
version 9), not counted over the tasks at each scrape: 255 ms a scrape at 1 M tasks waiting for a review desk
months behind, every 15 s per scraper. Real SQLite files; checked against a direct count of the rows."""

from __future__ import annotations

import sqlite3

from test_tasks_store import decision_request

from kernel._proto.aios.kernel.v1 import kernel_pb2 as kpb
from kernel.store import MIGRATIONS, open_database
from kernel.store.schema import migrate
from kernel.store.sqlite import DATABASE_FILE
from kernel.tasks import TaskStore
from kernel.testing.sqlite_work import read_steps

NOT_FINAL = (kpb.QUEUED, kpb.RUNNING, kpb.WAITING_FOR_REVIEW)
ALL = (*NOT_FINAL, kpb.SUCCEEDED, kpb.FAILED, kpb.CANCELLED)


def _task_rows(conn: sqlite3.Connection, count: int, start: int = 0) -> None:
    """``count`` tasks waiting for a review, every 4th queued, straight into the table."""
    conn.executemany("INSERT INTO tasks (task_id, state, tenant, idempotency_key, request_hash, review_id, revision,"
                     " body) VALUES (?, ?, 't', '', '', '', 0, x'')",
                     ((f"t{start + i}", kpb.QUEUED if i % 4 == 0 else kpb.WAITING_FOR_REVIEW) for i in range(count)))
    conn.commit()


def _counted(db) -> dict[int, int]:
    counts = db.tasks.count_in_states(ALL)
    with db.read() as conn:
        rows = dict(conn.execute("SELECT state, count(*) FROM tasks GROUP BY state").fetchall())
    assert counts == {state: rows.get(state, 0) for state in ALL}
    return {state: n for state, n in counts.items() if n}


def test_a_scrape_reads_the_task_counts_in_work_that_does_not_grow_with_the_tasks(tmp_path):
    def work_at(tasks: int) -> int:
        def read(db) -> None:
            assert db.tasks.count_in_states(NOT_FINAL) == {kpb.QUEUED: tasks // 4, kpb.RUNNING: 0,
                                                       kpb.WAITING_FOR_REVIEW: tasks - tasks // 4}

        return read_steps(tmp_path / str(tasks), lambda conn: _task_rows(conn, tasks), read)

    few, many = work_at(100), work_at(20_000)
    assert many <= few + 2, (few, many)  # (counting over tasks_by_state: ~1,000 more progress calls at 20 k)


def test_the_counts_follow_every_transition_and_retention(tmp_path):
    db = open_database(tmp_path / "var")
    store = TaskStore(db)
    try:
        made = [store.create(decision_request(amount=n))[0] for n in range(4)]
        assert _counted(db) == {kpb.QUEUED: 4}
        store.transition(made[0].task_id, kpb.RUNNING, (kpb.QUEUED,), attempts=1)
        store.transition(made[1].task_id, kpb.RUNNING, (kpb.QUEUED,), attempts=1)
        store.transition(made[1].task_id, kpb.WAITING_FOR_REVIEW, (kpb.RUNNING,))
        store.cancel(made[2].task_id)
        assert store.transition(made[3].task_id, kpb.SUCCEEDED, (kpb.RUNNING,)) is None  # (not running: no change)
        assert _counted(db) == {kpb.QUEUED: 1, kpb.RUNNING: 1, kpb.WAITING_FOR_REVIEW: 1, kpb.CANCELLED: 1}
        store.transition(made[0].task_id, kpb.SUCCEEDED, (kpb.RUNNING,))
        assert db.tasks.delete_finished_before(2**62, 1000) == 2  # retention: the finished ones go
        assert _counted(db) == {kpb.QUEUED: 1, kpb.WAITING_FOR_REVIEW: 1}
    finally:
        db.close()


def test_a_store_from_before_the_count_has_its_tasks_counted_at_the_upgrade(tmp_path):
    (tmp_path / "var").mkdir()
    conn = sqlite3.connect(tmp_path / "var" / DATABASE_FILE)
    migrate(conn, MIGRATIONS[:8], "the test's store")  # as schema version 8 left it
    _task_rows(conn, 301)
    conn.close()
    db = open_database(tmp_path / "var")
    try:
        assert _counted(db) == {kpb.QUEUED: 76, kpb.WAITING_FOR_REVIEW: 225}
        with sqlite3.connect(db.path) as conn:  # another writer's rows count too
            _task_rows(conn, 4, start=301)
            conn.execute("DELETE FROM tasks WHERE task_id = 't0'")
        assert _counted(db) == {kpb.QUEUED: 76, kpb.WAITING_FOR_REVIEW: 228}
    finally:
        db.close()
