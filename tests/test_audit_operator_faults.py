"""What an operator (or a script) does to a running kernel's audit log, and what the kernel must do then.

``rm -rf data/audit`` under a running kernel: writes to the deleted files still succeed and even fsync, so
the kernel used to answer decisions with sequence numbers of records that vanished at its stop, with
health SERVING. It must fail-stop as after a failed write. And once the log has stopped, each decision
group used to log a traceback of its own (272 in 2 s from 4 clients): one ERROR line, then a count.

Real files, a real AuditLog and a real kernel; the faults are the operator's real file operations, except
where a test names an injected one.
"""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from claims_support import claim_request, copy_pipelines
from examples.claims import data
from kernel._proto.aios.kernel.v1 import kernel_pb2 as pb
from kernel._proto.aios.kernel.v1 import kernel_pb2_grpc as kgrpc
from kernel.audit import AuditCorrupt, AuditError, AuditLog, verify_directory
from kernel.audit.writer import FILES_CHECK_NS
from kernel.errors import Internal, KernelError
from kernel.pipelines.finisher import BatchFinisher
from kernel.store.sqlite import DATABASE_FILE
from kernel.store.sqlite_reviews import RECORDED_BEFORE

CHECK_S = FILES_CHECK_NS / 1e9
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def record(i: int) -> pb.AuditRecord:
    return pb.AuditRecord(kind=pb.DECISION, request_id=f"r{i}", payload=b"x" * 100)


def wait_for_failure(log: AuditLog, within_s: float) -> float:
    """Seconds until the log fail-stopped (it must, within ``within_s``)."""
    started = time.monotonic()
    while log.failure is None:
        assert time.monotonic() - started < within_s, "the audit log did not notice"
        time.sleep(0.01)
    return time.monotonic() - started


def _delete(directory: Path) -> None:
    shutil.rmtree(directory)


def _rename(directory: Path) -> None:
    directory.rename(directory.with_name("audit.moved"))


def _replace(directory: Path) -> None:
    directory.rename(directory.with_name("audit.moved"))
    directory.mkdir()  # a fresh, empty directory under the old name


def _delete_segment(directory: Path) -> None:
    for segment in directory.glob("*.seg"):
        segment.unlink()


def _replace_checkpoints(directory: Path) -> None:
    path = directory / "checkpoints.log"
    fresh = directory / "checkpoints.new"
    fresh.write_bytes(path.read_bytes())  # the same bytes, another file: records signed there would be lost
    fresh.replace(path)


@pytest.mark.parametrize("fault,said", [
    (_delete, "the directory is no longer there"), (_rename, "the directory is no longer there"),
    (_replace, "the directory was replaced"), (_delete_segment, ".seg was deleted"),
    (_replace_checkpoints, "checkpoints.log was replaced by another file"),
])
def test_an_idle_log_whose_files_are_removed_or_replaced_fail_stops(tmp_path, caplog, fault, said):
    """Nobody is deciding: the writer still notices within about a check interval (health goes NOT_SERVING
    then, not at the next caller's failure), says what happened and where, and refuses later records."""
    directory = tmp_path / "audit"
    log = AuditLog.open(directory)
    failures, told = [], threading.Event()
    log.failure_listeners.append(lambda error: (failures.append(error), told.set()))  # (how health hears of it)
    try:
        for i in range(5):
            log.append(record(i)).wait(5)
        with caplog.at_level(logging.ERROR, logger="aios.audit"):
            fault(directory)
            assert told.wait(CHECK_S + 2)
        (line,) = [r for r in caplog.records if r.name == "aios.audit" and r.levelno == logging.ERROR]
        assert said in line.getMessage() and f"Put the log back at {directory}" in line.getMessage()
        assert "restart the kernel" in line.getMessage()
        assert line.exc_info is None  # a finding, not a crash: no traceback
        # Health hears of it once; callers are told what happened, without the server's paths.
        assert len(failures) == 1 and "removed or replaced" in failures[0].message
        with pytest.raises(AuditError) as refused:
            log.append(record(5))
        assert refused.value.code == "UNAVAILABLE" and "takes no more records" in refused.value.message
        assert "removed or replaced" in refused.value.message and str(tmp_path) not in refused.value.message
    finally:
        log.close()


