"""What an operator sees when the store's file or disk fails: one line naming the data dir and the cause.

At start (``aios-kernel serve`` as a subprocess, exit 2, no traceback): a
file that is not SQLite, a folder in its place, damaged pages (PRAGMA
quick_check), a write lock another process holds, a read-only or full disk,
an ``audit`` that is a file. While serving (real SQLite files, a real
kernel): damage SQLite reports and the file deleted or replaced under the
kernel fail-stop the store; a full disk fails only the writes it hits, with
UNAVAILABLE and a retry hint.

Faults are real (bytes overwritten, files removed, a tmpfs filled, another
process's transaction) except one, injected on purpose and named so where it
is used: a full disk without root is SQLite's own ``PRAGMA max_page_count``
cap on the store's writer connection, which fails writes that grow the file
with the same SQLITE_FULL ("database or disk is full") a full disk gives.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from claims_support import claim_request
from conftest import start_claims_kernel
from examples.claims import data
from kernel._proto.aios.kernel.v1 import kernel_pb2 as kpb
from kernel._proto.aios.kernel.v1 import kernel_pb2_grpc as kgrpc
from kernel.review import ReviewQueue
from kernel.store import open_database
from kernel.store.faults import RETRY_AFTER_MS, StoreBusy, StoreCannotOpen, StoreFailed
from kernel.store.sqlite import BUSY_TIMEOUT_MS
from kernel.testing.scratch import scratch_dir
from lane_support import until

ROOT = Path(__file__).resolve().parent.parent
CLAIMS = ROOT / "examples" / "claims"
TIMEOUT_S = 20


def case(n: int) -> tuple[kpb.Decision, kpb.DecisionRequest]:
    request = kpb.DecisionRequest(pipeline="claims", tenant="acme", request_id=f"req-{n}")
    decision = kpb.Decision(request_id=request.request_id, action="approve", outcome=kpb.ESCALATED,
                            pipeline="claims", tenant="acme")
    return decision, request


def store_with_reviews(data_dir: Path, count: int = 300) -> Path:
    """A closed store holding ``count`` reviews (closing checkpoints the WAL: every page is in the main file)."""
    with open_database(data_dir) as db:
        queue = ReviewQueue(db)
        queue.create_many([(*case(n), ["approve", "deny"], 60.0) for n in range(count)], answer=False)
    return data_dir / "kernel.sqlite3"


def damage_pages(path: Path) -> None:
    """The audit's damage: 8 KiB of random bytes at offset 4096 (pages 2-3 of 4 KiB pages)."""
    with open(path, "r+b") as file:
        file.seek(4096)
        file.write(os.urandom(8192))


def damage_table(path: Path, table: str) -> None:
    """Random bytes over ``table``'s root page, so any use of the table reads a damaged page."""
    with sqlite3.connect(path) as conn:
        root, page = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (table,)).fetchone()[0], 4096
        assert conn.execute("PRAGMA page_size").fetchone()[0] == page
    conn.close()
    with open(path, "r+b") as file:
        file.seek((root - 1) * page)
        file.write(os.urandom(page))


@functools.lru_cache(maxsize=1)
def _claims_models() -> Path:
    """The claims demo's small model, built once for this module (a fresh clone has no examples/claims/models:
    `make serve` builds them, `make test` does not)."""
    from claims_support import build_small_model

    return build_small_model(scratch_dir("aios-store-errors-models-"))


def serve(data_dir: Path, timeout: float = 90) -> subprocess.CompletedProcess:
    """``aios-kernel serve`` on the claims demo; returns once it exits (a start refused) or kills it at timeout."""
    return subprocess.run(
        [sys.executable, "-m", "kernel", "serve", "--models", str(_claims_models()), "--pipelines",
         str(CLAIMS / "pipelines"), "--port", "0", "--data-dir", str(data_dir)],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT, check=False)


def refused_in_one_line(result: subprocess.CompletedProcess, *expected: str) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1, result.stderr
    for text in expected:
        assert text in errors[0], errors[0]
    return errors[0]


# -- a store that cannot be opened: the start is refused in one line ------------------------------------------
def test_a_store_file_that_is_not_sqlite_refuses_the_start_in_one_line(tmp_path):
    path = store_with_reviews(tmp_path / "data", count=1)
    with open(path, "r+b") as file:
        file.write(b"garbage" * 20)  # the audit's repro: its header overwritten
    with pytest.raises(StoreCannotOpen) as info:
        open_database(tmp_path / "data")
    assert info.value.code == "FAILED_PRECONDITION"
    refused_in_one_line(serve(tmp_path / "data"), f"data_dir {tmp_path / 'data'}: kernel.sqlite3 is not a SQLite "
                        "database", "restore the data dir from a backup")


