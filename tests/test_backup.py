"""``aios-kernel backup``: a copy of a running kernel's data dir that a kernel starts on, with what it held.

An upgrade audit copied a busy data dir with ``cp -a`` (audit/ first, the store seconds later): the store had
seen records the copied log lacked, and the copy refused to start. Here a real kernel process takes keyed
decisions while the command copies its data dir; a kernel started on the copy (fsync mode, which refuses any
lost record) replays every key answered before the backup began, each naming its own record in the copied log.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import pytest

from claims_support import build_small_model, claim_request, copy_pipelines
from examples.claims import data
from kernel._proto.aios.kernel.v1 import kernel_pb2 as kpb
from kernel._proto.aios.kernel.v1 import kernel_pb2_grpc as kgrpc
from kernel.audit import RecordFilter, iter_directory
from kernel.testing.processes import ServeProcess

CLI = [sys.executable, "-m", "kernel"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return build_small_model(tmp_path_factory.mktemp("claims_models"))


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120)


def test_a_backup_taken_under_load_starts_and_replays_what_it_held(models, tmp_path):
    pipelines = copy_pipelines(tmp_path / "pipelines")
    serve = ("--pipelines", str(pipelines), "--log-level", "WARNING")
    server = ServeProcess(models, *serve, data_dir=tmp_path / "data")
    cases = data.generate_cases(50, seed=31)
    answered: dict[str, tuple[kpb.DecisionRequest, kpb.Decision]] = {}
    stop = threading.Event()

    def load(channel) -> None:  # keyed decisions, one after another, until the backup is done
        stub = kgrpc.DecisionServiceStub(channel)
        i = 0
        while not stop.is_set():
            request = claim_request(cases[i % len(cases)], request_id=f"b{i}", idempotency_key=f"order-{i}")
            answered[request.idempotency_key] = (request, stub.Decide(request, timeout=10))
            i += 1

    try:
        with grpc.insecure_channel(server.address) as channel:
            kgrpc.DecisionServiceStub(channel).Decide(claim_request(cases[0], request_id="warm"), timeout=10)
            sender = threading.Thread(target=load, args=(channel,))
            sender.start()
            try:
                while len(answered) < 100:  # (a real wait on real answers, not a sleep)
                    threading.Event().wait(0.01)
                before_backup = dict(answered)
                done = run_cli("backup", str(tmp_path / "data"), str(tmp_path / "copy"))
            finally:
                stop.set()
                sender.join()
    finally:
        code, err = server.stop()
    assert code == 0, err
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith(f"backup of {tmp_path / 'data'} in {tmp_path / 'copy'} (its kernel running; it "
                                  "holds every decision answered before 20"), done.stdout
    assert "a snapshot of the running store at 20" in done.stdout and "quick_check ok" in done.stdout
    assert "audit log (records 0.." in done.stdout and ", as written by 20" in done.stdout and ": OK: " in done.stdout
    # A running kernel's copy has no clean stop at its end and a tail not signed yet: expected, not a crash's.
    assert "crash" not in done.stdout, done.stdout

    assert run_cli("audit", "verify", str(tmp_path / "copy" / "audit")).returncode == 0
    put_back = run_cli("restore", str(tmp_path / "copy"), str(tmp_path / "restored"))
    assert put_back.returncode == 0 and "crash" not in put_back.stdout, put_back.stdout + put_back.stderr
    restored = ServeProcess(models, *serve, data_dir=tmp_path / "copy")  # fsync mode: a lost record refuses
    try:
        with grpc.insecure_channel(restored.address) as channel:
            stub = kgrpc.DecisionServiceStub(channel)
            again = {key: stub.Decide(request, timeout=10) for key, (request, _) in before_backup.items()}
    finally:
        code, err = restored.stop()
    assert code == 0, err
    on_record = {r.sequence: r.idempotency_key
                 for r in iter_directory(tmp_path / "copy" / "audit", 0, RecordFilter(kind=kpb.DECISION))}
    for key, (_, first) in before_backup.items():
        assert again[key].replayed and again[key].audit_sequence == first.audit_sequence, key
        assert on_record[first.audit_sequence] == key


def test_a_backup_refuses_a_destination_in_use_and_a_folder_that_is_no_data_dir(tmp_path):
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "something").write_text("x")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "kernel.sqlite3").write_bytes(b"")
    done = run_cli("backup", str(tmp_path / "data"), str(tmp_path / "used"))
    assert done.returncode == 2 and "exists and is not an empty folder" in done.stderr, done.stderr
    done = run_cli("backup", str(tmp_path / "used"), str(tmp_path / "new"))
    assert done.returncode == 2 and "is no kernel data dir: it has no kernel.sqlite3" in done.stderr, done.stderr
    assert not (tmp_path / "new").exists()
    done = run_cli("backup", str(tmp_path / "data"), str(tmp_path / "data" / "inside"))
    assert done.returncode == 2 and "is inside the data dir" in done.stderr, done.stderr
    assert not (tmp_path / "data" / "inside").exists()


def test_a_stopped_kernels_backup_leaves_its_data_dir_as_it_was(models, tmp_path):
    """(Crash audit) opening the store, even read-only, left -wal and -shm files beside it (and failed with a
    traceback on a read-only mount): a stopped kernel's store is copied as files and opened in the copy. A
    decision whose transaction is still in the write-ahead log (a kill) is in the copy."""
    pipelines = copy_pipelines(tmp_path / "pipelines")
    serve = ("--pipelines", str(pipelines), "--log-level", "WARNING")
    server = ServeProcess(models, *serve, data_dir=tmp_path / "data")
    request = claim_request(data.generate_cases(1, seed=2)[0], request_id="k", idempotency_key="kept")
    with grpc.insecure_channel(server.address) as channel:
        first = kgrpc.DecisionServiceStub(channel).Decide(request, timeout=10)
    server.kill()  # the store's last transactions may be in kernel.sqlite3-wal only
    listing = {path.name: path.stat().st_mtime_ns for path in (tmp_path / "data").iterdir()}
    done = run_cli("backup", str(tmp_path / "data"), str(tmp_path / "copy"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert {path.name: path.stat().st_mtime_ns for path in (tmp_path / "data").iterdir()} == listing
    assert sorted(path.name for path in (tmp_path / "copy").iterdir()) == ["audit", "kernel.sqlite3"]
    restored = ServeProcess(models, *serve, data_dir=tmp_path / "copy")
    try:
        with grpc.insecure_channel(restored.address) as channel:
            again = kgrpc.DecisionServiceStub(channel).Decide(request, timeout=10)
    finally:
        code, err = restored.stop()
    assert code == 0, err
    assert again.replayed and again.audit_sequence == first.audit_sequence


def test_a_running_kernel_without_an_audit_log_is_backed_up_online(models, tmp_path, monkeypatch):
    """(Session review) running with audit_mode off there is no log lock to see: the store was copied as files while
    the kernel wrote it. Its store's own lock says it runs."""
    from conftest import start_claims_kernel
    import kernel.backup as backup_module

    def copied_as_files(*args):  # a tripwire: this path must not be taken for a running kernel
        raise AssertionError("a running kernel's store was copied as files")

    server = start_claims_kernel(models, tmp_path, audit_mode="off")
    try:
        monkeypatch.setattr(backup_module, "_copy_stopped_store", copied_as_files)
        assert backup_module.backup(tmp_path / "data", tmp_path / "copy").ok
    finally:
        server.stop(grace=1)


