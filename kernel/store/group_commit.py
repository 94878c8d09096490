"""Group commit for the writer connection: concurrent writes share one transaction and one fsync.

Leader/follower, with no thread of its own::

    caller:    run(work) -> queue it; if no group is being committed, lead one now
    leader:    BEGIN IMMEDIATE
               its own work (no savepoint: it runs first, so a failure rolls back nothing else)
               then the writes that queued meanwhile, each in its own SAVEPOINT: a write that
               raises is rolled back to its savepoint and gets its exception; the rest go on
               (all those queued when it looks, then more while ``group_ms`` has not passed,
               at most ``group_max`` writes)
               COMMIT (synchronous=FULL: one fsync for the whole group)
               after_commit hooks, in commit order -> wake each member with its own result
               -> hand the lead to the oldest writer still queued
    follower:  sleeps until woken with its result, or woken to lead the next group

While a leader's COMMIT waits for its fsync (the sqlite3 module lets go of
the GIL meanwhile), new writers queue, and the next group takes them all: the
more writers arrive, the more each fsync covers. A lone writer never waits
for company: it commits at once, on its own thread, so an idle store costs
what it did before (a writer thread would add a thread hop, 20-60 us here,
to every write). The audit log (``kernel/audit/writer.py``) does the same
with a thread of its own, because it also chains and frames its records.

A group is durable (fsynced) when any write in it asked to be; writes that
did not ask (``durable=False``) join a durable group, and a non-durable group
takes no durable write (that one waits for the next group). Every caller
returns only once its group is committed, so a durable write is on disk when
``run`` returns, exactly as with one transaction per write.

``after_commit`` hooks run on the leader's thread after the commit and
before any member is woken, one group after another: in-process change
feeds published from them see changes in commit order and never see one
that is not committed yet (nor, for a durable write, one not fsynced yet: a
``durable=False`` write is published at its commit, which a power cut may
take back; kernel/review/reopen.py says what that means for reviews).

The database it commits for may look at its file right before each COMMIT
(``before_commit(durable)``: ``Database`` checks the file was not deleted or
replaced) and says what each write of a lost group gets (``lost(exc)``: a
full disk is UNAVAILABLE with a retry hint, damage fail-stops the store).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable

from ..errors import Internal

log = logging.getLogger("aios.store")
_monotonic_ns = time.monotonic_ns

# What a follower is woken for.
_WAITING, _DONE, _LEAD = 0, 1, 2


def _lock_held_elsewhere(exc: BaseException) -> bool:
    """Whether a BEGIN failed because another process held the write lock for the whole busy timeout."""
    return isinstance(exc, sqlite3.OperationalError) and getattr(exc, "sqlite_errorcode", 0) & 0xFF in (5, 6)  # BUSY, LOCKED


class _Write:
    """One caller's write: its work, and then its result or its exception."""

    __slots__ = ("work", "durable", "after_commit", "result", "error", "state", "wake")

    def __init__(self, work, durable: bool, after_commit):
        self.work = work  # None: a ``block`` write, whose caller runs its own statements
        self.durable = durable
        self.after_commit = after_commit
        self.result = None
        self.error: BaseException | None = None
        self.state = _WAITING
        self.wake: threading.Lock | None = None  # held while the caller sleeps; released to wake it

    def outcome(self):
        if self.error is not None:
            raise self.error
        return self.result


