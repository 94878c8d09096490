"""Review records in SQLite: whole ``Review`` protos, changed by atomic read-modify-write.

The storage interface ``kernel.review.ReviewQueue`` needs (a key-value store
with revisions does ``update`` as a get and compare-and-set loop). A review's
effective state depends on the time (a lease runs out), so the filters take
``now_unix_ns``: CLAIMED means unresolved with a lease expiring after now,
OPEN means unresolved without one.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
from collections.abc import Callable

from .._proto.aios.kernel.v1 import kernel_pb2 as kpb
from .. import paging
from ..errors import FailedPrecondition, quote

AfterCommit = Callable[[object], None] | None
# An insert's after-commit hook: (its result, the highest position handed out as of the write: see _highest_position)
AfterInsert = Callable[[object, int], None] | None

RESOLVED = "RESOLVED"
# How many of the oldest matching reviews ``update_oldest`` looks up before its transaction: enough for a desk of
# reviewers claiming at once to find one each without a look of their own inside it.
OLDEST_CANDIDATES = 32

# The ``resolved`` column: 0 while a reviewer may still decide the case; 1 once one did; 2 once the kernel
# withdrew it (its task was cancelled: RESOLVED with no action). A withdrawn case was taken away from the desk,
# so it never counts as an SLA the desk missed; it is still listed under RESOLVED.
UNRESOLVED_ROW, RESOLVED_ROW, WITHDRAWN_ROW = 0, 1, 2

# state filter -> (SQL condition, whether it uses now)
_STATE_SQL = {
    "": ("1", False),
    "OPEN": ("resolved = 0 AND lease_expires_unix_ns <= ?", True),
    "CLAIMED": ("resolved = 0 AND lease_expires_unix_ns > ?", True),
    "UNRESOLVED": ("resolved = 0", False),
    "RESOLVED": ("resolved > 0", False),
}
STATE_FILTERS = tuple(name for name in _STATE_SQL if name)

# A review missed its SLA if it was resolved after its deadline, or is still unresolved past it (counted from kept
# counts and index ranges: ``count_sla_missed``). Withdrawn reviews (resolved = 2) count neither way.
_RESOLVED_LATE = "resolved = 1 AND sla_deadline_unix_ns > 0 AND resolved_unix_ns > sla_deadline_unix_ns"
_UNRESOLVED_LATE = "resolved = 0 AND sla_deadline_unix_ns > 0 AND ? > sla_deadline_unix_ns"
_MAY_BE_RESOLVED = ("", "RESOLVED")  # the state filters whose rows include resolved reviews


def withdrawn(review: kpb.Review) -> bool:
    """Taken off the queue by the kernel (``ReviewQueue.withdraw``): RESOLVED, but with no action."""
    return review.state == RESOLVED and not review.resolved_action


def _resolved_column(review: kpb.Review) -> int:
    if review.state != RESOLVED:
        return UNRESOLVED_ROW
    return WITHDRAWN_ROW if withdrawn(review) else RESOLVED_ROW


def _where(pipeline: str, tenant: str, state: str, now_unix_ns: int) -> tuple[str, list]:
    condition, uses_now = _STATE_SQL[state]
    clauses, args = [condition], [now_unix_ns] if uses_now else []
    if pipeline:
        clauses.append("pipeline = ?")
        args.append(pipeline)
    if tenant:
        clauses.append("tenant = ?")
        args.append(tenant)
    return " AND ".join(clauses), args


# A filtered read of waiting reviews, or of one tenant's, goes through ranges of an index whose entries are in list
# order (an entry ends with the position, the rowid, so equal keys are in list order): it merges them, reading each
# only as far as the page needs, never sorting the backlog or walking the whole history (schema.py, version 10).
# Each range names its index: SQLite refuses the query rather than read every review if it cannot use it.
_WAITING = "reviews INDEXED BY reviews_unresolved_by_lease"  # (lease_expires_unix_ns, pipeline) WHERE resolved = 0
_BY_TENANT = "reviews INDEXED BY reviews_by_tenant"  # (tenant, resolved)
# (sla_deadline_unix_ns, pipeline, tenant, resolved) WHERE resolved = 0
_BY_SLA = "reviews INDEXED BY reviews_unresolved_by_sla"
# the ``resolved`` values of a state filter's rows
_ROWS = {"": (UNRESOLVED_ROW, RESOLVED_ROW, WITHDRAWN_ROW), "UNRESOLVED": (UNRESOLVED_ROW,),
         "OPEN": (UNRESOLVED_ROW,), "RESOLVED": (RESOLVED_ROW, WITHDRAWN_ROW)}


def _ranges(conn, pipeline: str, tenant: str, state: str, now_unix_ns: int) -> list[tuple[str, str, list]] | None:
    """``(table, condition, args)`` of each index range holding the filter's reviews, or None for the table itself
    (every state, or RESOLVED, without a tenant: read in list order, as before).

    A tenant's reviews: its reviews_by_tenant range of each ``resolved`` value (its waiting ones read without its
    history, its history without the backlog). The other waiting reviews: each pipeline's never claimed ones (lease
    0, in list order), and those a reviewer claimed at some time (a lease running or run out: as many as claims not
    resolved, not the backlog), sorted; CLAIMED, the running leases. (A lease is never below 0: a look for one.)"""
    if state == "CLAIMED" or (state in ("OPEN", "UNRESOLVED") and not tenant):
        if state == "CLAIMED":
            leases = [("lease_expires_unix_ns > ?", [now_unix_ns])]
        elif state == "OPEN" and now_unix_ns < 0:
            leases = [("lease_expires_unix_ns <= ?", [now_unix_ns])]
        else:
            # (without a pipeline filter, one range a pipeline with waiting reviews: review_backlog names them)
            leases = [("lease_expires_unix_ns = 0", [])] if pipeline else [
                ("lease_expires_unix_ns = 0 AND pipeline = ?", [name]) for (name,) in conn.execute(
                    "SELECT pipeline FROM review_backlog GROUP BY pipeline HAVING sum(unresolved) > 0")]
            leases.append(("lease_expires_unix_ns > 0 AND lease_expires_unix_ns <= ?", [now_unix_ns])
                          if state == "OPEN" else ("lease_expires_unix_ns > 0", []))
            leases.append(("lease_expires_unix_ns < 0", []))
        arms = [(_WAITING, f"resolved = 0 AND {condition}", args) for condition, args in leases]
        narrow = [("tenant", tenant), ("pipeline", pipeline)]
    elif tenant:
        lease, lease_args = (" AND lease_expires_unix_ns <= ?", [now_unix_ns]) if state == "OPEN" else ("", [])
        arms = [(_BY_TENANT, f"tenant = ? AND resolved = {row}{lease}", [tenant, *lease_args]) for row in _ROWS[state]]
        narrow = [("pipeline", pipeline)]
    else:
        return None
    narrowed = "".join(f" AND {column} = ?" for column, value in narrow if value)
    values = [value for _, value in narrow if value]
    return [(table, condition + narrowed, [*args, *values]) for table, condition, args in arms]


def _page_query(conn, columns: str, pipeline: str, tenant: str, state: str, now_unix_ns: int, after_seq: int,
                limit: int) -> tuple[str, list]:
    """The query of ``columns`` of up to ``limit`` matching reviews after position ``after_seq``, oldest first. Run
    in the read transaction that ran this: the positions of a merge of ranges are read here (their first ``limit``
    in list order), then the rows at them."""
    ranges = _ranges(conn, pipeline, tenant, state, now_unix_ns)
    if ranges is None:
        where, args = _where(pipeline, tenant, state, now_unix_ns)
        return (f"SELECT {columns} FROM reviews WHERE seq > ? AND {where} ORDER BY seq LIMIT ?",
                [after_seq, *args, limit])
    cursors = [conn.execute(f"SELECT seq FROM {table} WHERE {condition} AND seq > ? ORDER BY seq LIMIT ?",
                            (*args, after_seq, limit)) for table, condition, args in ranges]
    positions = [seq for (seq,) in itertools.islice(heapq.merge(*cursors), limit)]
    for cursor in cursors:
        cursor.close()
    # (The positions written out, not bound: up to 1,001 of them, past the 999 variables older SQLite builds allow.)
    listed = ", ".join(str(int(seq)) for seq in positions)
    return f"SELECT {columns} FROM reviews WHERE seq IN ({listed}) ORDER BY seq", []


@contextlib.contextmanager
def _one_read(conn):
    """One read transaction for several statements (the ranges, the rows at their positions, the counts: they
    agree), unless ``conn`` is in one already."""
    began = not conn.in_transaction
    if began:
        conn.execute("BEGIN")
    try:
        yield conn
    finally:
        if began:
            conn.execute("COMMIT")


def _columns(review: kpb.Review) -> tuple:
    return (
        review.pipeline, review.tenant, _resolved_column(review), review.lease_expires_unix_ns,
        review.sla_deadline_unix_ns, review.resolved_unix_ns,
    )


RECORDED_BEFORE = "reviews.recorded_before_audit_sequence"
# The highest position retention deleted a review at (a meta row, raised by each sweep): a watch resuming at or
# below it may have missed a review that is gone (ReviewQueue.watch refuses it).
DELETED_THROUGH = "reviews.deleted_through_seq"
# The highest position a review stored without an fsync may take (a meta row, raised durably ahead of them,
# RESERVE_BLOCK at a time). Such rows are sent to watches at their commit, and a power cut (not a kill) takes them
# back with SQLite's position counter: the next start moves the counter up to this mark (skip_reserved_positions),
# so that no position a watch was sent is handed out again (a reopened review takes a new one).
RESERVED_THROUGH = "reviews.positions_reserved_through"
RESERVE_BLOCK = 4096


class _Unreserved(Exception):
    """A write without an fsync would hand out positions past ``RESERVED_THROUGH``: rolled back, to reserve first."""

    def __init__(self, highest: int):
        super().__init__(highest)
        self.highest = highest


def _meta_value(conn, key: str) -> int:
    found = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return 0 if found is None else int(found[0])


# Set once the rows of reviews withdrawn before the column told them apart (resolved = 1) were given WITHDRAWN_ROW.
WITHDRAWN_MARKED = "reviews.withdrawn_rows_marked"


def _mark_withdrawn_rows(conn) -> None:
    """Once per database: the reviews an older kernel withdrew (stored as resolved = 1) get WITHDRAWN_ROW, so
    they stop counting as missed SLAs. Only their bodies tell them apart, hence this pass instead of a SQL
    migration; it reads the resolved rows once."""
    if conn.execute("SELECT 1 FROM meta WHERE key = ?", (WITHDRAWN_MARKED,)).fetchone() is not None:
        return
    rows = conn.execute("SELECT review_id, body FROM reviews WHERE resolved = ?", (RESOLVED_ROW,)).fetchall()
    ids = [(review_id,) for review_id, body in rows if withdrawn(kpb.Review.FromString(body))]
    conn.executemany(f"UPDATE reviews SET resolved = {WITHDRAWN_ROW} WHERE review_id = ?", ids)
    conn.execute("INSERT INTO meta (key, value) VALUES (?, 1)", (WITHDRAWN_MARKED,))


def _raise_mark(conn, key: str, value: int) -> None:
    conn.execute("INSERT INTO meta (key, value) VALUES (?, ?) "
                 "ON CONFLICT (key) DO UPDATE SET value = max(value, excluded.value)", (key, int(value)))


_INSERT = (
    "INSERT INTO reviews (review_id, pipeline, tenant, resolved, lease_expires_unix_ns,"
    " sla_deadline_unix_ns, resolved_unix_ns, task_id, delivered, revision, body)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0, 1, ?)"
)


def _row(review: kpb.Review) -> tuple:
    review.ClearField("sequence")  # (the row's position, set once stored: a retried write must not store an old one)
    return (review.review_id, *_columns(review), review.task_id, review.SerializeToString())


# "task_id != ''" lets SQLite use the partial index reviews_by_task for a bound task id: without it, a scan of every
# review (103 ms at 100 k reviews, inside the cancel's write transaction: a review audit).
_BY_TASK = "SELECT body, seq FROM reviews WHERE task_id = ? AND task_id != ''"


def _review(body: bytes, seq: int) -> kpb.Review:
    """A stored review with its position (``Review.sequence``, where WatchReviews resumes): the position is the
    row's, never in the stored body."""
    review = kpb.Review.FromString(body)
    review.sequence = seq
    return review


