"""Group commit in the local store: concurrent writes share a transaction and an fsync, each keeps its own outcome.

Real SQLite files in a temporary data directory, real threads. To make a
group form on purpose (rather than hoping the scheduler makes one), a test
starts a write whose work waits on an event: it holds the lead, writers that
arrive meanwhile queue (``db.queued_writes`` counts them), and releasing it
commits them as the next group. The crash test kills a writing process with
SIGKILL and checks that every write it acknowledged is in the file.
"""

from __future__ import annotations

import os
import selectors
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from kernel._proto.aios.kernel.v1 import kernel_pb2 as kpb
from kernel.errors import FailedPrecondition, InvalidArgument
from kernel.review import ReviewQueue
from kernel.store import open_database
from kernel.tasks import TaskStore

ROOT = Path(__file__).resolve().parent.parent
WAIT_S = 10


@pytest.fixture
def db(tmp_path):
    database = open_database(tmp_path / "var")
    yield database
    database.close()


def case(n: int, tenant: str = "acme") -> tuple[kpb.Decision, kpb.DecisionRequest]:
    request = kpb.DecisionRequest(pipeline="claims", tenant=tenant, request_id=f"req-{n}")
    request.fields["amount"].number_value = float(n)
    decision = kpb.Decision(request_id=request.request_id, action="approve", outcome=kpb.ESCALATED,
                            pipeline="claims", tenant=tenant)
    return decision, request


def escalate(queue: ReviewQueue, n: int, task_id: str = "") -> kpb.Review:
    return queue.create(*case(n), ["approve", "deny"], 60.0, task_id=task_id)


def wait_for(predicate, what: str) -> None:
    """Wait (bounded) until ``predicate()`` holds; the test fails if it never does."""
    deadline = time.monotonic() + WAIT_S
    pause = threading.Event()
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        pause.wait(0.001)


class Caller(threading.Thread):
    """Runs ``fn()`` on its own thread and keeps what it returned or raised."""

    def __init__(self, fn):
        super().__init__(daemon=True)
        self.fn = fn
        self.result = self.error = None

    def run(self) -> None:
        try:
            self.result = self.fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            self.error = exc

    def outcome(self):
        self.join(WAIT_S)
        assert not self.is_alive(), "the call did not return"
        if self.error is not None:
            raise self.error
        return self.result


class HeldLead:
    """A write that holds the group's lead until ``release()``: writers arriving meanwhile queue."""

    def __init__(self, db, durable: bool = True, fail: bool = False):
        self.gate, entered = threading.Event(), threading.Event()

        def work(conn):
            entered.set()
            assert self.gate.wait(WAIT_S)
            conn.execute("SELECT 1")
            if fail:
                raise ValueError("the leader's own write fails")
            return "leader"

        self.caller = Caller(lambda: db.transact(work, durable=durable))
        self.caller.start()
        assert entered.wait(WAIT_S)

    def release(self):
        self.gate.set()
        return self.caller


def queue_up(db, fns) -> list[Caller]:
    """Start one caller per fn while a write holds the lead, and wait until all of them are queued."""
    before = db.queued_writes
    callers = [Caller(fn) for fn in fns]
    for caller in callers:
        caller.start()
    wait_for(lambda: db.queued_writes == before + len(callers), f"{len(callers)} queued writes")
    return callers