@pytest.mark.parametrize("write_here", [False, True])
def test_a_log_removed_under_load_stops_acknowledging_within_a_check_interval(tmp_path, write_here):
    """Records keep coming while the directory is moved away: the group after the next check fails, so at most
    about one interval's records are acknowledged after the move, and every one acknowledged is in the moved
    log (the error's advice, move it back, loses nothing)."""
    directory = tmp_path / "audit"
    log = AuditLog.open(directory, checkpoint_records=10**9, checkpoint_ms=10**9)  # only the timed check can see it
    acked, moved_at, error = 0, None, None
    try:
        started = time.monotonic()
        while time.monotonic() - started < 10:
            try:
                sequence, _ = log.append_many([record(acked)], write_here=write_here)[0].wait(5)
            except AuditError as exc:
                error = exc
                break
            acked = sequence + 1
            if acked == 200:
                _rename(directory)
                moved_at = time.monotonic()
        assert error is not None and "removed or replaced" in error.message, "records were acknowledged for 10 s"
        assert time.monotonic() - moved_at <= CHECK_S + 1
    finally:
        log.close()
    directory.with_name("audit.moved").rename(directory)
    with AuditLog.open(directory) as reopened:
        assert reopened.size >= acked
        assert [r.request_id for r in reopened.read(0)][:acked] == [f"r{i}" for i in range(acked)]
    assert verify_directory(directory).ok


def test_a_log_removed_while_idle_is_said_at_close(tmp_path, caplog):
    """A kernel stopped within a check interval of the removal still says so (its last records are lost)."""
    directory = tmp_path / "audit"
    log = AuditLog.open(directory)
    log.append(record(0)).wait(5)
    shutil.rmtree(directory)
    with caplog.at_level(logging.ERROR, logger="aios.audit"):
        log.close()
    assert log.failure is not None and "removed or replaced" in log.failure.message
    assert any("the directory is no longer there" in r.getMessage() and str(directory) in r.getMessage()
               for r in caplog.records if r.name == "aios.audit")


def test_the_check_keeps_off_the_group_path_between_intervals(tmp_path, monkeypatch):
    """Per group the check is one integer compare: the files are stat'ed at most once an interval (and at
    checkpoints). Counted with os.stat/os.fstat wrapped for counting only (they still run)."""
    log = AuditLog.open(tmp_path / "audit", mode="async", checkpoint_records=10**9, checkpoint_ms=10**9)
    calls = [0]
    real_stat, real_fstat = os.stat, os.fstat

    def counting(real):
        def call(*args, **kwargs):
            calls[0] += 1
            return real(*args, **kwargs)
        return call

    try:
        log.append(record(0)).wait(5)  # (the first group checks: it comes after no check at all)
        monkeypatch.setattr(os, "stat", counting(real_stat))  # (a counter around the real call: not a fault)
        monkeypatch.setattr(os, "fstat", counting(real_fstat))
        started = time.monotonic()
        for i in range(2000):
            log.append_many([record(i)], write_here=True)[0].wait(5)
        elapsed = time.monotonic() - started
    finally:
        monkeypatch.undo()
        log.close()
    assert calls[0] <= 5 * (int(elapsed / CHECK_S) + 1)  # five calls a check