def test_a_folder_where_the_store_file_should_be_refuses_the_start_in_one_line(tmp_path):
    (tmp_path / "data" / "kernel.sqlite3").mkdir(parents=True)
    refused_in_one_line(serve(tmp_path / "data"),
                        f"data_dir {tmp_path / 'data'}: kernel.sqlite3 is a folder, not the database file")


def test_damaged_pages_refuse_the_start_in_one_line(tmp_path):
    damage_pages(store_with_reviews(tmp_path / "data"))
    with pytest.raises(StoreCannotOpen) as info:
        open_database(tmp_path / "data")
    assert "kernel.sqlite3 is damaged (PRAGMA quick_check: " in info.value.message
    line = refused_in_one_line(serve(tmp_path / "data"), f"data_dir {tmp_path / 'data'}: kernel.sqlite3 is damaged",
                               ".recover")
    assert "\\n" not in line  # quick_check's own line breaks are not shown escaped


def test_an_undamaged_store_with_reviews_opens(tmp_path):
    store_with_reviews(tmp_path / "data")
    with open_database(tmp_path / "data") as db:  # quick_check passes
        assert len(ReviewQueue(db).list().reviews) > 0


@contextmanager
def held_by_another_process(path: Path):
    """Another process holding a write transaction on ``path`` (as the audit's `BEGIN EXCLUSIVE` did)."""
    holder = subprocess.Popen(
        [sys.executable, "-c", ("import sqlite3, sys, time\n"
                                f"c = sqlite3.connect({str(path)!r}, isolation_level=None); "
                                "c.execute('BEGIN EXCLUSIVE')\nprint('held', flush=True); time.sleep(120)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder
    finally:
        holder.kill()
        holder.wait()


def test_a_store_locked_by_another_process_refuses_the_start_after_one_wait(tmp_path):
    path = store_with_reviews(tmp_path / "data", count=1)
    with held_by_another_process(path):
        began = time.monotonic()
        result = serve(tmp_path / "data")
        took = time.monotonic() - began
    refused_in_one_line(result, f"data_dir {tmp_path / 'data'}: kernel.sqlite3 is locked by another process",
                        f"fuser {path}")
    # One busy wait, at open: not one for the start's first write and another for its stop's (20 s before).
    assert took < 2 * BUSY_TIMEOUT_MS / 1000, took


def test_an_audit_path_that_is_a_file_refuses_the_start_naming_the_data_dir(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "audit").write_text("not a folder")
    refused_in_one_line(serve(tmp_path / "data"),
                        f"data_dir {tmp_path / 'data'}: {tmp_path / 'data' / 'audit'} is a file, not the audit log's "
                        "folder")


@contextmanager
def tmpfs(size: str, *options: str):
    """A small tmpfs (root only): the real read-only or full disk."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a tmpfs")
    folder = Path(tempfile.mkdtemp(prefix="aios-tmpfs-"))
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join((f"size={size}", *options)), "tmpfs",
                              str(folder)], capture_output=True, text=True, check=False)
    if mounted.returncode != 0:
        folder.rmdir()
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)
        folder.rmdir()


def fill(folder: Path) -> None:
    # Unbuffered: a buffered file's close wrote what the failed write left in its buffer, and raised ENOSPC again.
    with open(folder / "filler", "wb", buffering=0) as file:
        try:
            while True:
                file.write(b"\0" * 65536)
        except OSError:
            pass


def test_a_read_only_data_dir_refuses_the_start_naming_it(tmp_path):
    with tmpfs("1m", "ro") as folder:
        refused_in_one_line(serve(folder), f"data_dir {folder}: kernel.lock cannot be written: Read-only file system")


@contextmanager
def immutable(path: Path):
    """``chattr +i`` (root, on a file system that has it): a file nobody may write, root included, as one restored
    from a backup by another user is to the kernel's."""
    if os.geteuid() != 0 or shutil.which("chattr") is None:
        pytest.skip("needs root and chattr")
    made = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True, check=False)
    if made.returncode != 0:
        pytest.skip(f"chattr +i does not work here: {made.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=False)


def test_a_store_file_the_kernel_cannot_write_refuses_the_start_in_one_line(tmp_path):
    """(Upgrade audit) SQLite opens such a file read-only without a word: the start loaded the models, wrote its
    start record and died at its first store write with a traceback, exit 1."""
    path = store_with_reviews(tmp_path / "data", count=1)
    with immutable(path):
        refused_in_one_line(serve(tmp_path / "data"), f"data_dir {tmp_path / 'data'}: kernel.sqlite3 cannot be written",
                            "make the file and the data dir writable")
    assert not (tmp_path / "data" / "audit").exists()  # refused before the audit log was opened


def test_a_full_disk_refuses_the_start_naming_the_data_dir_fresh_or_existing(tmp_path):
    with tmpfs("4m") as folder:
        store_with_reviews(folder / "existing", count=1)
        fill(folder)
        refused_in_one_line(serve(folder / "fresh"), f"data_dir {folder / 'fresh'}: ", "the disk is full")
        refused_in_one_line(serve(folder / "existing"),
                            f"data_dir {folder / 'existing'}: the disk holding kernel.sqlite3 is full")


# -- while serving: damage and a deleted file fail-stop the store ---------------------------------------------
def test_damage_found_while_serving_fail_stops_the_store(tmp_path):
    path = store_with_reviews(tmp_path / "data")
    # A tool's open (exclusive=False) skips the start's quick_check: the damage comes after the open, as it
    # would from a failing disk under a running kernel.
    db = open_database(tmp_path / "data", exclusive=False)
    told = []
    db.failure_listeners.append(told.append)
    try:
        damage_table(path, "reviews")
        with pytest.raises(StoreFailed) as info:
            ReviewQueue(db).list()
        assert info.value.code == "UNAVAILABLE"
        assert info.value.message.startswith(f"data_dir {tmp_path / 'data'}: kernel.sqlite3 is damaged (")
        assert "the store takes no more reads or writes" in info.value.message
        # Every later read and write is refused alike, without touching the file; the listeners heard once.
        with pytest.raises(StoreFailed):
            ReviewQueue(db).create(*case(1000), ["approve"], 60.0)
        with pytest.raises(StoreFailed):
            ReviewQueue(db).list()
        assert len(told) == 1 and db.failure is not None
    finally:
        db.close()


def test_damage_a_write_runs_into_fail_stops_the_store(tmp_path):
    path = store_with_reviews(tmp_path / "data")
    db = open_database(tmp_path / "data", exclusive=False, read_connections=0)
    try:
        damage_table(path, "reviews")
        with pytest.raises(StoreFailed, match="kernel.sqlite3 is damaged"):
            ReviewQueue(db).create_many([(*case(n), ["approve"], 60.0) for n in range(1000, 1100)])
        assert db.failure is not None
    finally:
        db.close()


def test_a_store_file_deleted_under_it_fail_stops_before_the_next_durable_commit(tmp_path, caplog):
    db = open_database(tmp_path / "data")
    queue = ReviewQueue(db)
    try:
        queue.create(*case(1), ["approve"], 60.0)
        for leftover in (tmp_path / "data").glob("kernel.sqlite3*"):  # the audit's `rm -rf DATA/kernel.sqlite3*`
            leftover.unlink()
        with caplog.at_level(logging.ERROR, logger="aios.store"), pytest.raises(StoreFailed) as info:
            queue.create(*case(2), ["approve"], 60.0)
        assert info.value.message.startswith(
            f"data_dir {tmp_path / 'data'}: kernel.sqlite3 was deleted under the running kernel")
        assert [r.getMessage() for r in caplog.records if r.name == "aios.store"] == [info.value.message]
        with pytest.raises(StoreFailed):
            queue.list()
    finally:
        db.close()


def test_a_write_ahead_log_deleted_under_it_fail_stops_before_the_next_durable_commit(tmp_path, caplog):
    """(Incident drill) `rm kernel.sqlite3-wal` under a running kernel went unnoticed: every commit after it went
    to the deleted file, health stayed SERVING, and a crash lost them all (a finished task's row with them)."""
    db = open_database(tmp_path / "data")
    queue = ReviewQueue(db)
    try:
        queue.create(*case(1), ["approve"], 60.0)
        wal = tmp_path / "data" / "kernel.sqlite3-wal"
        assert wal.exists()
        wal.unlink()  # an operator's clean-up of what looked like a temporary file
        with caplog.at_level(logging.ERROR, logger="aios.store"), pytest.raises(StoreFailed) as info:
            queue.create(*case(2), ["approve"], 60.0)
        assert info.value.message.startswith(
            f"data_dir {tmp_path / 'data'}: kernel.sqlite3-wal was deleted under the running kernel")
        assert "stop the kernel with SIGTERM, not SIGKILL" in info.value.message
        assert [r.getMessage() for r in caplog.records if r.name == "aios.store"] == [info.value.message]
    finally:
        db.close()
    # What the message promises: the close copied the commits from the deleted file into kernel.sqlite3.
    with sqlite3.connect(tmp_path / "data" / "kernel.sqlite3") as conn:
        assert conn.execute("SELECT COUNT(*) FROM reviews").fetchone()[0] == 1


def test_a_write_ahead_log_replaced_under_it_fail_stops(tmp_path):
    db = open_database(tmp_path / "data")
    try:
        ReviewQueue(db).create(*case(1), ["approve"], 60.0)
        wal = tmp_path / "data" / "kernel.sqlite3-wal"
        copy = tmp_path / "copy-wal"
        shutil.copyfile(wal, copy)
        os.replace(copy, wal)  # the same bytes in another file
        with pytest.raises(StoreFailed, match="kernel.sqlite3-wal was replaced under the running kernel"):
            ReviewQueue(db).create(*case(2), ["approve"], 60.0)
    finally:
        db.close()


def test_a_store_file_replaced_under_it_fail_stops(tmp_path):
    db = open_database(tmp_path / "data")
    try:
        ReviewQueue(db).create(*case(1), ["approve"], 60.0)
        other = tmp_path / "other.sqlite3"
        sqlite3.connect(other).close()
        os.replace(other, tmp_path / "data" / "kernel.sqlite3")  # a restore copied over a running kernel's file
        with pytest.raises(StoreFailed, match="kernel.sqlite3 was replaced under the running kernel"):
            ReviewQueue(db).create(*case(2), ["approve"], 60.0)
    finally:
        db.close()


# -- a full disk while serving: UNAVAILABLE with a retry hint, the store goes on once there is room -----------
def cap_pages(db, grow_by: int = 0) -> None:
    """INJECTED FAULT: the disk is full. SQLite's page cap on the writer connection fails every write that grows
    the file with SQLITE_FULL, "database or disk is full", as a full disk does (no root needed)."""
    with db._write_lock:  # (not db.write(): a store refusing writes on a full disk refuses that one too)
        pages = db._writer.execute("PRAGMA page_count").fetchone()[0]
        db._writer.execute(f"PRAGMA max_page_count = {pages + grow_by}")


def big_case(n: int):
    decision, request = case(n)
    request.text_fields["notes"] = "x" * 200_000  # takes new pages: the file must grow
    return decision, request, ["approve"], 60.0


def test_a_full_disk_fails_the_write_with_unavailable_and_a_retry_hint_and_the_store_goes_on(tmp_path):
    db = open_database(tmp_path / "data")
    queue = ReviewQueue(db)
    try:
        cap_pages(db)
        with pytest.raises(StoreBusy) as info:
            queue.create_many([big_case(1)])
        error = info.value
        assert error.code == "UNAVAILABLE" and ("retry-after-ms", str(RETRY_AFTER_MS)) in error.trailers
        assert error.message.startswith(f"data_dir {tmp_path / 'data'}: this write was not stored (nothing of it "
                                        "was kept): the disk holding kernel.sqlite3 is full")
        assert db.failure is None  # a full disk passes: nothing fail-stops
        assert "is full" in db.refusing_writes  # meanwhile writes are refused at once (kernel/store/refusals.py)
        cap_pages(db, grow_by=10_000)  # room again
        until(lambda: db.refusing_writes is None, "the store taking writes again")  # its probe commits: it goes on
        queue.create_many([big_case(2)])
    finally:
        db.close()


@contextmanager
def refusing_at_the_file_size_limit(db, queue: ReviewQueue):
    """A real file-size limit (RLIMIT_FSIZE, this process only; Python ignores SIGXFSZ, so writes see EFBIG) just past
    the store's files, and reviews stored until the store refuses one: yields that refusal, the limit still on; it
    is lifted on leaving."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    queue.create_many([big_case(1)])
    biggest = max(p.stat().st_size for p in db.data_dir.glob("kernel.sqlite3*"))
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (biggest + 8192, hard))
        with pytest.raises(StoreBusy) as info:
            for n in range(2, 40):
                queue.create_many([big_case(n)])
        yield info.value
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def test_a_file_size_limit_the_store_meets_is_named_not_called_a_full_disk(tmp_path):
    """(`ulimit -f` in the kernel's shell, LimitFSIZE in its unit) SQLite answers a write past the file-size limit
    as it answers a full disk, and the refusal said "the disk ... is full: free space there" on a disk with
    plenty: the operator freed space for nothing."""
    db = open_database(tmp_path / "data")
    try:
        with refusing_at_the_file_size_limit(db, ReviewQueue(db)) as refused:
            pass
        message = refused.message
        assert "file-size limit" in message and "ulimit -f" in message, message
        assert "is full" not in message, message
    finally:
        db.close()


# -- a real kernel ---------------------------------------------------------------------------------------------
@pytest.fixture
def kernel(claims_models, tmp_path):
    server = start_claims_kernel(claims_models, tmp_path)
    yield server
    server.stop(grace=1)


def start_task(channel, notes: str = "") -> kpb.Task:
    request = claim_request(data.generate_cases(1, seed=3)[0], tenant="ops")
    if notes:
        request.text_fields["notes"] = notes
    return kgrpc.TaskServiceStub(channel).StartTask(kpb.StartTaskRequest(request=request), timeout=TIMEOUT_S)


def test_start_task_on_a_full_disk_is_unavailable_with_a_retry_hint(kernel):
    with grpc.insecure_channel(f"127.0.0.1:{kernel.port}") as channel:
        start_task(channel)
        cap_pages(kernel.decisions.db)
        with pytest.raises(grpc.RpcError) as info:
            start_task(channel, notes="x" * 200_000)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()
        assert "the disk holding kernel.sqlite3 is full" in info.value.details()
        assert ("retry-after-ms", str(RETRY_AFTER_MS)) in tuple(info.value.trailing_metadata())


def test_a_kernel_whose_store_is_deleted_refuses_writes_and_stops_in_one_line_per_step(kernel, caplog):
    data_dir = Path(kernel.settings.data_dir)
    with grpc.insecure_channel(f"127.0.0.1:{kernel.port}") as channel:
        start_task(channel)
        for leftover in data_dir.glob("kernel.sqlite3*"):
            leftover.unlink()
        with pytest.raises(grpc.RpcError) as info:
            start_task(channel)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert f"data_dir {data_dir}: kernel.sqlite3 was deleted under the running kernel" in info.value.details()
        # ...and load balancers are told: the store failed as the audit log can (kernel/server.py)
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
    with caplog.at_level(logging.ERROR):
        kernel.stop(grace=1)
    stops = [r for r in caplog.records if r.getMessage().startswith("stopping")]
    assert stops, [r.getMessage() for r in caplog.records]
    for record in stops:  # named by the step, with the cause; an expected failure, so no traceback
        assert record.getMessage().startswith("stopping: DecisionSide.") and "<bound method" not in record.getMessage()
        assert record.exc_info is None, record.getMessage()
    assert any(f"data_dir {data_dir}: kernel.sqlite3 was deleted" in r.getMessage() for r in stops)


def test_a_stop_after_the_disk_filled_names_each_failed_step_in_one_line(claims_models, tmp_path, caplog):
    with tmpfs("8m") as folder:
        # Appending (no preallocated zeros): the first record after the disk fills fails the audit log.
        server = start_claims_kernel(claims_models, tmp_path, data_dir=str(folder / "data"), audit_preallocate_bytes=0)
        try:
            with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                decide = kgrpc.DecisionServiceStub(channel).Decide
                request = claim_request(data.generate_cases(1, seed=3)[0], tenant="ops")
                decide(request, timeout=TIMEOUT_S)
                fill(folder)
                for _ in range(200):  # until a record needs a page the disk no longer has
                    try:
                        decide(request, timeout=TIMEOUT_S)
                    except grpc.RpcError as exc:
                        assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc.details()
                        break
                else:
                    pytest.fail("the audit log never ran out of space")
        finally:
            with caplog.at_level(logging.ERROR, logger="aios.decisions"):
                server.stop(grace=1)
    stops = [r for r in caplog.records if r.name == "aios.decisions" and r.getMessage().startswith("stopping")]
    recorded = [r.getMessage() for r in stops if "DecisionSide._record_stopping" in r.getMessage()]
    assert recorded, [r.getMessage() for r in stops]
    assert recorded[0].startswith("stopping: DecisionSide._record_stopping failed: the audit log failed"), recorded
    assert "No space left on device" in recorded[0]
    assert all(r.exc_info is None and "<bound method" not in r.getMessage() for r in stops), \
        [r.getMessage() for r in stops]
