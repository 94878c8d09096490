"""The data directory's SQLite database and the durable task records on it.

Real files in a temporary data directory: schema migrations by user_version,
the one-process lock, WAL, compare-and-set transitions with timestamped
history, idempotent starts and watches.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading

import pytest

from kernel._proto.aios.kernel.v1 import kernel_pb2 as kpb
from kernel.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument, NotFound, Unavailable, shutting_down
from kernel.store import MIGRATIONS, open_database
from kernel.store.schema import latest_version, migrate
from kernel.store.sqlite_tasks import page_query
from kernel.tasks import TaskStore
from kernel.testing.pages import every_page, peak_traced_bytes
from kernel.testing.watches import errors_when_ended


@pytest.fixture
def db(tmp_path):
    database = open_database(tmp_path / "var")
    yield database
    database.close()


def decision_request(key: str = "", amount: float = 1.0, tenant: str = "acme") -> kpb.DecisionRequest:
    req = kpb.DecisionRequest(pipeline="claims", tenant=tenant, idempotency_key=key)
    req.fields["amount"].number_value = amount
    return req


# -- the database ---------------------------------------------------------------------------
def test_fresh_database_is_migrated_and_in_wal_mode(tmp_path):
    with open_database(tmp_path) as db:
        assert db.schema_version == latest_version() >= 1
        assert db.path == tmp_path / "kernel.sqlite3"
    conn = sqlite3.connect(tmp_path / "kernel.sqlite3")
    assert conn.execute("PRAGMA user_version").fetchone()[0] == latest_version()
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"tasks", "reviews", "idempotency", "review_completions"} <= tables
    conn.close()


def test_migrations_run_once_and_in_order(tmp_path):
    steps = [
        (1, "a", ("CREATE TABLE a (x INTEGER)",)),
        (2, "b", ("CREATE TABLE b (y INTEGER)", "INSERT INTO b VALUES (7)")),
    ]
    conn = sqlite3.connect(tmp_path / "m.sqlite3", isolation_level=None)
    assert migrate(conn, steps[:1], "m") == 1
    assert migrate(conn, steps, "m") == 2  # only step 2 runs: step 1 again would fail (table exists)
    assert migrate(conn, steps, "m") == 2
    assert conn.execute("SELECT y FROM b").fetchall() == [(7,)]


def test_a_failing_migration_leaves_the_previous_version(tmp_path):
    conn = sqlite3.connect(tmp_path / "m.sqlite3", isolation_level=None)
    migrate(conn, [(1, "a", ("CREATE TABLE a (x INTEGER)",))], "m")
    broken = [(1, "a", ()), (2, "bad", ("CREATE TABLE c (z INTEGER)", "NOT SQL"))]
    with pytest.raises(sqlite3.OperationalError):
        migrate(conn, broken, "m")
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
    assert conn.execute("SELECT count(*) FROM sqlite_master WHERE name = 'c'").fetchone()[0] == 0


def test_a_database_newer_than_the_kernel_is_refused(tmp_path):
    open_database(tmp_path).close()
    conn = sqlite3.connect(tmp_path / "kernel.sqlite3")
    conn.execute(f"PRAGMA user_version = {latest_version(MIGRATIONS) + 1}")
    conn.close()
    with pytest.raises(FailedPrecondition, match="newer than this kernel"):
        open_database(tmp_path)


def test_one_kernel_process_per_data_dir(tmp_path):
    with open_database(tmp_path):
        code = (
            "import sys; from kernel.store import open_database\n"
            "from kernel.errors import FailedPrecondition\n"
            f"try:\n    open_database({str(tmp_path)!r})\nexcept FailedPrecondition as e:\n"
            "    print(e); sys.exit(3)\n"
        )
        other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert other.returncode == 3, other.stderr
        assert "in use by another kernel process" in other.stdout
        with open_database(tmp_path, exclusive=False) as reader:  # read-only tools skip the lock
            assert reader.schema_version == latest_version()
    open_database(tmp_path).close()  # released on close


def test_closed_database_refuses_use(tmp_path):
    db = open_database(tmp_path)
    db.close()
    with pytest.raises(FailedPrecondition, match="closed"):
        with db.write():
            pass


def test_closing_leaves_a_read_in_progress_its_connection(tmp_path):
    # Closing an sqlite3 connection while another thread runs a statement on
    # it can crash the process (it did, once, in CI): close() must leave the
    # connections that are in use to their readers, who close them when done.
    db = open_database(tmp_path)
    db.tasks.put_completion("r1", kpb.Decision(action="deny"))
    with db.read() as conn:
        closer = threading.Thread(target=db.close)
        closer.start()
        closer.join()
        assert conn.execute("SELECT count(*) FROM review_completions").fetchone() == (1,)
    with pytest.raises(sqlite3.ProgrammingError):  # closed by the reader once it was done with it
        conn.execute("SELECT 1")
    with pytest.raises(FailedPrecondition, match="closed"):
        db.tasks.completion("r1")


# -- task records -----------------------------------------------------------------------------
def test_create_queues_a_task_with_a_timestamped_history(db):
    store = TaskStore(db)
    task, created = store.create(decision_request())
    assert created and task.state == kpb.QUEUED and task.task_id
    assert task.request.request_id, "the kernel makes a request id once, for every run"
    assert [h.state for h in task.history] == [kpb.QUEUED]
    assert task.created_unix_ns == task.updated_unix_ns == task.history[0].at_unix_ns > 0
    assert store.get(task.task_id) == task


def test_transitions_are_compare_and_set_and_recorded(db):
    store = TaskStore(db)
    task, _ = store.create(decision_request())
    running = store.transition(task.task_id, kpb.RUNNING, (kpb.QUEUED,), "attempt 1", attempts=1)
    assert running.state == kpb.RUNNING and running.attempts == 1
    assert store.transition(task.task_id, kpb.RUNNING, (kpb.QUEUED,)) is None  # not QUEUED any more
    done = store.transition(task.task_id, kpb.SUCCEEDED, (kpb.RUNNING,), "decided",
                            decision=kpb.Decision(action="approve"))
    assert [(h.state, h.attempt, h.detail) for h in done.history] == [
        (kpb.QUEUED, 0, "started"), (kpb.RUNNING, 1, "attempt 1"), (kpb.SUCCEEDED, 1, "decided"),
    ]
    stamps = [h.at_unix_ns for h in done.history]
    assert stamps == sorted(stamps) and done.updated_unix_ns == stamps[-1]
    assert store.get(task.task_id).decision.action == "approve"


def test_idempotency_key_returns_the_same_task_and_refuses_a_different_request(db):
    store = TaskStore(db)
    first, created = store.create(decision_request(key="once"))
    again = decision_request(key="once")
    again.request_id, again.timeout_ms = "a-retry-may-change-this", 99
    second, created_again = store.create(again)
    assert created and not created_again and second.task_id == first.task_id
    with pytest.raises(FailedPrecondition, match="request.idempotency_key 'once' already started task"):
        store.create(decision_request(key="once", amount=2.0))
    other_tenant, created_other = store.create(decision_request(key="once", tenant="globex"))
    assert created_other and other_tenant.task_id != first.task_id


def test_two_starts_with_one_key_at_once_leave_the_stored_task_holding_the_key(db):
    """A race audit: the second StartTask with a key, finding it reserved by a first one still being stored,
    inserted its own task beside it and committed first; the first, finding its key taken, released the
    reservation — which the stored, undecided task needed (a Decide with another request was then decided, and
    the task failed on its own key). The second now waits for the first's insert."""
    store = TaskStore(db)
    checking, release = threading.Event(), threading.Event()

    def slow_first_check(request, digest):  # fault injected on purpose: the first start stops before its insert
        if not checking.is_set():
            checking.set()
            release.wait(10)

    store.check_key = slow_first_check
    answers = []
    first = threading.Thread(target=lambda: answers.append(store.create(decision_request("k", amount=5.0))))
    first.start()
    assert checking.wait(10)
    second = threading.Thread(target=lambda: answers.append(store.create(decision_request("k", amount=5.0))))
    second.start()
    second.join(timeout=1)  # (it waits for the first: without the wait it had stored its own task by now)
    release.set()
    first.join(timeout=10)
    second.join(timeout=10)
    (task, created), (again, created_again) = answers
    assert created and not created_again and again.task_id == task.task_id
    assert store.key_holder("acme", "k")[0] == task.task_id  # the undecided task holds its key