# -- many writers ----------------------------------------------------------------------------
def test_concurrent_writers_each_get_their_own_result(db):
    queue = ReviewQueue(db)
    threads, per_thread = 16, 20
    start = threading.Barrier(threads)
    made: dict[int, list[kpb.Review]] = {}

    def writer(k: int) -> None:
        start.wait()
        mine = []
        for i in range(per_thread):
            review = escalate(queue, k * 1000 + i)
            queue.get(review.review_id)  # committed when create returns: another connection sees it at once
            mine.append(review)
        made[k] = mine

    commits_before, writes_before = db.commits, db.writes
    workers = [threading.Thread(target=writer, args=(k,)) for k in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(WAIT_S * 3)
    assert sorted(made) == list(range(threads))
    for k, reviews in made.items():
        assert [r.request_id for r in reviews] == [f"req-{k * 1000 + i}" for i in range(per_thread)]
    assert len({r.review_id for rs in made.values() for r in rs}) == threads * per_thread
    assert db.writes - writes_before == threads * per_thread
    assert 1 <= db.commits - commits_before <= threads * per_thread


def test_writers_queued_during_a_commit_share_the_next_one(db):
    queue = ReviewQueue(db)
    lead = HeldLead(db)
    commits, writes = db.commits, db.writes
    callers = queue_up(db, [lambda n=n: escalate(queue, n) for n in range(15)])
    assert db.commits == commits, "nothing commits while the lead is held"
    assert lead.release().outcome() == "leader"
    reviews = [caller.outcome() for caller in callers]
    assert [r.request_id for r in reviews] == [f"req-{n}" for n in range(15)]
    assert db.commits - commits == 1, "16 writes, one transaction (one fsync)"
    assert db.writes - writes == 16
    assert db.stats()["largest_group"] == 16
    db.close()
    with open_database(db.data_dir) as again:  # all of them really are in the file
        assert again.transact(lambda c: c.execute("SELECT count(*) FROM reviews").fetchone()[0]) == 15


def test_a_lone_write_commits_at_once(db):
    commits = db.commits
    assert db.transact(lambda conn: conn.execute("SELECT 41 + 1").fetchone()[0]) == 42
    assert db.commits == commits + 1 and db.queued_writes == 0


def test_group_max_bounds_a_group(tmp_path):
    with open_database(tmp_path, group_max=4) as db:
        queue = ReviewQueue(db)
        lead = HeldLead(db)
        commits = db.commits
        callers = queue_up(db, [lambda n=n: escalate(queue, n) for n in range(10)])
        lead.release().outcome()
        assert len({caller.outcome().review_id for caller in callers}) == 10
        assert db.commits - commits == 3  # 11 writes in groups of at most 4
        assert db.stats()["largest_group"] == 4


def test_group_max_one_is_one_commit_per_write(tmp_path):
    with open_database(tmp_path, group_max=1) as db:
        queue = ReviewQueue(db)
        lead = HeldLead(db)
        commits = db.commits
        callers = queue_up(db, [lambda n=n: escalate(queue, n) for n in range(5)])
        lead.release().outcome()
        for caller in callers:
            caller.outcome()
        assert db.commits - commits == 6


# -- failures stay with their writer -------------------------------------------------------
def test_a_failing_writer_gets_its_own_error_and_the_others_commit(db):
    queue = ReviewQueue(db)
    resolved = escalate(queue, 0)
    queue.claim(resolved.review_id, "ann")
    queue.resolve(resolved.review_id, "ann", "approve")
    db.transact(lambda conn: conn.execute("CREATE TABLE scratch (k INTEGER PRIMARY KEY)"))
    db.transact(lambda conn: conn.execute("INSERT INTO scratch VALUES (1)"))

    def insert_then_collide(conn):
        conn.execute("INSERT INTO scratch VALUES (2)")  # fine alone, but undone with the rest of this write
        conn.execute("INSERT INTO scratch VALUES (1)")  # primary key taken

    lead = HeldLead(db)
    commits = db.commits
    callers = queue_up(db, [
        lambda: escalate(queue, 1),
        lambda: queue.claim(resolved.review_id, "bob"),  # raises inside the write: already resolved
        lambda: escalate(queue, 2),
        lambda: db.transact(insert_then_collide),
        lambda: escalate(queue, 3),
    ])
    lead.release().outcome()
    good = [callers[i].outcome() for i in (0, 2, 4)]
    with pytest.raises(FailedPrecondition, match="already resolved"):
        callers[1].outcome()
    with pytest.raises(sqlite3.IntegrityError):
        callers[3].outcome()
    assert db.commits - commits == 1, "the failures did not cost the group its commit"
    for review in good:
        assert queue.get(review.review_id).state == "OPEN"
    assert queue.get(resolved.review_id).resolved_by == "ann"
    assert db.transact(lambda conn: conn.execute("SELECT k FROM scratch ORDER BY k").fetchall()) == [(1,)]


def test_a_failing_leader_rolls_back_alone(db):
    queue = ReviewQueue(db)
    lead = HeldLead(db, fail=True)
    callers = queue_up(db, [lambda n=n: escalate(queue, n) for n in range(4)])
    with pytest.raises(ValueError, match="leader's own write"):
        lead.release().outcome()
    for caller in callers:
        review = caller.outcome()
        assert queue.get(review.review_id).request_id == review.request_id


def test_a_failing_write_block_rolls_back_alone(db):
    queue = ReviewQueue(db)
    db.transact(lambda conn: conn.execute("CREATE TABLE scratch (k INTEGER PRIMARY KEY)"))
    inside, leave = threading.Event(), threading.Event()

    def block() -> None:
        with db.write() as conn:
            conn.execute("INSERT INTO scratch VALUES (7)")
            inside.set()
            assert leave.wait(WAIT_S)
            raise KeyError("the block fails")

    blocker = Caller(block)
    blocker.start()
    assert inside.wait(WAIT_S)
    callers = queue_up(db, [lambda n=n: escalate(queue, n) for n in range(3)])
    leave.set()
    with pytest.raises(KeyError):
        blocker.outcome()
    assert all(queue.get(caller.outcome().review_id) for caller in callers)
    assert db.transact(lambda conn: conn.execute("SELECT count(*) FROM scratch").fetchone()[0]) == 0


def test_a_write_block_leads_a_group(db):
    queue = ReviewQueue(db)
    inside, leave = threading.Event(), threading.Event()
    commits = db.commits

    def block() -> None:
        with db.write() as conn:
            conn.execute("CREATE TABLE scratch (k INTEGER PRIMARY KEY)")
            inside.set()
            assert leave.wait(WAIT_S)

    blocker = Caller(block)
    blocker.start()
    assert inside.wait(WAIT_S)
    callers = queue_up(db, [lambda n=n: escalate(queue, n) for n in range(5)])
    leave.set()
    blocker.outcome()
    assert len({caller.outcome().review_id for caller in callers}) == 5
    assert db.commits - commits == 1


def test_a_write_cannot_start_another(db):
    with pytest.raises(RuntimeError, match="nested write"):
        db.transact(lambda conn: db.transact(lambda inner: None))
    assert db.transact(lambda conn: "still writable") == "still writable"


def level(conn) -> int:
    return conn.execute("PRAGMA synchronous").fetchone()[0]  # 2 = FULL (fsync at commit), 1 = NORMAL


def test_a_durable_write_never_rides_a_non_durable_commit(db):
    lead = HeldLead(db, durable=False)
    stats = db.stats()
    callers = queue_up(db, [lambda: db.transact(level, durable=False), lambda: db.transact(level, durable=True)])
    lead.release().outcome()
    assert [caller.outcome() for caller in callers] == [1, 2], "the durable write waited for a FULL commit"
    after = db.stats()
    assert after["commits"] - stats["commits"] == 2 and after["durable_commits"] - stats["durable_commits"] == 1


def test_a_queued_durable_write_makes_the_next_group_durable(tmp_path):
    with open_database(tmp_path, group_max=2) as db:
        lead = HeldLead(db, durable=False)
        callers = queue_up(db, [lambda: db.transact(level, durable=False)] * 2 + [lambda: db.transact(level)])
        lead.release().outcome()
        # The held group takes the first (room for one more); the second leads the next group,
        # and the durable write queued behind it makes that group a FULL commit.
        assert [caller.outcome() for caller in callers] == [1, 2, 2]


# -- change feeds ----------------------------------------------------------------------------
def test_review_watchers_hear_of_a_change_only_once_it_is_committed(db):
    queue = ReviewQueue(db)
    watch = queue.watch(updates=True, timeout_s=WAIT_S)
    seen: list[tuple[str, str]] = []
    visible: list[bool] = []

    def listen() -> None:
        for review in watch:
            stored = queue.get(review.review_id)  # through the read pool: another connection; NotFound if not committed
            visible.append(review.state == "OPEN" or stored.claimed_by == review.claimed_by)  # a claim: committed too
            seen.append((review.review_id, review.state))
            if len(seen) == 24:
                return

    listener = threading.Thread(target=listen)
    listener.start()
    lead = HeldLead(db)
    callers = queue_up(db, [lambda n=n: escalate(queue, n) for n in range(12)])
    lead.release().outcome()
    reviews = [caller.outcome() for caller in callers]
    claims = [Caller(lambda r=r: queue.claim(r.review_id, "ann")) for r in reviews]
    for caller in claims:
        caller.start()
    for caller in claims:
        caller.outcome()
    listener.join(WAIT_S)
    watch.close()
    assert len(seen) == 24 and all(visible)
    ids = {r.review_id for r in reviews}
    assert {rid for rid, state in seen[:12]} == ids and {state for _, state in seen[:12]} == {"OPEN"}
    assert {rid for rid, state in seen[12:]} == ids and {state for _, state in seen[12:]} == {"CLAIMED"}


def test_task_watchers_see_every_revision_in_order_under_concurrent_writers(db):
    store = TaskStore(db)
    tasks = [store.create(kpb.DecisionRequest(pipeline="claims", tenant="acme"))[0] for _ in range(8)]
    watches = [store.watch(task.task_id, timeout_s=WAIT_S) for task in tasks]
    flips = 10

    def drive(task_id: str) -> None:
        state = kpb.QUEUED
        for n in range(flips):
            target = kpb.RUNNING if state == kpb.QUEUED else kpb.QUEUED
            assert store.transition(task_id, target, (state,), f"flip {n}") is not None
            state = target
        store.transition(task_id, kpb.SUCCEEDED, (state,), "done")

    drivers = [Caller(lambda t=t: drive(t.task_id)) for t in tasks]
    for driver in drivers:
        driver.start()
    for driver in drivers:
        driver.outcome()
    for watch in watches:
        states = [task.state for task in watch]  # ends after SUCCEEDED
        assert states == [kpb.QUEUED] + [kpb.RUNNING, kpb.QUEUED] * (flips // 2) + [kpb.SUCCEEDED]
    assert db.commits < db.writes, "concurrent transitions shared commits"


def test_changes_of_one_task_from_many_threads_reach_watchers_in_commit_order(db):
    store = TaskStore(db)
    task, _ = store.create(kpb.DecisionRequest(pipeline="claims", tenant="acme"))
    watch = store.watch(task.task_id, timeout_s=WAIT_S)
    threads, each = 8, 10

    def touch(k: int) -> None:  # QUEUED -> QUEUED: every call changes the task (one more history entry)
        for n in range(each):
            assert store.transition(task.task_id, kpb.QUEUED, (kpb.QUEUED,), f"{k}-{n}") is not None

    callers = [Caller(lambda k=k: touch(k)) for k in range(threads)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.outcome()
    store.transition(task.task_id, kpb.CANCELLED, (kpb.QUEUED,), "stop")
    lengths = [len(seen.history) for seen in watch]  # ends after CANCELLED
    # Every change arrives, oldest first: a late publication of an older revision would be dropped.
    assert lengths == list(range(1, threads * each + 3))


# -- create_many -----------------------------------------------------------------------------
def test_create_many_stores_a_batch_in_one_commit(db):
    queue = ReviewQueue(db)
    existing = escalate(queue, 99, task_id="task-1")
    watch = queue.watch(timeout_s=WAIT_S)
    commits = db.commits
    items = [(*case(0), ["approve", "deny"], 60.0), (*case(1), ["approve"], 0, "task-1"),
             (*case(2), ["deny"], 30.0, "task-2"), (*case(3), ("approve", "refer"), 0, "", "named-by-caller")]
    reviews = queue.create_many(items)
    assert db.commits - commits == 1
    assert [r.request_id for r in reviews] == ["req-0", "req-99", "req-2", "req-3"]
    assert reviews[1].review_id == existing.review_id, "a task keeps its one review"
    assert reviews[2].task_id == "task-2" and list(reviews[3].actions) == ["approve", "refer"]
    assert reviews[3].review_id == "named-by-caller" == queue.get("named-by-caller").proposed.review_id
    assert reviews[0].sla_deadline_unix_ns > 0 and reviews[3].sla_deadline_unix_ns == 0
    created = [next(watch).review_id for _ in range(3)]
    assert created == [reviews[0].review_id, reviews[2].review_id, reviews[3].review_id]
    watch.close()
    assert queue.create_many([]) == []


def test_create_many_checks_every_item_before_storing_any(db):
    queue = ReviewQueue(db)
    good = (*case(0), ["approve"], 60.0)
    with pytest.raises(InvalidArgument, match=r"items\[1\]\.actions"):
        queue.create_many([good, (*case(1), [], 60.0)])
    with pytest.raises(InvalidArgument, match=r"items\[2\]\.sla_seconds"):
        queue.create_many([good, good, (*case(2), ["approve"], -1.0)])
    with pytest.raises(InvalidArgument, match=r"items\[0\] must be a tuple"):
        queue.create_many([case(0)])
    assert queue.list().reviews == []


# -- a crash loses no acknowledged write ----------------------------------------------------
CHILD = r"""
import sys, threading
from kernel._proto.aios.kernel.v1 import kernel_pb2 as kpb
from kernel.review import ReviewQueue
from kernel.store import open_database
from kernel.tasks import TaskStore

db = open_database(sys.argv[1])
queue, store = ReviewQueue(db), TaskStore(db)
out = threading.Lock()

def ack(line):
    with out:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

def writer(k):
    n = 0
    while True:
        request = kpb.DecisionRequest(pipeline="claims", tenant="acme", request_id=f"w{k}-{n}")
        decision = kpb.Decision(request_id=request.request_id, action="approve", outcome=kpb.ESCALATED)
        review = queue.create(decision, request, ["approve", "deny"], 60.0)
        ack(f"review {review.review_id}")
        task, _ = store.create(request)
        task = store.transition(task.task_id, kpb.RUNNING, (kpb.QUEUED,), "go")
        ack(f"task {task.task_id} {task.state}")
        n += 1

for k in range(16):
    threading.Thread(target=writer, args=(k,), daemon=True).start()
threading.Event().wait()
"""


def test_a_crash_loses_no_acknowledged_write(tmp_path):
    data = tmp_path / "var"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(data)], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    acked_reviews, acked_tasks = set(), {}
    buffer = b""
    selector = selectors.DefaultSelector()
    selector.register(child.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + 20
    try:
        while len(acked_reviews) < 300 or len(acked_tasks) < 300:
            assert time.monotonic() < deadline and child.poll() is None, child.stderr.read().decode()[-2000:]
            if not selector.select(timeout=1):
                continue
            chunk = os.read(child.stdout.fileno(), 65536)
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")  # the last piece may be cut mid-line: not acknowledged yet
            for line in lines:
                kind, ident, *state = line.decode().split()
                if kind == "review":
                    acked_reviews.add(ident)
                else:
                    acked_tasks[ident] = int(state[0])
        os.kill(child.pid, signal.SIGKILL)  # while its writers are mid-group
    finally:
        if child.poll() is None:
            child.kill()
        child.wait(WAIT_S)
        selector.close()
        child.stdout.close()
        child.stderr.close()
    assert child.returncode == -signal.SIGKILL
    with open_database(data) as db:
        reviews = ReviewQueue(db)
        store = TaskStore(db)
        assert all(reviews.get(rid).review_id == rid for rid in acked_reviews)  # NotFound if one was lost
        for task_id, state in acked_tasks.items():
            assert store.get(task_id).state == state == kpb.RUNNING
        assert db.writes == 0  # (this process wrote nothing; the data came from the killed one)


def test_writes_queued_behind_a_lock_held_elsewhere_are_refused_with_the_leader(tmp_path, monkeypatch):
    """Another process holds kernel.sqlite3's write lock: the leader's BEGIN waits BUSY_TIMEOUT_MS and is refused
    (StoreBusy). The writes queued behind it while it waited were handed the lead one at a time, each waiting the
    whole busy timeout again: the Nth write waited N timeouts (a stop with six writes queued took 58 s where its
    drain said 13, each write refused only after 10 s of its own; a race review). Those queued before the leader
    began waiting are refused with it; a write that arrived meanwhile leads the next attempt.

    Hold point injected on purpose, named so: the first BEGIN starts once the other writers are queued (they came
    while it waited: the next leader's try is theirs too); the busy timeout is cut to 100 ms. The lock is real: another connection's write transaction."""
    from kernel.store import sqlite as sqlite_store
    from kernel.store.faults import StoreBusy

    monkeypatch.setattr(sqlite_store, "BUSY_TIMEOUT_MS", 100)
    db = open_database(tmp_path / "var")
    lock = sqlite3.connect(db.path, isolation_level=None)
    writers, attempts, errors = 6, [], []
    real_begin = db._group._begin

    def begin_once_all_are_queued(durable):  # the named hold point
        if threading.current_thread().name == "aios-store-probe":  # (the refusing store's probe: not a writer's try)
            return real_begin(durable)
        if not attempts:
            assert until_true(lambda: db.queued_writes == writers - 1)
        attempts.append(durable)
        return real_begin(durable)

    def write(n):
        try:
            db.transact(lambda conn: conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, 1)",
                                                  (f"w{n}",)))
        except StoreBusy as exc:
            errors.append(exc)

    try:
        db._group._begin = begin_once_all_are_queued
        lock.execute("BEGIN IMMEDIATE")
        threads = [threading.Thread(target=write, args=(n,)) for n in range(writers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(WAIT_S)
        assert len(errors) == writers  # every one refused as busy (UNAVAILABLE, retry-after-ms)
        assert len(attempts) == 2, f"{len(attempts)} waits of the busy timeout, one after the other"
        lock.execute("ROLLBACK")
        assert until_true(lambda: db.refusing_writes is None)  # the store's probe commits: it takes writes again
        write(99)
        assert len(errors) == writers and len(attempts) == 3
    finally:
        if lock.in_transaction:
            lock.execute("ROLLBACK")
        lock.close()
        db.close()


def until_true(check, timeout_s: float = WAIT_S) -> bool:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    return True