def test_a_data_dir_whose_audit_log_was_removed_refuses_the_start(claims_models, tmp_path):
    """``rm -rf data/audit`` and a restart: the review store's mark says which records the log held, so in fsync
    mode the start is refused (the existing check, kernel/decisions.py ``_lost_records``), not a new log begun
    silently under a new key. Nothing here injects a fault but the removal itself."""
    from conftest import start_kernel

    pipelines, data_dir = _decided_and_stopped(claims_models, tmp_path, 3)
    with sqlite3.connect(data_dir / DATABASE_FILE) as conn:
        (mark,) = conn.execute("SELECT value FROM meta WHERE key = ?", (RECORDED_BEFORE,)).fetchone()
    assert int(mark) > 0
    shutil.rmtree(data_dir / "audit")
    with pytest.raises(AuditCorrupt) as refused:
        start_kernel(claims_models, pipelines=pipelines, data_dir=str(data_dir), pipeline_poll_s=0)
    assert "ends at record #0" in refused.value.message and "refusing to start" in refused.value.message


def _decide_until_refused(port: int, clients: int, seconds: float) -> list:
    """``clients`` threads deciding for ``seconds``; the status codes they got."""
    codes: list = []

    def client(n: int) -> None:
        cases = data.generate_cases(50, seed=60 + n)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = kgrpc.DecisionServiceStub(channel)
            deadline, i = time.monotonic() + seconds, 0
            while time.monotonic() < deadline:
                try:
                    stub.Decide(claim_request(cases[i % len(cases)], request_id=f"c{n}-{i}"), timeout=10)
                    codes.append(grpc.StatusCode.OK)
                except grpc.RpcError as exc:
                    codes.append(exc.code())
                i += 1

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return codes


def test_removing_the_audit_log_under_a_running_kernel_stops_it_and_logs_one_line(claims_models, tmp_path, caplog):
    """The audit's finding end to end: health turns NOT_SERVING by itself, decisions answer UNAVAILABLE, and
    the many groups that fail after it log one ERROR line between them, without a traceback."""
    from conftest import start_kernel

    pipelines, data_dir = str(copy_pipelines(tmp_path / "pipelines")), tmp_path / "data"
    server = start_kernel(claims_models, pipelines=pipelines, data_dir=str(data_dir), pipeline_poll_s=0)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = kgrpc.DecisionServiceStub(channel)
            case = data.generate_cases(1, seed=7)[0]
            assert stub.Decide(claim_request(case, request_id="before"), timeout=10).audit_hash
            health = health_pb2_grpc.HealthStub(channel)
            with caplog.at_level(logging.INFO, logger="aios"):
                shutil.rmtree(data_dir / "audit")
                wait_for_failure(server.decisions.audit, within_s=CHECK_S + 2)  # idle: nobody decided
                request = health_pb2.HealthCheckRequest(service="aios.kernel.v1.DecisionService")
                # The log's listeners (health among them) hear of the failure just after it is set: wait for
                # the status, not the failure (this asserted at once and failed, now and then, on a busy box).
                started = time.monotonic()
                while health.Check(request, timeout=5).status != NOT_SERVING:
                    assert time.monotonic() - started < 5, "health did not turn NOT_SERVING"
                    time.sleep(0.01)
                codes = _decide_until_refused(server.port, clients=4, seconds=1.0)
    finally:
        server.stop(grace=1)
    assert len(codes) > 20 and set(codes) == {grpc.StatusCode.UNAVAILABLE}
    finishing = [r for r in caplog.records if r.name == "aios.decisions" and "group" in r.getMessage()
                 and r.levelno >= logging.ERROR]  # (the stop's own record failing is said once more, at the stop)
    assert len(finishing) == 1, [r.getMessage()[:120] for r in finishing]
    assert finishing[0].exc_info is None and "UNAVAILABLE" in finishing[0].getMessage()
    assert "finishing decision groups failed" in finishing[0].getMessage()


class _Item:
    def __init__(self):
        self.owner = self
        self.result = None


def _finish_groups(finisher: BatchFinisher, count: int) -> list:
    """``count`` one-decision groups, one after another; their results."""
    results = []
    for _ in range(count):
        finished = threading.Event()
        item = _Item()
        assert finisher.submit([item], lambda items: finished.set())
        assert finished.wait(10)
        results.append(item.result)
    return results