def test_a_store_that_changes_while_it_is_copied_is_backed_up_online(models, tmp_path, monkeypatch):
    """A kernel this process cannot see (another container's pid namespace hides its locks) writes while the files
    are copied: the copy is dropped and SQLite's online backup taken instead."""
    import shutil

    import kernel.backup as backup_module

    server = ServeProcess(models, "--log-level", "WARNING", data_dir=tmp_path / "data")
    code, err = server.stop()
    assert code == 0, err
    store = tmp_path / "data" / "kernel.sqlite3"
    real_copy = shutil.copy2
    online = []

    def written_meanwhile(src, dst, *args, **kwargs):  # fault injected on purpose: a write lands mid-copy
        result = real_copy(src, dst, *args, **kwargs)
        if Path(src) == store:
            os.utime(store, ns=(store.stat().st_atime_ns, store.stat().st_mtime_ns + 1))
        return result

    monkeypatch.setattr(backup_module.shutil, "copy2", written_meanwhile)
    real_online = backup_module._copy_store
    monkeypatch.setattr(backup_module, "_copy_store", lambda src, dst: (online.append(src), real_online(src, dst)))
    assert backup_module.backup(tmp_path / "data", tmp_path / "copy").ok
    assert online == [store]  # from the source itself, not from a copy of its files