def test_cancel_unless_final(db):
    store = TaskStore(db)
    task, _ = store.create(decision_request())
    cancelled = store.cancel(task.task_id)
    assert cancelled.state == kpb.CANCELLED and cancelled.history[-1].detail == "cancelled by a caller"
    with pytest.raises(FailedPrecondition, match="already CANCELLED"):
        store.cancel(task.task_id)


def test_unknown_and_missing_ids_are_named(db):
    store = TaskStore(db)
    with pytest.raises(NotFound, match="task 'nope' does not exist"):
        store.get("nope")
    with pytest.raises(InvalidArgument, match="task_id is required"):
        store.get("")
    with pytest.raises(InvalidArgument, match="request.pipeline is required"):
        store.create(kpb.DecisionRequest())
    with pytest.raises(InvalidArgument, match="request.idempotency_key must be at most"):
        store.create(decision_request(key="k" * 300))


def test_tasks_survive_reopening(tmp_path):
    with open_database(tmp_path) as db:
        task, _ = TaskStore(db).create(decision_request())
        TaskStore(db).transition(task.task_id, kpb.RUNNING, (kpb.QUEUED,), attempts=1)
    with open_database(tmp_path) as db:
        again = TaskStore(db).get(task.task_id)
        assert again.state == kpb.RUNNING and len(again.history) == 2


