"""Task records in SQLite: whole ``Task`` protos, written by compare-and-set on a revision.

This is the storage interface ``kernel.tasks.TaskStore`` needs, kept to what
a key-value store with revisions (NATS JetStream KV) can also offer:
insert-if-absent, get, read-modify-write (here one transaction; there a
get and compare-and-set loop), and a few scans.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from .._proto.aios.kernel.v1 import kernel_pb2 as kpb
from .. import paging
from ..errors import FailedPrecondition, quote
from .sqlite_reviews import review_by_id, task_review

AfterCommit = Callable[[object], None] | None


FINISHED = (kpb.SUCCEEDED, kpb.FAILED, kpb.CANCELLED)  # the states a task never leaves

# A task's rowid is its position: list order and ListTasks' page tokens. The table has no AUTOINCREMENT (a shipped
# schema), and SQLite gives a new row the highest rowid + 1, so once retention deleted the newest tasks the next
# one took a position a page token had already passed, and was never listed after it. Retention records the
# highest rowid it has seen before deleting (meta), and a task is inserted above both that and the table's own.
POSITIONS_TAKEN = "tasks.highest_rowid_deleted"  # (meta key)
_NEXT_POSITION = ("(SELECT MAX(COALESCE((SELECT MAX(rowid) FROM tasks), 0),"
                  f" COALESCE((SELECT value FROM meta WHERE key = '{POSITIONS_TAKEN}'), 0)) + 1)")


def _row(task: kpb.Task) -> tuple:
    return (task.state, task.request.tenant, task.request.idempotency_key, task.review_id)


def _finished_at(task: kpb.Task) -> int:
    """When the task finished (its last change, wall clock), 0 while it may still run: what retention reads."""
    return (task.updated_unix_ns or time.time_ns()) if task.state in FINISHED else 0


def cannot_cancel(task_id: str, review: kpb.Review) -> FailedPrecondition:
    return FailedPrecondition(
        f"task {quote(task_id)} can no longer be cancelled: its review {quote(review.review_id)} was resolved by "
        f"{review.resolved_by} ({quote(review.resolved_action)}), and the task finishes with that action")


def _refuse_if_resolved(conn, task: kpb.Task) -> None:
    """The cancel's half of "a resolution and a cancel have one winner" (``sqlite_reviews`` has the other): a
    review of this task that a reviewer resolved, even before the task named it, refuses the cancel; so does
    the review the task waits on without having opened it (a keyed Decide's escalation the task adopted: it
    names no task, and a race audit found both the resolution and the cancel answered OK)."""
    review = task_review(conn, task.task_id)
    if review is None and task.review_id:
        review = review_by_id(conn, task.review_id)
    if review is not None and review.resolved_action:
        raise cannot_cancel(task.task_id, review)


def page_query(tenant: str, states: tuple[int, ...], after: int, limit: int) -> tuple[str, tuple]:
    """``SqliteTaskRecords.page``'s query and arguments. One tenant's page reads that tenant's index range
    (named: SQLite refuses the query rather than fall back to reading every task; schema version 6)."""
    where, args = ["rowid > ?"], [after]
    if tenant:
        where.append("tenant = ?")
        args.append(tenant)
    if states:
        where.append(f"state IN ({','.join('?' * len(states))})")
        args += states
    table = "tasks" if not tenant else f"tasks INDEXED BY {'tasks_by_tenant_state' if states else 'tasks_by_tenant'}"
    return f"SELECT rowid, body FROM {table} WHERE {' AND '.join(where)} ORDER BY rowid LIMIT ?", (*args, limit)


class SqliteTaskRecords:
    """Durable task records; every write is fsynced before it returns.

    Writes are group-committed with other writers (``Database.transact``);
    ``after_commit(result)``, if given, runs once the write is durable, in
    commit order, before the call returns: the task store publishes its
    change feed there.
    """

    def __init__(self, db):
        self._db = db

    def insert(self, task: kpb.Task, request_hash: str,
               after_commit: AfterCommit = None) -> tuple[kpb.Task, int, str, bool]:
        """Store a new task at revision 1.

        Returns ``(task, revision, request_hash, created)``: when the tenant
        already used the task's idempotency key, the task stored under it
        (with its request hash) and ``created=False``.
        """
        state, tenant, key, review_id = _row(task)
        body = task.SerializeToString()

        def work(conn):
            if key:
                found = conn.execute(
                    "SELECT body, revision, request_hash FROM tasks WHERE tenant = ? AND idempotency_key = ?",
                    (tenant, key),
                ).fetchone()
                if found is not None:
                    return kpb.Task.FromString(found[0]), found[1], found[2], False
            conn.execute(
                "INSERT INTO tasks (rowid, task_id, state, tenant, idempotency_key, request_hash, review_id, revision,"
                f" body, finished_unix_ns) VALUES ({_NEXT_POSITION}, ?, ?, ?, ?, ?, ?, 1, ?, ?)",
                (task.task_id, state, tenant, key, request_hash, review_id, body, _finished_at(task)),
            )
            return task, 1, request_hash, True

        return self._db.transact(work, after_commit=after_commit)

    def by_key(self, tenant: str, key: str) -> tuple[kpb.Task, str] | None:
        """``(task, request_hash)`` of the task ``tenant`` started with idempotency ``key``, or None."""
        with self._db.read() as conn:
            found = conn.execute("SELECT body, request_hash FROM tasks WHERE tenant = ? AND idempotency_key = ?",
                                 (tenant, key)).fetchone()
        return None if found is None else (kpb.Task.FromString(found[0]), found[1])

    def get(self, task_id: str) -> tuple[kpb.Task, int] | None:
        with self._db.read() as conn:
            found = conn.execute("SELECT body, revision FROM tasks WHERE task_id = ?", (task_id,)).fetchone()
        if found is None:
            return None
        return kpb.Task.FromString(found[0]), found[1]

    def update(self, task_id: str, mutate: Callable[[kpb.Task], bool],
               after_commit: AfterCommit = None) -> tuple[kpb.Task, int, bool] | None:
        """Read the task, let ``mutate`` change it in place, write it back, atomically.

        ``mutate`` returns False to leave the record as it was (nothing is
        written) and may raise to abort. Returns ``(task, revision, changed)``,
        or None when there is no such task.
        """
        def work(conn):
            found = conn.execute("SELECT body, revision FROM tasks WHERE task_id = ?", (task_id,)).fetchone()
            if found is None:
                return None
            task, revision = kpb.Task.FromString(found[0]), found[1]
            was_cancelled = task.state == kpb.CANCELLED
            if not mutate(task):
                return task, revision, False
            if task.state == kpb.CANCELLED and not was_cancelled:
                _refuse_if_resolved(conn, task)
            state, _tenant, _key, review_id = _row(task)
            conn.execute(
                "UPDATE tasks SET state = ?, review_id = ?, revision = ?, body = ?, finished_unix_ns = ?"
                " WHERE task_id = ?",
                (state, review_id, revision + 1, task.SerializeToString(), _finished_at(task), task_id),
            )
            return task, revision + 1, True

        return self._db.transact(work, after_commit=after_commit)

    def count_in_states(self, states: tuple[int, ...]) -> dict[int, int]:
        """How many tasks are in each of ``states``: read from task_counts (one row per state, kept by triggers:
        schema.py, version 9), the same work at any number of tasks (the metrics endpoint asks at each scrape)."""
        marks = ",".join("?" * len(states))
        with self._db.read() as conn:
            counted = dict(conn.execute(f"SELECT state, tasks FROM task_counts WHERE state IN ({marks})",
                                        states).fetchall())
        return {state: counted.get(state, 0) for state in states}

    def in_states(self, states: tuple[int, ...]) -> list[tuple[kpb.Task, int]]:
        """Tasks in any of ``states``, oldest first."""
        marks = ",".join("?" * len(states))
        with self._db.read() as conn:
            rows = conn.execute(
                f"SELECT body, revision FROM tasks WHERE state IN ({marks}) ORDER BY rowid", states,
            ).fetchall()
        return [(kpb.Task.FromString(body), revision) for body, revision in rows]

    def page(self, tenant: str, states: tuple[int, ...], after: int, limit: int) -> list[tuple[int, kpb.Task, int]]:
        """Up to ``limit`` tasks of ``tenant`` (any: "") in ``states`` (any: ()) after position ``after``, oldest
        first, with their positions (rowids: a new task's is above every task's stored before, deleted ones
        included: ``POSITIONS_TAKEN``) and stored sizes; fewer once they pass ``paging.PAGE_BYTES``
        (``paging.take_rows``: more may follow)."""
        query, args = page_query(tenant, states, after, limit)
        with self._db.read() as conn:
            rows = paging.take_rows(conn.execute(query, args), limit)
        return [(position, kpb.Task.FromString(body), len(body)) for position, body in rows]

    def waiting_on(self, review_id: str) -> tuple[kpb.Task, int] | None:
        with self._db.read() as conn:
            found = conn.execute(
                "SELECT body, revision FROM tasks WHERE review_id = ? AND state = ?",
                (review_id, kpb.WAITING_FOR_REVIEW),
            ).fetchone()
        if found is None:
            return None
        return kpb.Task.FromString(found[0]), found[1]

    def any_finished_before(self, cutoff_unix_ns: int) -> bool:
        """Whether ``delete_finished_before`` would delete anything."""
        with self._db.read() as conn:
            return conn.execute("SELECT 1 FROM tasks INDEXED BY tasks_finished WHERE finished_unix_ns > 0 AND "
                                "finished_unix_ns < ? LIMIT 1", (cutoff_unix_ns,)).fetchone() is not None

    def delete_finished_before(self, cutoff_unix_ns: int, limit: int) -> int:
        """Delete up to ``limit`` tasks that finished before ``cutoff_unix_ns`` (retention,
        kernel/store/retention.py), with any resolution still parked for them; returns how many tasks."""
        def work(conn) -> int:
            found = conn.execute(
                "SELECT task_id, review_id FROM tasks INDEXED BY tasks_finished"
                " WHERE finished_unix_ns > 0 AND finished_unix_ns < ? LIMIT ?", (cutoff_unix_ns, limit),
            ).fetchall()
            if found:  # (positions stay taken: see POSITIONS_TAKEN)
                conn.execute("INSERT INTO meta (key, value) VALUES (?, (SELECT COALESCE(MAX(rowid), 0) FROM tasks))"
                             " ON CONFLICT (key) DO UPDATE SET value = MAX(value, excluded.value)", (POSITIONS_TAKEN,))
            conn.executemany("DELETE FROM tasks WHERE task_id = ?", [(task_id,) for task_id, _ in found])
            conn.executemany("DELETE FROM review_completions WHERE review_id = ?",
                             [(review_id,) for _, review_id in found if review_id])
            return len(found)

        return self._db.transact(work, durable=False)  # (a lost delete is done again by the next sweep)

    # -- resolutions that arrived before (or without) the task waiting for them ------------
    def put_completion(self, review_id: str, decision: kpb.Decision) -> None:
        row = (review_id, decision.SerializeToString(), time.time_ns())

        def work(conn) -> None:
            conn.execute(
                "INSERT OR REPLACE INTO review_completions (review_id, decision, created_unix_ns) VALUES (?, ?, ?)",
                row,
            )

        self._db.transact(work)

    def completion(self, review_id: str) -> kpb.Decision | None:
        with self._db.read() as conn:
            found = conn.execute("SELECT decision FROM review_completions WHERE review_id = ?", (review_id,)).fetchone()
        return None if found is None else kpb.Decision.FromString(found[0])

    def drop_completion(self, review_id: str) -> None:
        def work(conn) -> None:
            conn.execute("DELETE FROM review_completions WHERE review_id = ?", (review_id,))

        self._db.transact(work)