def test_a_backup_that_runs_out_of_space_leaves_nothing_that_looks_like_a_copy(models, tmp_path, monkeypatch):
    """(A full tmpfs as DEST) a full destination left an empty kernel.sqlite3 in DEST (a kernel starts on it as a new,
    empty store) and blamed the source ("data's store: database or disk is full"). The copy is made aside and moved into
    place once whole; a failure removes it and names the destination."""
    import errno
    import shutil
    import sqlite3

    import kernel.backup as backup_module

    server = ServeProcess(models, "--log-level", "WARNING", data_dir=tmp_path / "data")
    code, err = server.stop()
    assert code == 0, err
    real_copy, real_store = shutil.copy2, backup_module._copy_store

    def segments_full(src, dst, *args, **kwargs):  # fault injected on purpose: the disk fills at the log
        if Path(src).suffix == ".seg":
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        return real_copy(src, dst, *args, **kwargs)

    def store_full(src, dst):  # ... or while SQLite writes the store's copy
        real_store(src, dst)
        full = sqlite3.OperationalError("database or disk is full")
        full.sqlite_errorcode = sqlite3.SQLITE_FULL
        raise full

    (tmp_path / "mounted").mkdir()  # an empty folder given as DEST stays, empty
    for patch, dest in (("copy2", tmp_path / "new"), ("store", tmp_path / "mounted")):
        with monkeypatch.context() as faults:
            if patch == "copy2":
                faults.setattr(backup_module.shutil, "copy2", segments_full)
            else:  # (the online backup, as taken of a kernel this process cannot see)
                faults.setattr(backup_module, "_copy_stopped_store", lambda store, copy: False)
                faults.setattr(backup_module, "_copy_store", store_full)
            with pytest.raises(backup_module.BackupRefused, match=f"^{dest} has no space left for the copy .*; "
                                                                  "nothing was left there"):
                backup_module.backup(tmp_path / "data", dest)
    assert not (tmp_path / "new").exists() and list((tmp_path / "mounted").iterdir()) == []

    (tmp_path / "mounted" / backup_module.STAGING).mkdir()  # a backup killed half-way
    done = run_cli("backup", str(tmp_path / "data"), str(tmp_path / "mounted"))
    assert done.returncode == 2 and "holds an unfinished backup" in done.stderr, done.stderr