def test_a_tenants_task_list_reads_its_index_in_a_store_made_before_it(tmp_path):
    """ListTasks for one tenant walked every task in position order (55 ms a page for a tenant with 3 of 300,000
    tasks). Schema version 6 indexes tasks by tenant (and state); an older store gains the indexes at open, its
    tasks listed as before, and each filter's query names the index it reads (SQLite refuses one it cannot use)."""
    with open_database(tmp_path) as db:
        store = TaskStore(db)
        made = [store.create(decision_request(tenant=tenant))[0] for tenant in ("acme", "globex", "acme")]
        store.transition(made[2].task_id, kpb.RUNNING, (kpb.QUEUED,), attempts=1)
    conn = sqlite3.connect(tmp_path / "kernel.sqlite3", isolation_level=None)
    conn.execute("DROP INDEX tasks_by_tenant")
    conn.execute("DROP INDEX tasks_by_tenant_state")
    for trigger in ("inserted", "changed", "deleted"):  # (and what versions 7 and 8 added after it)
        conn.execute(f"DROP TRIGGER reviews_late_{trigger}")
        conn.execute(f"DROP TRIGGER reviews_backlog_{trigger}")
    for index in ("reviews_unresolved_by_lease", "reviews_unresolved_by_sla"):
        conn.execute(f"DROP INDEX {index}")
    conn.execute("DROP TABLE review_counts")
    conn.execute("DROP TABLE review_backlog")
    for trigger in ("inserted", "changed", "deleted"):  # (and version 9's)
        conn.execute(f"DROP TRIGGER tasks_counted_{trigger}")
    conn.execute("DROP TABLE task_counts")
    for index in ("reviews_by_tenant", "reviews_withdrawn_at"):  # (and version 10's)
        conn.execute(f"DROP INDEX {index}")
    conn.execute("CREATE INDEX reviews_by_filter ON reviews (resolved, pipeline, tenant)")  # (which it dropped)
    conn.execute("PRAGMA user_version = 5")  # as the release before schema version 6 left it
    conn.close()
    with open_database(tmp_path) as db:
        assert db.schema_version == latest_version() >= 6
        store = TaskStore(db)
        assert [t.task_id for t in store.list(tenant="acme").tasks] == [made[0].task_id, made[2].task_id]
        assert [t.task_id for t in store.list(tenant="acme", states=[kpb.RUNNING]).tasks] == [made[2].task_id]
        assert [t.task_id for t in store.list(states=[kpb.QUEUED]).tasks] == [made[0].task_id, made[1].task_id]
        with db.read() as conn:
            # (several states: a sort of the tenant's tasks in those states, which only they are read for)
            for states, index in (((), "tasks_by_tenant"), ((kpb.RUNNING,), "tasks_by_tenant_state"),
                                  ((kpb.RUNNING, kpb.QUEUED), "tasks_by_tenant_state")):
                query, args = page_query("acme", states, 0, 16)
                plan = " ".join(row[-1] for row in conn.execute("EXPLAIN QUERY PLAN " + query, args))
                assert f"USING INDEX {index} (tenant=?" in plan, plan
                assert len(states) > 1 or "TEMP B-TREE" not in plan, plan