def _highest_position(conn) -> int:
    """The highest position (``seq``) the table has handed out, this transaction's rows included (AUTOINCREMENT keeps
    it in sqlite_sequence): every review at or below it was stored by this write or one committed before it."""
    found = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'reviews'").fetchone()
    return 0 if found is None else found[0]


def _with_position(after_commit: AfterInsert, work: Callable) -> tuple[Callable, AfterCommit]:
    """``work`` returning its result with ``_highest_position``, and ``after_commit`` given both."""
    def positioned(conn):
        return work(conn), _highest_position(conn)
    return positioned, None if after_commit is None else (lambda done: after_commit(*done))


def _insert(conn, review: kpb.Review) -> tuple[kpb.Review, bool]:
    if review.task_id:
        found = conn.execute(_BY_TASK, (review.task_id,)).fetchone()
        if found is not None:
            return _review(*found), False
    review.sequence = conn.execute(_INSERT, _row(review)).lastrowid  # (after the body was serialized: not in it)
    return review, True


def _mutate_row(conn, review_id: str, found: tuple, mutate: Callable[[kpb.Review], bool],
                delivered: bool | None) -> tuple[kpb.Review, bool, bool]:
    """``mutate`` the review read as ``(body, revision, delivered, seq)`` and write it back (see ``update``)."""
    review, revision, was_delivered = kpb.Review.FromString(found[0]), found[1], bool(found[2])
    was_resolved = review.state == RESOLVED
    if not mutate(review):
        review.sequence = found[3]
        return review, False, was_delivered
    if not was_resolved and review.task_id and _resolved_column(review) == RESOLVED_ROW:
        _refuse_if_task_cancelled(conn, review)
    now_delivered = was_delivered if delivered is None else delivered
    conn.execute(
        "UPDATE reviews SET pipeline = ?, tenant = ?, resolved = ?, lease_expires_unix_ns = ?,"
        " sla_deadline_unix_ns = ?, resolved_unix_ns = ?, delivered = ?, revision = ?, body = ?"
        " WHERE review_id = ?",
        (*_columns(review), int(now_delivered), revision + 1, review.SerializeToString(), review_id),
    )
    review.sequence = found[3]  # (the row's position, set once the body is written: never in it)
    return review, True, now_delivered