class GroupCommit:
    """Queues writes for one connection and commits them in groups (see the module docstring).

    ``begin(durable)`` takes the connection's lock, sets its synchronous level,
    opens a write transaction (BEGIN IMMEDIATE) and returns the connection; if
    it raises (the database is closed, another process holds the write lock)
    it has released the lock. ``end()`` releases the lock.

    ``before_commit(durable)``, if given, runs right before each COMMIT; if it
    raises, the group is lost with that error. ``lost(exc)``, if given, makes
    the error each write of a group lost to ``exc`` gets (a new one per write).
    ``committed()``, if given, runs after each COMMIT that succeeded.

    Counters: ``commits`` (transactions committed), ``durable_commits``,
    ``writes`` (writes committed in them), ``largest_group``.
    """

    def __init__(self, begin: Callable[[bool], sqlite3.Connection], end: Callable[[], None],
                 group_max: int = 256, group_ms: float = 5.0,
                 before_commit: Callable[[bool], None] | None = None,
                 lost: Callable[[BaseException], BaseException] | None = None,
                 committed: Callable[[], None] | None = None):
        if group_max < 1 or group_ms < 0:
            raise ValueError(f"group_max must be >= 1 and group_ms >= 0, got {group_max} and {group_ms}")
        self._begin = begin
        self._end = end
        self._before_commit = before_commit
        self._lost_error = lost or _internal
        self._committed = committed  # after each COMMIT that succeeded (the store takes writes: refusals.py)
        self.group_max = group_max
        self._group_ns = int(group_ms * 1e6)
        self._lock = threading.Lock()  # guards _pending and _leading
        self._pending: deque[_Write] = deque()
        self._leading = False  # a group is being run and committed; new writes queue
        self._leader = 0  # thread ident of the leader, to refuse a write started inside a write
        self.commits = 0
        self.durable_commits = 0
        self.writes = 0
        self.largest_group = 0

    @property
    def queued(self) -> int:
        """Writes waiting for a group (not counting the one being committed)."""
        return len(self._pending)

    # -- entry points ---------------------------------------------------------------------
    def run(self, work: Callable[[sqlite3.Connection], object], durable: bool = True,
            after_commit: Callable[[object], None] | None = None):
        """Run ``work(conn)`` in the next group; its result once committed, or its exception."""
        write = _Write(work, durable, after_commit)
        if self._join(write):
            self._lead(write)
        return write.outcome()

    def begin_block(self, durable: bool) -> tuple[_Write, sqlite3.Connection]:
        """Lead a group whose first write is the caller's own block of statements (``Database.write``).

        The caller runs its statements on the returned connection, inside the
        open transaction, then calls ``end_block``.
        """
        write = _Write(None, durable, None)
        self._join(write)  # a block is never run by another leader: joining returns only to lead
        try:
            conn = self._begin(durable)
        except BaseException:
            self._hand_off()
            raise
        return write, conn

    def end_block(self, write: _Write, conn: sqlite3.Connection, error: BaseException | None) -> None:
        """After the block: roll it back if it raised, else add the queued writes and commit."""
        if error is not None:
            self._abandon(conn)
            return
        self._fill_and_commit(conn, [write], write.durable)

    # -- leadership -----------------------------------------------------------------------
    def _join(self, write: _Write) -> bool:
        """True when ``write`` should lead a group now; False once another leader finished it."""
        me = threading.get_ident()
        with self._lock:
            if self._leading and self._leader == me:
                raise RuntimeError("a write cannot start another write of the same database (nested write)")
            if not self._leading:
                self._leading = True
                self._leader = me
                return True
            write.wake = threading.Lock()
            write.wake.acquire()
            self._pending.append(write)
        write.wake.acquire()  # released by a leader: done, or promoted to lead
        if write.state == _LEAD:
            self._leader = me
            return True
        return False

    def _hand_off(self) -> None:
        with self._lock:
            if self._pending:
                nxt = self._pending.popleft()
                self._leader = 0  # until the new leader is awake and sets its own
                nxt.state = _LEAD
                nxt.wake.release()
            else:
                self._leading = False
                self._leader = 0

    def _take(self, durable: bool, room: int) -> list[_Write]:
        """Queued writes this group can run (not blocks; no durable ones in a non-durable group)."""
        taken: list[_Write] = []
        with self._lock:
            pending = self._pending
            if not pending or room <= 0:
                return taken
            keep: deque[_Write] = deque()
            while pending:
                write = pending.popleft()
                if len(taken) < room and write.work is not None and (durable or not write.durable):
                    taken.append(write)
                else:
                    keep.append(write)
            self._pending = keep
        return taken

    def _lead(self, first: _Write) -> None:
        durable = first.durable
        if not durable:  # a durable write queued already makes this group durable
            with self._lock:
                durable = any(w.durable and w.work is not None for w in self._pending)
        with self._lock:  # (queued before this BEGIN waits: they wait it out with it)
            waited = [write for write in self._pending if write.work is not None]
        try:
            conn = self._begin(durable)
        except BaseException as exc:
            first.error = exc
            if _lock_held_elsewhere(exc):
                self._refuse(waited, exc)
            self._hand_off()
            return
        try:
            first.result = first.work(conn)
        except BaseException as exc:
            first.error = exc
            self._abandon(conn)  # nothing else has run in this transaction yet
            return
        self._fill_and_commit(conn, [first], durable)

    def _refuse(self, waited: list[_Write], exc: BaseException) -> None:
        """The writes that were queued while a BEGIN waited the whole busy timeout for a lock another process holds
        are refused with it (``lost(exc)``: StoreBusy). Handed the lead one after the other, each waited the busy
        timeout again: the Nth queued write was refused after N timeouts, and a stop with six writes queued took
        58 s (a race review). Writes that came meanwhile stay queued: the next one leads another try."""
        with self._lock:
            refused = [write for write in waited if write in self._pending]
            for write in refused:
                self._pending.remove(write)
        for write in refused:
            write.error = self._lost_error(exc)
            write.state = _DONE
            write.wake.release()

    def _abandon(self, conn: sqlite3.Connection) -> None:
        """Roll back a group whose first write failed; the queued writes wait for the next leader."""
        try:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
        finally:
            self._end()
            self._hand_off()

    def _fill_and_commit(self, conn: sqlite3.Connection, group: list[_Write], durable: bool) -> None:
        members: list[_Write] = []  # the writes of this group other than the leader's
        try:
            deadline = _monotonic_ns() + self._group_ns
            while len(group) < self.group_max:
                taken = self._take(durable, self.group_max - len(group))
                if not taken:
                    break
                members.extend(taken)
                for write in taken:
                    group.append(write)
                    if not self._apply(conn, write):
                        self._lost(group, write.error)
                        raise _GroupLost
                if _monotonic_ns() >= deadline:
                    break
            self._commit(conn, group, durable)
        except _GroupLost:
            pass
        except BaseException as exc:  # COMMIT failed (disk full, I/O error): nobody's write is stored
            self._lost(group, exc)
        finally:
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            self._end()
            self._publish(group)
            for write in members:
                write.state = _DONE
                write.wake.release()
            self._hand_off()

    @staticmethod
    def _apply(conn: sqlite3.Connection, write: _Write) -> bool:
        """Run one member's work in its own savepoint; False if SQLite rolled back the whole transaction."""
        conn.execute("SAVEPOINT member")
        try:
            write.result = write.work(conn)
        except BaseException as exc:
            write.error = exc
            if not conn.in_transaction:  # an I/O error or the like: SQLite undid the whole group
                return False
            conn.execute("ROLLBACK TO member")
        conn.execute("RELEASE member")
        return True

    def _commit(self, conn: sqlite3.Connection, group: list[_Write], durable: bool) -> None:
        if self._before_commit is not None:
            self._before_commit(durable)  # raises: the group is lost (the finally of _fill_and_commit rolls back)
        conn.execute("COMMIT")  # with synchronous=FULL: returns once the group is on disk
        if self._committed is not None:
            self._committed()
        self.commits += 1
        self.durable_commits += durable
        stored = sum(1 for w in group if w.error is None)
        self.writes += stored
        if stored > self.largest_group:
            self.largest_group = stored

    def _lost(self, group: list[_Write], exc: BaseException) -> None:
        """The whole group's transaction is gone: every write in it that had succeeded fails too."""
        for write in group:
            if write.error is None:
                write.result = None
                write.error = self._lost_error(exc)

    @staticmethod
    def _publish(group: list[_Write]) -> None:
        for write in group:
            if write.error is None and write.after_commit is not None:
                try:
                    write.after_commit(write.result)
                except Exception:  # a watcher's filter failing must not fail the writes
                    log.exception("an after-commit hook failed")


def _internal(exc: BaseException) -> Internal:
    return Internal(f"the store could not commit this write (nothing of it was kept): {type(exc).__name__}: {exc}")


class _GroupLost(Exception):
    """Internal: the group's transaction was rolled back by SQLite; every member has its error."""