def test_watch_sends_the_current_state_then_each_change_until_final(db):
    store = TaskStore(db)
    task, _ = store.create(decision_request())
    watch = store.watch(task.task_id, timeout_s=10)
    assert next(watch).state == kpb.QUEUED
    seen = []
    reader = threading.Thread(target=lambda: seen.extend(t.state for t in watch))
    reader.start()
    store.transition(task.task_id, kpb.RUNNING, (kpb.QUEUED,), attempts=1)
    store.transition(task.task_id, kpb.QUEUED, (kpb.RUNNING,), "retry")
    store.transition(task.task_id, kpb.RUNNING, (kpb.QUEUED,), attempts=2)
    store.transition(task.task_id, kpb.SUCCEEDED, (kpb.RUNNING,))
    reader.join(timeout=10)
    assert not reader.is_alive()
    assert seen == [kpb.RUNNING, kpb.QUEUED, kpb.RUNNING, kpb.SUCCEEDED]
    final = store.watch(task.task_id)
    assert [t.state for t in final] == [kpb.SUCCEEDED]  # a final task: one message, then the end


def test_watch_times_out_and_closes_from_another_thread(db):
    store = TaskStore(db)
    task, _ = store.create(decision_request())
    watch = store.watch(task.task_id, timeout_s=0.05)
    next(watch)
    with pytest.raises(DeadlineExceeded):
        next(watch)
    blocked = store.watch(task.task_id)
    next(blocked)
    ended = threading.Event()
    reader = threading.Thread(target=lambda: (list(blocked), ended.set()))
    reader.start()
    blocked.close()
    assert ended.wait(10), "close() must wake a blocked watcher"
    with pytest.raises(NotFound):
        store.watch("nope")


def test_ending_the_watches_wakes_each_with_the_error_and_ends_later_ones_at_once(db):
    """The kernel's drain: a blocked watcher raises UNAVAILABLE instead of waiting for a change."""
    store = TaskStore(db)
    task, _ = store.create(decision_request())
    watch = store.watch(task.task_id)
    next(watch)
    errors = errors_when_ended(watch, lambda: store.end_watches(shutting_down))
    assert len(errors) == 1 and isinstance(errors[0], Unavailable) and "shutting down" in errors[0].message
    assert store.watcher_count(task.task_id) == 0
    later = store.watch(task.task_id)
    assert next(later).state == kpb.QUEUED  # the state it was asked for, then the error
    with pytest.raises(Unavailable, match="watch again"):
        next(later)


def test_a_large_page_size_reads_only_the_tasks_its_bytes_allow(db, monkeypatch):
    """Regression (a fuzz campaign's boundary values): ListTasks with page_size 1,000 read up to 1,001 stored
    tasks and parsed them all before the page stopped at PAGE_BYTES; a task carries its request's text (1 MiB a
    field), so that was ~2 GB held for one call. The store now stops reading at the page's bytes (repro: 40
    tasks of 1 MiB, a 4 MiB page; 40 MB read for it before). Every task is still listed once, in order."""
    import kernel.paging as paging_module

    monkeypatch.setattr(paging_module, "PAGE_BYTES", 4 << 20)
    store = TaskStore(db)
    made = []
    for n in range(40):
        request = decision_request(amount=float(n))
        request.text_fields["description"] = "d" * (1 << 20)
        made.append(store.create(request)[0].task_id)
    peak = peak_traced_bytes(lambda: store.list(page_size=1000))  # (stored bodies come from SQLite as bytes)
    assert peak < 16 << 20, f"{peak / 2**20:.0f} MiB read for a page of 4 MiB"
    assert every_page(lambda token: store.list(page_size=1000, page_token=token),
                      lambda page: [task.task_id for task in page.tasks], 4) == made


@pytest.mark.parametrize("old", range(1, latest_version()))
def test_an_upgrade_is_said_once_in_the_log_naming_both_versions(tmp_path, caplog, old):
    """A store an older kernel wrote (built with the migrations of its day) is upgraded at the first start, which
    says so once (no word of it before: which start upgraded, and from what, could not be told later); a new
    store is created, not upgraded, and the next start has nothing to say."""
    caplog.set_level("INFO", logger="aios.store")
    conn = sqlite3.connect(tmp_path / "kernel.sqlite3", isolation_level=None)
    migrate(conn, MIGRATIONS[:old], "old kernel")
    conn.close()
    for _ in range(2):
        open_database(tmp_path).close()
    said = [r.getMessage() for r in caplog.records if "upgraded from schema version" in r.getMessage()]
    assert len(said) == 1, said
    assert said[0].startswith(f"{tmp_path / 'kernel.sqlite3'} upgraded from schema version {old} to "
                              f"{latest_version()} ({old + 1}: "), said[0]
    caplog.clear()
    open_database(tmp_path / "new").close()
    assert not [r for r in caplog.records if "upgraded" in r.getMessage()]