def test_restore_puts_a_backup_back_and_refuses_a_damaged_one_or_a_data_dir_in_use(models, tmp_path):
    """There was no restore: copying a backup back by hand went onto a running kernel's data dir, or a newer copy,
    without a word, and a truncated backup was put in place for a kernel to start on. ``aios-kernel restore``
    refuses those, checks the backup before it is in place, and leaves nothing when it fails its check."""
    import shutil
    import sqlite3

    server = ServeProcess(models, "--log-level", "WARNING", data_dir=tmp_path / "data")
    try:
        assert run_cli("backup", str(tmp_path / "data"), str(tmp_path / "copy")).returncode == 0
        done = run_cli("restore", str(tmp_path / "copy"), str(tmp_path / "data"))
        assert done.returncode == 2 and f"a kernel is running on {tmp_path / 'data'}" in done.stderr, done.stderr
    finally:
        code, err = server.stop()
    assert code == 0, err
    done = run_cli("restore", str(tmp_path / "copy"), str(tmp_path / "data"))  # (stopped: a newer copy is there)
    assert done.returncode == 2 and "exists and is not empty: move it aside first" in done.stderr, done.stderr

    done = run_cli("restore", str(tmp_path / "copy"), str(tmp_path / "restored"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith(f"restore of {tmp_path / 'copy'} in {tmp_path / 'restored'} (checked"), done.stdout
    assert sorted(path.name for path in (tmp_path / "restored").iterdir()) == ["audit", "kernel.sqlite3"]
    assert (tmp_path / "restored").stat().st_mode & 0o777 == 0o700

    shutil.copytree(tmp_path / "copy", tmp_path / "newer")  # a newer kernel's backup (a rollback)
    with sqlite3.connect(tmp_path / "newer" / "kernel.sqlite3") as conn:
        conn.execute("PRAGMA user_version = 99")
    conn.close()
    done = run_cli("restore", str(tmp_path / "newer"), str(tmp_path / "rolled"))
    assert done.returncode == 2 and "has schema version 99, newer than this kernel's" in done.stderr, done.stderr
    assert not (tmp_path / "rolled").exists()

    shutil.copytree(tmp_path / "copy", tmp_path / "cut")
    segment = sorted((tmp_path / "cut" / "audit").glob("*.seg"))[-1]
    data = bytearray(segment.read_bytes())
    data[len(data.rstrip(b"\0")) // 2] ^= 0xFF  # a backup damaged in storage: one byte of a record flipped
    segment.write_bytes(data)
    done = run_cli("restore", str(tmp_path / "cut"), str(tmp_path / "again"))
    assert done.returncode == 1 and "\nFAILED: the copied audit log fails" in done.stdout, done.stdout
    assert done.stdout.endswith(f"nothing was restored: {tmp_path / 'again'} is left as it was\n"), done.stdout
    assert not (tmp_path / "again").exists()


def test_a_backup_whose_log_lacks_records_its_store_cites_fails_its_check(models, tmp_path):
    """A backup cut short after its log's last checkpoint verifies as a crash's log, and restore put it in place:
    the kernel then refused to start on it (its store cites the records gone). The copy's store and log are
    compared as a start compares them."""
    from kernel.audit.segments import MAGIC, FrameScanner, frames_start

    pipelines = copy_pipelines(tmp_path / "pipelines")
    server = ServeProcess(models, "--pipelines", str(pipelines), "--log-level", "WARNING", data_dir=tmp_path / "data")
    with grpc.insecure_channel(server.address) as channel:
        stub = kgrpc.DecisionServiceStub(channel)
        for i, case in enumerate(data.generate_cases(3, seed=5)):
            answer = stub.Decide(claim_request(case, request_id=f"c{i}", idempotency_key=f"cut-{i}"), timeout=10)
    server.kill()  # (no clean stop: the last records stay unsigned, as a crash leaves them)
    assert run_cli("backup", str(tmp_path / "data"), str(tmp_path / "copy")).returncode == 0
    segment = sorted((tmp_path / "copy" / "audit").glob("*.seg"))[-1]
    body = bytearray(segment.read_bytes())
    offsets = [offset for offset, _ in FrameScanner(bytes(body), frames_start(segment, bytes(body), MAGIC), True)]
    cut = offsets[answer.audit_sequence - int(segment.stem)]
    body[cut:] = bytes(len(body) - cut)
    segment.write_bytes(body)  # the copy cut back to before the last answer's record
    done = run_cli("restore", str(tmp_path / "copy"), str(tmp_path / "restored"))
    assert done.returncode == 1, done.stdout + done.stderr
    assert (f"FAILED: the copied store saw audit records up to #{answer.audit_sequence} but the copied log ends "
            f"at #{answer.audit_sequence - 1}") in done.stdout, done.stdout
    assert not (tmp_path / "restored").exists()


def test_a_log_of_a_newer_format_is_refused_as_such_naming_the_source(tmp_path):
    """(Rollback) an older kernel's backup of a newer kernel's data dir said exit 1, named a file of the removed copy
    and sent the operator to verify a log that is not damaged: it is exit 2 ("could not run"), naming the source."""
    from kernel.audit.segments import MAGIC

    audit = tmp_path / "data" / "audit"
    audit.mkdir(parents=True)
    (tmp_path / "data" / "kernel.sqlite3").write_bytes(b"")  # (an empty file is an empty SQLite database)
    (audit / "00000000000000000000.seg").write_bytes(MAGIC[:-1] + bytes([MAGIC[-1] + 1]) + bytes(64))
    done = run_cli("backup", str(tmp_path / "data"), str(tmp_path / "copy"))
    assert done.returncode == 2, done.stdout + done.stderr
    segment = audit / "00000000000000000000.seg"
    assert done.stderr.startswith(f"aios-kernel backup: {segment}: file format "), done.stderr
    assert "was written by a newer aios-kernel" in done.stderr and "verify" not in done.stderr, done.stderr
    assert not (tmp_path / "copy").exists()


def test_a_kernel_refuses_a_data_dir_a_restore_stopped_half_way_in(models, tmp_path):
    """A restore killed half-way leaves its copy aside in DATA_DIR: a kernel started there began an empty store and
    log beside it, without a word (every review, task and key of the backup out of sight, retries decided anew)."""
    (tmp_path / "data" / ".backup-being-written" / "audit").mkdir(parents=True)
    with pytest.raises(AssertionError, match="holds an unfinished backup or restore"):
        ServeProcess(models, "--log-level", "WARNING", data_dir=tmp_path / "data")
    assert sorted(path.name for path in (tmp_path / "data").iterdir()) == [".backup-being-written"]


def test_a_backup_into_a_folder_every_user_may_read_is_owner_only(models, tmp_path):
    """DEST given as an existing empty folder keeps its own mode (a mount point's 0755): the copy inside it must be
    owner-only itself, as the kernel's 0700 data dir makes its own files."""
    code, err = ServeProcess(models, "--log-level", "WARNING", data_dir=tmp_path / "data").stop()
    assert code == 0, err
    (tmp_path / "mounted").mkdir(mode=0o755)
    os.chmod(tmp_path / "mounted", 0o755)
    done = run_cli("backup", str(tmp_path / "data"), str(tmp_path / "mounted"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "mounted" / "kernel.sqlite3").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "mounted" / "audit").stat().st_mode & 0o777 == 0o700


def test_a_stopped_kernels_store_is_copied_once(models, tmp_path, monkeypatch):
    """Its files were copied aside in DEST and backed up from there into DEST again: a destination needed twice the
    store's size (a full tmpfs refused a 660 KB store at 1.3 MB). The files copied aside are the copy."""
    import kernel.backup as backup_module

    def copied_again(*args):  # a tripwire: the stopped path's files are not backed up a second time
        raise AssertionError("a stopped kernel's store was copied twice")

    code, err = ServeProcess(models, "--log-level", "WARNING", data_dir=tmp_path / "data").stop()
    assert code == 0, err
    monkeypatch.setattr(backup_module, "_copy_store", copied_again)
    copied = backup_module.backup(tmp_path / "data", tmp_path / "copy")
    assert copied.ok and "as the stopped kernel left it" in copied.summary, copied.summary
    assert sorted(path.name for path in (tmp_path / "copy").iterdir()) == ["audit", "kernel.sqlite3"]