def _refuse_if_task_cancelled(conn, review: kpb.Review) -> None:
    """A reviewer's resolution and a cancel of the review's task have one winner, decided here, inside the
    resolution's transaction (``sqlite_tasks`` checks the other way inside the cancel's): a cancel commits
    before the review is withdrawn, and while the attempt that opened it still runs the task does not even name
    it yet (a race audit: both were answered OK, the resolution recorded for a task the caller saw cancelled)."""
    found = conn.execute("SELECT state FROM tasks WHERE task_id = ?", (review.task_id,)).fetchone()
    if found is not None and found[0] == kpb.CANCELLED:
        raise FailedPrecondition(f"review {quote(review.review_id)} can no longer be resolved: its task "
                                 f"{quote(review.task_id)} was cancelled; there is nothing to decide")


def task_review(conn, task_id: str) -> kpb.Review | None:
    """The review a task opened, if any (a task has at most one)."""
    found = conn.execute(_BY_TASK, (task_id,)).fetchone()
    return None if found is None else _review(*found)


def review_by_id(conn, review_id: str) -> kpb.Review | None:
    found = conn.execute("SELECT body, seq FROM reviews WHERE review_id = ?", (review_id,)).fetchone()
    return None if found is None else _review(*found)


# Reviews retention deletes: resolved by a reviewer (and delivered), or withdrawn (their task was cancelled: they
# keep the case's request, free text included, as long as any other; a review audit found them kept for good).
# A resolved review stays while a task that opened or adopted it has not finished: the review is what refuses that
# task's cancel (sqlite_tasks._refuse_if_resolved), so deleting it first would let a cancel and the reviewer's
# action both win.
_PAST_RETENTION = (
    "SELECT seq, review_id FROM reviews INDEXED BY reviews_resolved_at WHERE resolved = 1 AND delivered = 1"
    " AND resolved_unix_ns < ?1"
    " AND NOT EXISTS (SELECT 1 FROM tasks WHERE tasks.task_id = reviews.task_id AND tasks.finished_unix_ns = 0)"
    " AND NOT EXISTS (SELECT 1 FROM tasks INDEXED BY tasks_by_review WHERE tasks.review_id = reviews.review_id"
    " AND tasks.review_id != '' AND tasks.finished_unix_ns = 0)"
    " UNION ALL SELECT seq, review_id FROM reviews INDEXED BY reviews_withdrawn_at WHERE resolved = 2"
    " AND resolved_unix_ns < ?1 LIMIT ?2")


