"""A kernel on an archived log: it starts from the base, keeps deciding, and a review opened before the archive
is still resolved with its link to the archived decision.

A real kernel process serves the claims pipeline with small audit segments; it
is stopped, ``aios-kernel audit archive`` moves its oldest segments out, and a
kernel started on the same data dir answers keyed retries from before the
archive, decides new cases and lets a reviewer resolve the escalation made before
it. Both the live log and the archive verify strictly afterwards.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from claims_support import build_small_model, claim_request, copy_pipelines
from conftest import start_kernel
from lane_support import until
from test_task_decided_once import _automated_case, stop_before_success
from examples.claims import data
from kernel._proto.aios.kernel.v1 import kernel_pb2 as kpb
from kernel._proto.aios.kernel.v1 import kernel_pb2_grpc as kgrpc
from kernel.audit import RecordFilter, iter_directory
from kernel.audit.archive import archive
from kernel.testing.processes import ServeProcess

CLI = [sys.executable, "-m", "kernel"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120)


def test_a_kernel_goes_on_from_an_archived_log(tmp_path):
    models = build_small_model(tmp_path / "models")
    serve = ("--pipelines", str(copy_pipelines(tmp_path / "pipelines")), "--log-level", "WARNING")
    env = {"AIOS_AUDIT_SEGMENT_BYTES": "8192", "AIOS_AUDIT_STREAM_ENABLED": "true"}  # a segment every few decisions: boundaries to cut at
    cases = data.generate_cases(40, seed=7)
    large = dict(cases[0], claim_amount=90000.0)  # R04: always seen by a human
    server = ServeProcess(models, *serve, data_dir=tmp_path / "data", env=env)
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = kgrpc.DecisionServiceStub(channel)
            escalated = stub.Decide(claim_request(large, request_id="big", tenant="arch"), timeout=10)
            first = {i: stub.Decide(claim_request(case, request_id=f"r{i}", idempotency_key=f"k{i}"), timeout=10)
                     for i, case in enumerate(cases)}
    finally:
        code, err = server.stop()
    assert code == 0, err
    assert escalated.outcome == kpb.ESCALATED and escalated.review_id

    audit = tmp_path / "data" / "audit"
    cut = first[30].audit_sequence
    done = run_cli("audit", "archive", str(audit), str(tmp_path / "archive"), "--before", str(cut))
    assert done.returncode == 0, done.stdout + done.stderr
    base = min(int(path.stem) for path in audit.glob("*.seg"))
    assert escalated.audit_sequence < base <= cut

    again = ServeProcess(models, *serve, data_dir=tmp_path / "data", env=env)
    try:
        with grpc.insecure_channel(again.address) as channel:
            stub = kgrpc.DecisionServiceStub(channel)
            for i in (0, 39):  # keyed retries from before the archive: the stored answers, not new decisions
                retry = stub.Decide(claim_request(cases[i], request_id=f"r{i}", idempotency_key=f"k{i}"), timeout=10)
                assert retry.audit_sequence == first[i].audit_sequence
            new = stub.Decide(claim_request(cases[1], request_id="after"), timeout=10)
            assert new.audit_sequence > first[39].audit_sequence
            reviews = kgrpc.ReviewServiceStub(channel)
            reviews.ClaimReview(kpb.ClaimReviewRequest(review_id=escalated.review_id, reviewer="ann"), timeout=10)
            resolved = reviews.ResolveReview(kpb.ResolveReviewRequest(
                review_id=escalated.review_id, reviewer="ann", action="approve", comment="ok"), timeout=10)
            with pytest.raises(grpc.RpcError) as info:
                list(kgrpc.AuditServiceStub(channel).StreamAudit(kpb.StreamAuditRequest(from_sequence=0), timeout=10))
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION, info.value.details()
            assert f"it serves records from {base} on" in info.value.details()
    finally:
        code, err = again.stop()
    assert code == 0, err
    assert resolved.state == "RESOLVED"
    (record,) = iter_directory(audit, base, RecordFilter(kind=kpb.REVIEW_RESOLUTION))
    assert record.decision.review_id == escalated.review_id
    # The resolution still links to the escalated decision, now in the archive.
    assert record.has_link and record.links_to == escalated.audit_sequence
    (linked,) = [r for r in iter_directory(tmp_path / "archive") if r.sequence == escalated.audit_sequence]
    assert linked.decision.review_id == escalated.review_id
    for directory in (audit, tmp_path / "archive"):
        checked = run_cli("audit", "verify", str(directory), "--strict")
        assert checked.returncode == 0, checked.stdout + checked.stderr


def test_a_task_stopped_mid_attempt_keeps_its_decision_out_of_the_archive(claims_models, tmp_path, monkeypatch):
    """A clean stop can leave a task RUNNING whose attempt recorded its decision (test_task_decided_once); the next
    start takes that decision. The archive must not move it away (a review audit: the task was decided twice)."""
    pipelines, data_dir = copy_pipelines(tmp_path / "pipelines"), tmp_path / "data"
    settings = dict(pipelines=str(pipelines), data_dir=str(data_dir), pipeline_poll_s=0, audit_segment_bytes=4096)
    first = start_kernel(claims_models, **settings)
    stop_before_success(monkeypatch, first.decisions.tasks.store)  # fault injected on purpose
    try:
        with grpc.insecure_channel(f"127.0.0.1:{first.port}") as channel:
            task = kgrpc.TaskServiceStub(channel).StartTask(
                kpb.StartTaskRequest(request=claim_request(_automated_case())), timeout=10)
            until(lambda: decisions_of(first.decisions.audit.read(0, kind=kpb.DECISION), task.task_id),
                  "the task's decision record", 30, every_s=0.02)
            monkeypatch.undo()
            stub = kgrpc.DecisionServiceStub(channel)  # records after it: segment boundaries past the task's record
            for i in range(40):
                stub.Decide(claim_request(_automated_case(), request_id=f"pad{i}"), timeout=10)
        assert first.decisions.tasks.get(task.task_id).state == kpb.RUNNING
    finally:
        first.stop(grace=1)
    audit = data_dir / "audit"
    (recorded,) = decisions_of(iter_directory(audit), task.task_id)
    result = archive(audit, tmp_path / "archive", before=10 ** 9)
    assert result.first < result.end <= recorded and "stopped in an attempt" in result.held_back
    second = start_kernel(claims_models, **settings)
    try:
        done = until(lambda: (t := second.decisions.tasks.get(task.task_id)).state == kpb.SUCCEEDED and t,
                     "the task to finish", 30, every_s=0.02)
    finally:
        second.stop(grace=1)
    assert done.decision.audit_sequence == recorded
    assert decisions_of(iter_directory(audit), task.task_id) == [recorded]  # decided once, not again


def decisions_of(records, task_id: str) -> list[int]:
    return [r.sequence for r in records if r.kind == kpb.DECISION and r.task_id == task_id]


def test_a_kernel_killed_while_stopping_leaves_a_log_archive_takes_once_accepted(tmp_path):
    """(Crash audit) a kill between the "kernel stopping" record and the final checkpoint: the next start signs those
    records, and `verify --strict` fails on them from then on (the same picture as checkpoints cut by a forger), so
    `audit archive`, which verifies strictly, was refused for good. `--accept-adopted` archives past them once an
    operator has looked; without it the refusal says how."""
    models = build_small_model(tmp_path / "models")
    serve = ("--pipelines", str(copy_pipelines(tmp_path / "pipelines")), "--log-level", "WARNING")
    env = {"AIOS_AUDIT_SEGMENT_BYTES": "4096"}
    data_dir, audit = tmp_path / "data", tmp_path / "data" / "audit"
    killed = ServeProcess(models, *serve, data_dir=data_dir, env=env,
                          cli=[sys.executable, str(Path(__file__).parent / "_killed_while_stopping_kernel.py")])
    with grpc.insecure_channel(killed.address) as channel:
        stub = kgrpc.DecisionServiceStub(channel)
        for i, case in enumerate(data.generate_cases(30, seed=3)):
            stub.Decide(claim_request(case, request_id=f"r{i}"), timeout=10)
    code, _err = killed.stop()
    assert code == -9  # killed in the instant before its final checkpoint
    again = ServeProcess(models, *serve, data_dir=data_dir, env=env)  # adopts and signs them
    code, err = again.stop()
    assert code == 0, err

    strict = run_cli("audit", "verify", str(audit), "--strict")
    assert strict.returncode == 1 and "kernel stopping" in strict.stdout and "--accept-adopted" in strict.stdout
    assert run_cli("audit", "verify", str(audit)).returncode == 0  # the chain and the signatures hold
    refused = run_cli("audit", "archive", str(audit), str(tmp_path / "a"), "--before", "20")
    assert refused.returncode == 2 and "does not verify" in refused.stderr
    done = run_cli("audit", "archive", str(audit), str(tmp_path / "a"), "--before", "20", "--accept-adopted")
    assert done.returncode == 0, done.stdout + done.stderr
    assert min(int(path.stem) for path in audit.glob("*.seg")) > 0  # segments went
    assert run_cli("audit", "verify", str(audit)).returncode == 0


def test_a_start_while_the_log_is_locked_names_what_holds_it(tmp_path):
    """A start on a log an `audit archive` holds (its LOCK flocked, as the archive does while it runs) said "already
    open (another kernel process, or this one)": a second kernel meets the store's lock first, so it is the archive,
    or a process someone else runs, that a start meets here."""
    import fcntl
    import os

    models = build_small_model(tmp_path / "models")
    serve = ("--pipelines", str(copy_pipelines(tmp_path / "pipelines")), "--log-level", "WARNING")
    first = ServeProcess(models, *serve, data_dir=tmp_path / "data")
    code, err = first.stop()
    assert code == 0, err
    audit = tmp_path / "data" / "audit"
    holder = os.open(audit / "LOCK", os.O_RDWR)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        done = subprocess.run([*CLI, "serve", "--models", str(models), "--port", "0", "--data-dir",
                               str(tmp_path / "data"), *serve], capture_output=True, text=True, timeout=120)
    finally:
        os.close(holder)
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"the audit log {audit} is already open: a process holds its LOCK" in done.stderr, done.stderr
    assert "aios-kernel audit archive" in done.stderr and f"fuser {audit / 'LOCK'}" in done.stderr, done.stderr