def test_an_expected_group_failure_is_one_error_line_then_counted(tmp_path, caplog):
    """The finisher's groups write to a real audit log that fail-stopped (its directory removed): each answer
    is the log's UNAVAILABLE, the log shows one ERROR line without a traceback, and a later success says how
    many failed."""
    directory = tmp_path / "audit"
    log = AuditLog.open(directory)
    shutil.rmtree(directory)
    wait_for_failure(log, within_s=CHECK_S + 2)
    failing = [True]

    def finish_group(pendings):
        if failing[0]:
            log.append_many([record(i) for i in range(len(pendings))], write_here=True)[0].wait(5)
        return ["ok"] * len(pendings)

    finisher = BatchFinisher(finish_group)
    try:
        with caplog.at_level(logging.INFO, logger="aios.decisions"):
            results = _finish_groups(finisher, 30)
            failing[0] = False
            assert _finish_groups(finisher, 1) == ["ok"]
    finally:
        finisher.close()
        log.close()
    assert all(isinstance(r, AuditError) and r.code == "UNAVAILABLE" for r in results)
    errors = [r for r in caplog.records if r.name == "aios.decisions" and r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is None, [r.getMessage()[:100] for r in errors]
    assert "a group of 1 decisions was answered UNAVAILABLE" in errors[0].getMessage()
    assert any("works again, after 30 failures in a row" in r.getMessage() for r in caplog.records)


class FinisherBug(Exception):
    """The injected fault: finishing a group crashes (a bug, not a KernelError)."""


def test_an_unexpected_group_failure_keeps_its_first_traceback_and_is_rate_limited(caplog):
    def finish_group(pendings):
        raise FinisherBug("injected")

    finisher = BatchFinisher(finish_group)
    try:
        with caplog.at_level(logging.INFO, logger="aios.decisions"):
            results = _finish_groups(finisher, 30)
    finally:
        finisher.close()
    assert all(isinstance(r, Internal) for r in results)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is not None  # the bug's traceback, once
    assert "FinisherBug: injected" in errors[0].getMessage()


def test_a_data_dir_used_before_that_lost_its_whole_audit_log_and_store_says_so_at_start(model_repo, tmp_path, caplog):
    """(Operator audit) with audit/ and kernel.sqlite3* both removed nothing on disk remembers the records, so the
    start goes on — but no longer as silently as a first start: the kernel's lock file shows it ran here."""
    import shutil

    from conftest import start_kernel

    data = tmp_path / "data"
    start_kernel(model_repo, data_dir=str(data)).stop(grace=0)
    shutil.rmtree(data / "audit")
    for leftover in data.glob("kernel.sqlite3*"):
        leftover.unlink()
    with caplog.at_level(logging.WARNING, "aios.decisions"):
        start_kernel(model_repo, data_dir=str(data)).stop(grace=0)
    warnings = [r.getMessage() for r in caplog.records if "was used by a kernel before but has no audit log" in r.getMessage()]
    assert len(warnings) == 1 and str(data / "audit") in warnings[0], warnings
    caplog.clear()
    with caplog.at_level(logging.WARNING, "aios.decisions"):
        start_kernel(model_repo, data_dir=str(tmp_path / "fresh")).stop(grace=0)  # a first start says nothing
    assert not [r for r in caplog.records if "has no audit log" in r.getMessage()]


def _decided_and_stopped(claims_models, tmp_path, decisions: int = 1, **settings) -> tuple[str, Path]:
    """(pipelines folder, data dir) of a claims kernel that made ``decisions`` decisions and stopped cleanly."""
    from conftest import start_kernel

    pipelines, data_dir = str(copy_pipelines(tmp_path / "pipelines")), tmp_path / "data"
    server = start_kernel(claims_models, pipelines=pipelines, data_dir=str(data_dir), pipeline_poll_s=0, **settings)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = kgrpc.DecisionServiceStub(channel)
            for i, case in enumerate(data.generate_cases(decisions, seed=5)):
                stub.Decide(claim_request(case, request_id=f"s{i}"), timeout=10)
    finally:
        server.stop(grace=1)
    return pipelines, data_dir


def test_a_data_dir_whose_store_was_removed_refuses_the_start_and_changes_nothing(claims_models, tmp_path):
    """(Crash audit) ``rm data/kernel.sqlite3`` and a restart: it started, reopened resolved reviews as open and
    forgot every task and key. A crash cannot remove the store, so the start is refused, and nothing is made."""
    from conftest import start_kernel

    pipelines, data_dir = _decided_and_stopped(claims_models, tmp_path)
    (data_dir / DATABASE_FILE).unlink()
    before = sorted(p.relative_to(data_dir) for p in data_dir.rglob("*"))
    with pytest.raises(KernelError) as refused:
        start_kernel(claims_models, pipelines=pipelines, data_dir=str(data_dir), pipeline_poll_s=0)
    assert f"no {DATABASE_FILE}" in refused.value.message and "refusing to start" in refused.value.message
    assert sorted(p.relative_to(data_dir) for p in data_dir.rglob("*")) == before


def test_a_removed_audit_log_is_refused_before_a_new_log_and_key_are_made(claims_models, tmp_path):
    from conftest import start_kernel

    pipelines, data_dir = _decided_and_stopped(claims_models, tmp_path)
    shutil.rmtree(data_dir / "audit")
    with pytest.raises(AuditCorrupt):
        start_kernel(claims_models, pipelines=pipelines, data_dir=str(data_dir), pipeline_poll_s=0)
    assert not (data_dir / "audit").exists()


def test_a_refused_start_names_the_audit_log_when_its_reason_names_a_segment_only(claims_models, tmp_path):
    """(Crash audit) "ERROR 00000000000000000187.seg starts at record 187 but ...": neither the directory nor the
    data dir was named, unlike every other refusal."""
    from conftest import start_kernel

    small = {"audit_segment_bytes": 16384, "audit_preallocate_bytes": 0}
    pipelines, data_dir = _decided_and_stopped(claims_models, tmp_path, 120, **small)
    segments = sorted((data_dir / "audit").glob("*.seg"))
    assert len(segments) >= 3
    segments[1].unlink()
    with pytest.raises(AuditCorrupt) as refused:
        start_kernel(claims_models, pipelines=pipelines, data_dir=str(data_dir), pipeline_poll_s=0, **small)
    assert refused.value.message.startswith(f"audit log {data_dir / 'audit'}: {segments[2].name} starts at record")


def test_a_write_the_disk_refuses_is_one_error_line_saying_what_to_do(tmp_path, caplog):
    """(Incident drill: `ulimit -f` in the kernel's shell) the segment's write failed with EFBIG and the writer
    logged a Python traceback for it, as for a bug, and no word of what to do. A real file-size limit here
    (RLIMIT_FSIZE, this process only, restored after); SIGXFSZ is ignored by Python, so the write sees EFBIG."""
    import errno
    import resource

    directory = tmp_path / "audit"
    log = AuditLog.open(directory, preallocate_bytes=0)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    try:
        for i in range(5):
            log.append(record(i)).wait(5)
        segment = max(directory.glob("*.seg"))
        with caplog.at_level(logging.ERROR, logger="aios.audit"):
            resource.setrlimit(resource.RLIMIT_FSIZE, (segment.stat().st_size + 4096, hard))
            with pytest.raises(AuditError):
                for i in range(5, 200):
                    log.append(record(i)).wait(5)
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        assert log.failure is not None
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        log.close()
    (line,) = [r for r in caplog.records if r.name == "aios.audit" and r.levelno == logging.ERROR]
    assert line.exc_info is None  # the disk's answer, not a bug
    message = line.getMessage()
    assert f"writing {directory} failed: File too large ({errno.errorcode[errno.EFBIG]})" in message
    assert "ulimit -f" in message and "restart the kernel" in message and "NOT_SERVING" in message