class SqliteReviewRecords:
    """Durable review records; every write is fsynced before it returns.

    Writes are group-committed with other writers (``Database.transact``);
    ``after_commit(result)``, if given, runs once the write is durable, in
    commit order, before the call returns: the review queue publishes its
    change feed there.
    """

    def __init__(self, db):
        self._db = db
        with db.read() as conn:  # (a write only the first time: opening a database must not write each time)
            marked = conn.execute("SELECT 1 FROM meta WHERE key = ?", (WITHDRAWN_MARKED,)).fetchone() is not None
        if not marked:
            db.transact(_mark_withdrawn_rows)

    def insert(self, review: kpb.Review, after_commit: AfterInsert = None) -> tuple[kpb.Review, bool]:
        """Store a new review; ``(review, True)``, or ``(existing, False)`` if its task already has one.

        ``after_commit(result, position)``: ``position`` is the highest
        position handed out as of this write (``_highest_position``), so a
        watcher of new reviews can tell those it will hear of from those
        stored before it began (``ReviewQueue.watch``)."""
        work, after_commit = _with_position(after_commit, lambda conn: _insert(conn, review))
        return self._db.transact(work, after_commit=after_commit)[0]

    def highest_position(self) -> int:
        """The highest position handed out so far (0 if none): see ``insert``."""
        with self._db.read() as conn:
            return _highest_position(conn)

    def skip_reserved_positions(self) -> None:
        """At start: move the position counter up to the reserved mark (durably; see ``RESERVED_THROUGH``), past
        every position a review stored without an fsync may have been given before a power cut took it back."""
        def work(conn):
            reserved = _meta_value(conn, RESERVED_THROUGH)
            if _highest_position(conn) < reserved:
                if not conn.execute("UPDATE sqlite_sequence SET seq = ? WHERE name = 'reviews'", (reserved,)).rowcount:
                    conn.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('reviews', ?)", (reserved,))
        with self._db.read() as conn:  # (after a clean stop nothing is to move: no write, no fsync, at the start)
            if _highest_position(conn) >= _meta_value(conn, RESERVED_THROUGH):
                return
        self._db.transact(work)

    def release_reserved_positions(self) -> None:
        """At a clean stop: the reserved mark comes down to the highest position handed out (durably), so that the
        next start skips none. (A later write without an fsync reserves again: ``insert_many`` checks.)"""
        self._db.transact(lambda conn: conn.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (RESERVED_THROUGH, _highest_position(conn))))

    def deleted_through(self) -> int:
        """The highest position of a review retention deleted (0 if none since this mark was kept)."""
        with self._db.read() as conn:
            found = conn.execute("SELECT value FROM meta WHERE key = ?", (DELETED_THROUGH,)).fetchone()
        return 0 if found is None else found[0]

    def insert_many(self, reviews: list[kpb.Review], after_commit: AfterInsert = None, durable: bool = True,
                    recorded_before: Callable[[], int] | None = None) -> list[tuple[kpb.Review, bool]]:
        """``insert`` for each review, all in one transaction: all are stored, or (on an error) none
        (``after_commit(results, position)`` as ``insert``'s).

        ``recorded_before()``, if given, is evaluated inside the transaction and
        raises the stored ``RECORDED_BEFORE`` mark to it (see ``recorded_before``).
        """
        def work(conn):
            if any(review.task_id for review in reviews):  # a task's review may exist already: one by one
                stored = [_insert(conn, review) for review in reviews]
            else:  # one statement for all (decisions' reviews, usually many per background transaction)
                conn.executemany(_INSERT, [_row(review) for review in reviews])
                # (one writer, one statement: the rows took the positions just below the highest, in order)
                first = _highest_position(conn) - len(reviews) + 1
                for offset, review in enumerate(reviews):
                    review.sequence = first + offset
                stored = [(review, True) for review in reviews]
            if recorded_before is not None:
                _raise_mark(conn, RECORDED_BEFORE, recorded_before())
            if not durable:  # (rolled back, and stored again once the positions are reserved)
                highest = _highest_position(conn)
                if highest > _meta_value(conn, RESERVED_THROUGH):
                    raise _Unreserved(highest)
            return stored
        work, after_commit = _with_position(after_commit, work)
        while True:
            try:
                return self._db.transact(work, durable=durable, after_commit=after_commit)[0]
            except _Unreserved as unreserved:  # one durable write per RESERVE_BLOCK positions
                through = unreserved.highest + RESERVE_BLOCK
                self._db.transact(lambda conn, through=through: _raise_mark(conn, RESERVED_THROUGH, through))

    def recorded_before(self) -> int:
        """The audit sequence below which every escalated decision's review row is stored (0 if never set).

        Kept in the same transactions as the rows themselves: SQLite keeps a
        prefix of its committed transactions after a crash, so the mark never
        claims a row that was lost.
        """
        with self._db.read() as conn:
            found = conn.execute("SELECT value FROM meta WHERE key = ?", (RECORDED_BEFORE,)).fetchone()
        return 0 if found is None else int(found[0])

    def mark_recorded_before(self, sequence: int) -> None:
        """Raise the mark to ``sequence`` (durably); it never moves down."""
        self._db.transact(lambda conn: _raise_mark(conn, RECORDED_BEFORE, sequence))

    def lower_recorded_before(self, sequence: int) -> None:
        """Set the mark to ``sequence`` (durably), even below its value: only for a log that lost records."""
        self._db.transact(lambda conn: conn.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (RECORDED_BEFORE, int(sequence))))

    def get(self, review_id: str) -> kpb.Review | None:
        with self._db.read() as conn:
            return review_by_id(conn, review_id)

    def newest_of(self, pipeline: str) -> kpb.Review | None:
        """The pipeline's most recently stored review (its actions are the pipeline's latest known ones)."""
        with self._db.read() as conn:
            found = conn.execute("SELECT body FROM reviews WHERE pipeline = ? ORDER BY seq DESC LIMIT 1",
                                 (pipeline,)).fetchone()
        return None if found is None else kpb.Review.FromString(found[0])

    def for_task(self, task_id: str) -> kpb.Review | None:
        with self._db.read() as conn:
            return task_review(conn, task_id)

    def open_of_cancelled_tasks(self) -> list[tuple[str, str]]:
        """``(review_id, task_id)`` of unresolved reviews whose task is CANCELLED: a kill between a cancel's commit
        and its withdrawal of the task's review leaves one on the desk for good (a crash audit)."""
        with self._db.read() as conn:
            return conn.execute(
                "SELECT reviews.review_id, reviews.task_id FROM reviews JOIN tasks ON tasks.task_id = reviews.task_id"
                " WHERE reviews.resolved = 0 AND reviews.task_id != '' AND tasks.state = ?", (kpb.CANCELLED,),
            ).fetchall()

    def update(self, review_id: str, mutate: Callable[[kpb.Review], bool], delivered: bool | None = None,
               after_commit: AfterCommit = None) -> tuple[kpb.Review, bool, bool] | None:
        """Read the review, let ``mutate`` change it in place, write it back, atomically.

        ``mutate`` returns False to write nothing and may raise to abort;
        ``delivered`` (if not None) sets whether its on_resolved hooks have
        all run. Returns ``(review, changed, delivered)``, None if there is no
        such review.
        """
        def work(conn):
            found = conn.execute(
                "SELECT body, revision, delivered, seq FROM reviews WHERE review_id = ?", (review_id,),
            ).fetchone()
            return None if found is None else _mutate_row(conn, review_id, found, mutate, delivered)

        return self._db.transact(work, after_commit=after_commit)

    def update_oldest(self, pipeline: str, tenant: str, state: str, clock: Callable[[], int],
                      mutate: Callable[[kpb.Review], bool],
                      after_commit: AfterCommit = None) -> tuple[kpb.Review, bool, bool] | None:
        """``update`` of the oldest review matching the filters as of ``clock()``; None if none matches.

        The choice and the write are one transaction (the writer's, serialised with every other write), so
        two callers never change the same review: the second finds the first one's change and takes the next.
        The oldest few matches are looked up before, on a reader: with thousands of reviews waiting that look
        takes milliseconds, which every other writer would wait out; inside, each is checked again by its key.
        """
        with self._db.read() as conn, _one_read(conn):
            candidates = [row[0] for row in conn.execute(
                *_page_query(conn, "review_id", pipeline, tenant, state, clock(), 0, OLDEST_CANDIDATES))]
        if not candidates:
            return None  # none as of the look: no write transaction to hold up the writers for

        def work(conn):
            now = clock()
            where, args = _where(pipeline, tenant, state, now)
            for review_id in candidates:
                found = conn.execute(
                    f"SELECT body, revision, delivered, seq FROM reviews WHERE review_id = ? AND {where}",
                    (review_id, *args)).fetchone()
                if found is not None:
                    return _mutate_row(conn, review_id, found, mutate, None)
            # Every candidate was taken meanwhile (more callers at once than candidates): look here.
            found = conn.execute(*_page_query(conn, "review_id, body, revision, delivered, seq", pipeline, tenant,
                                              state, now, 0, 1)).fetchone()
            return None if found is None else _mutate_row(conn, found[0], found[1:], mutate, None)

        return self._db.transact(work, after_commit=after_commit)

    def lapsed_leases(self, clock: Callable[[], int], after_unix_ns: int,
                      after_commit: AfterCommit = None) -> tuple[int, list[kpb.Review], int]:
        """Unresolved reviews whose lease ran out in (``after_unix_ns``, ``clock()``], oldest lease first.

        Returns ``(now, reviews, next_expiry)``: ``next_expiry`` is the earliest lease still running (0 if
        none). The leases are looked up on a reader (a range of the lease index: no writer waits on
        it); then each lapsed one is read again in a write transaction that writes nothing (and asks for no
        fsync), so that ``after_commit`` publishes it in commit order: one claimed again meanwhile no longer
        has the lease that lapsed and is left out (its claim is the news), and a claim that comes after is
        published after the lapse, never before it.
        """
        now = clock()
        with self._db.read() as conn:
            candidates = conn.execute(
                f"SELECT review_id, lease_expires_unix_ns FROM {_WAITING} WHERE resolved = 0"
                " AND lease_expires_unix_ns > ? AND lease_expires_unix_ns <= ? ORDER BY lease_expires_unix_ns, seq",
                (after_unix_ns, now),
            ).fetchall()
            (next_expiry,) = conn.execute(
                f"SELECT min(lease_expires_unix_ns) FROM {_WAITING} WHERE resolved = 0 AND lease_expires_unix_ns > ?",
                (now,),
            ).fetchone()
        if not candidates:
            return now, [], next_expiry or 0

        def work(conn):
            lapsed = []
            for review_id, lease in candidates:
                found = conn.execute(
                    "SELECT body, seq FROM reviews WHERE review_id = ? AND resolved = 0 AND lease_expires_unix_ns = ?",
                    (review_id, lease),
                ).fetchone()
                if found is not None:
                    lapsed.append(_review(*found))
            return now, lapsed, next_expiry or 0

        return self._db.transact(work, durable=False, after_commit=after_commit)

    def page(self, pipeline: str, tenant: str, state: str, now_unix_ns: int, after_seq: int,
             limit: int, max_bytes: int | None = None) -> list[tuple[int, kpb.Review, int]]:
        """Up to ``limit`` matching reviews after position ``after_seq``, oldest first, with their positions and
        stored sizes; fewer once they pass ``max_bytes`` (``paging.take_rows``, default ``paging.PAGE_BYTES``:
        more may follow)."""
        with self._db.read() as conn, _one_read(conn):
            rows = paging.take_rows(conn.execute(
                *_page_query(conn, "seq, body", pipeline, tenant, state, now_unix_ns, after_seq, limit)),
                limit, max_bytes)
        return [(seq, _review(body, seq), len(body)) for seq, body in rows]

    def count_sla_missed(self, pipeline: str, tenant: str, state: str, now_unix_ns: int) -> int:
        """How many reviews matching the filters missed their SLA (``_RESOLVED_LATE``, ``_UNRESOLVED_LATE``), in
        work that grows with neither the backlog nor the history (row by row, every ListReviews page took ~150 ms at
        200,000 waiting). The waiting ones with an SLA are counted per pipeline and tenant as rows change
        (review_backlog, schema version 10); less those not due yet (the last SLA period's: a range of
        reviews_unresolved_by_sla, whose entries hold the pipeline and tenant) they are the overdue ones; for OPEN
        less, for CLAIMED only, the overdue ones under a running lease (one per reviewer at work). The late resolved
        ones are counted per pipeline as rows change (review_counts, version 7), a tenant's from reviews_sla_missed.
        One read transaction: the parts agree."""
        narrow = [(column, value) for column, value in (("pipeline", pipeline), ("tenant", tenant)) if value]
        keyed = " AND ".join(f"{column} = ?" for column, _ in narrow) or "1"
        narrowed = "".join(f" AND {column} = ?" for column, _ in narrow)
        values = [value for _, value in narrow]
        with self._db.read() as conn, _one_read(conn):
            missed = 0
            if state != RESOLVED:  # (every other filter can match unresolved rows)
                held = 0
                if state in ("OPEN", "CLAIMED"):
                    held = conn.execute(
                        f"SELECT count(*) FROM {_WAITING} WHERE lease_expires_unix_ns > ? AND {_UNRESOLVED_LATE}"
                        f"{narrowed}", (now_unix_ns, now_unix_ns, *values)).fetchone()[0]
                if state == "CLAIMED":
                    return held
                with_sla = conn.execute(f"SELECT coalesce(sum(with_sla), 0) FROM review_backlog WHERE {keyed}",
                                        values).fetchone()[0]
                not_due = conn.execute(  # (a deadline is > 0: from 1 on when the clock reads 0 or less)
                    f"SELECT count(*) FROM {_BY_SLA} WHERE resolved = 0 AND sla_deadline_unix_ns >= ?{narrowed}",
                    (max(now_unix_ns, 1), *values)).fetchone()[0]
                missed += with_sla - not_due - held
            if state in _MAY_BE_RESOLVED:
                if tenant:  # (its range in each pipeline with late ones: review_counts has a row for each)
                    among = "pipeline = ?" if pipeline else "pipeline IN (SELECT pipeline FROM review_counts)"
                    missed += conn.execute(
                        f"SELECT count(*) FROM reviews INDEXED BY reviews_sla_missed WHERE {among} AND tenant = ?"
                        f" AND {_RESOLVED_LATE}", values).fetchone()[0]
                else:
                    missed += conn.execute(f"SELECT coalesce(sum(resolved_late), 0) FROM review_counts WHERE {keyed}",
                                           values).fetchone()[0]
            return missed

    def gauges(self, now_unix_ns: int) -> dict[str, dict[str, int]]:
        """Per pipeline, what an operator's dashboard watches (kernel/observability/metrics.py): ``open`` and
        ``claimed`` cases, ``overdue`` ones (unresolved past their SLA: the desk is missing it now) and
        ``resolved_late`` ones (resolved after it). Read from counts kept by triggers (review_backlog per pipeline
        and tenant, review_counts per pipeline: schema.py, versions 10 and 7) and two index ranges bounded by traffic
        (leases running, SLAs not yet due): never a count over the unresolved or resolved reviews, which grow with
        the backlog and the store's history."""
        by_pipeline: dict[str, dict[str, int]] = {}

        def of(pipeline: str) -> dict[str, int]:
            return by_pipeline.setdefault(pipeline, {"open": 0, "claimed": 0, "overdue": 0, "resolved_late": 0})

        with self._db.read() as conn:
            began = not conn.in_transaction  # (one read transaction: the four reads agree)
            if began:
                conn.execute("BEGIN")
            try:
                for pipeline, unresolved, with_sla in conn.execute(
                    "SELECT pipeline, sum(unresolved), sum(with_sla) FROM review_backlog GROUP BY pipeline",
                ):
                    counts = of(pipeline)
                    counts["open"], counts["overdue"] = unresolved, with_sla
                for pipeline, count in conn.execute(
                    "SELECT pipeline, count(*) FROM reviews INDEXED BY reviews_unresolved_by_lease"
                    " WHERE resolved = 0 AND lease_expires_unix_ns > ? GROUP BY pipeline", (now_unix_ns,),
                ):
                    counts = of(pipeline)
                    counts["claimed"] += count
                    counts["open"] -= count
                for pipeline, count in conn.execute(
                    "SELECT pipeline, count(*) FROM reviews INDEXED BY reviews_unresolved_by_sla"
                    " WHERE resolved = 0 AND sla_deadline_unix_ns >= ? GROUP BY pipeline", (max(now_unix_ns, 1),),
                ):
                    of(pipeline)["overdue"] -= count  # (not due yet)
                for pipeline, count in conn.execute("SELECT pipeline, resolved_late FROM review_counts"):
                    of(pipeline)["resolved_late"] += count
            finally:
                if began:
                    conn.execute("COMMIT")
        return by_pipeline

    def undelivered(self) -> list[kpb.Review]:
        """Resolved reviews whose on_resolved hooks have not all finished (a crash or a failed hook)."""
        with self._db.read() as conn:
            rows = conn.execute(
                "SELECT body FROM reviews WHERE resolved = 1 AND delivered = 0 ORDER BY seq",
            ).fetchall()
        return [kpb.Review.FromString(body) for (body,) in rows]

    def any_resolved_before(self, cutoff_unix_ns: int) -> bool:
        """Whether ``delete_resolved_before`` would delete anything."""
        with self._db.read() as conn:
            found = conn.execute(_PAST_RETENTION, (cutoff_unix_ns, 1)).fetchone()
        return found is not None

    def delete_resolved_before(self, cutoff_unix_ns: int, limit: int) -> int:
        """Delete up to ``limit`` reviews resolved before ``cutoff_unix_ns`` whose resolution reached every hook
        (retention, kernel/store/retention.py), and withdrawn ones, with any resolution kept for a task
        (kernel/decisions.py ``_finish_waiting_task``); returns how many. Open, claimed and still-delivering
        ones stay."""
        def work(conn) -> int:
            found = conn.execute(_PAST_RETENTION, (cutoff_unix_ns, limit)).fetchall()
            conn.executemany("DELETE FROM reviews WHERE seq = ?", [(seq,) for seq, _ in found])
            if found:
                _raise_mark(conn, DELETED_THROUGH, max(seq for seq, _ in found))
            # A keyed decision's resolution parked for a task that might adopt its answer (kernel/decisions.py
            # _resolved) goes with its review.
            conn.executemany("DELETE FROM review_completions WHERE review_id = ?", [(rid,) for _, rid in found])
            return len(found)

        return self._db.transact(work, durable=False)  # (a lost delete is done again by the next sweep)
