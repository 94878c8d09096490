"""Faults of the environment under a serving kernel (a full disk, a file-size limit, a data dir made read-only):
each caller gets a clear status, the log says so once per episode, and what was answered OK is kept.

A drill (a real ``aios-kernel serve`` with its data dir on a 24 MB tmpfs, the disk filled under a mixed load of
Decide, StartTask, ModelInfer and reviewers) found what these hold. Real claims kernels over gRPC; where a fault is
injected in code rather than by the environment, the test says so.
"""

from __future__ import annotations

import errno
import logging

import grpc
import pytest

from claims_support import UNSURE_CASE, claim_request
from conftest import start_claims_kernel
from kernel._proto.aios.kernel.v1 import kernel_pb2 as kpb
from kernel._proto.aios.kernel.v1 import kernel_pb2_grpc as kgrpc
from kernel.audit import RecordFilter, iter_directory, verify_directory

TIMEOUT_S = 20


def test_a_resolution_after_the_audit_log_failed_is_unavailable_in_one_log_line_and_recorded_after_restart(
        claims_models, tmp_path, caplog):
    """The drill: once the full disk had fail-stopped the audit log, each reviewer's ResolveReview answered INTERNAL
    ("finishing it failed: AuditError: ...") and logged an ERROR with a traceback (300 in 7 s: "on_resolved hook
    <bound method ...> failed"), the log's own failure, not a bug. It is UNAVAILABLE now, said once in the log
    however many reviewers retry, and the restart the log asks for records the resolution (once).
    The fault: the log's own fail-stop, called as a write the disk refused calls it (injected on purpose)."""
    kernel = start_claims_kernel(claims_models, tmp_path)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{kernel.port}") as channel:
            decisions, reviews = kgrpc.DecisionServiceStub(channel), kgrpc.ReviewServiceStub(channel)
            escalated = [decisions.Decide(claim_request(UNSURE_CASE), timeout=TIMEOUT_S) for _ in range(3)]
            assert all(answer.review_id for answer in escalated), "the unsure claim was not sent to review"
            kernel.decisions.audit._fail(OSError(errno.ENOSPC, "No space left on device"))  # injected fault
            with caplog.at_level(logging.ERROR, logger="aios"):
                for answer in escalated:
                    reviews.ClaimReview(kpb.ClaimReviewRequest(review_id=answer.review_id, reviewer="ann",
                                                               lease_seconds=600), timeout=TIMEOUT_S)
                    for _ in range(2):  # the reviewer tries again, as the answer says
                        with pytest.raises(grpc.RpcError) as refused:
                            reviews.ResolveReview(kpb.ResolveReviewRequest(
                                review_id=answer.review_id, reviewer="ann", action="approve", comment="checked"),
                                timeout=TIMEOUT_S)
                        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value.details()
                        assert "the audit log failed" in refused.value.details()
            said = [r for r in caplog.records if r.name == "aios.review"]
            assert len(said) == 1, [r.getMessage() for r in said]
            assert said[0].exc_info is None, "the log's failure is no bug: no traceback"
    finally:
        kernel.stop(grace=1)

    kernel = start_claims_kernel(claims_models, tmp_path)  # the operator freed space and restarted
    try:
        with grpc.insecure_channel(f"127.0.0.1:{kernel.port}") as channel:
            reviews = kgrpc.ReviewServiceStub(channel)
            for answer in escalated:
                review = reviews.GetReview(kpb.ReviewRef(review_id=answer.review_id), timeout=TIMEOUT_S)
                assert review.state == "RESOLVED" and review.resolution.audit_sequence, review
    finally:
        kernel.stop(grace=1)
    audit = tmp_path / "data" / "audit"
    assert verify_directory(audit, strict=True).ok
    resolved = [r.decision.review_id for r in iter_directory(audit, wanted=RecordFilter(kind=kpb.REVIEW_RESOLUTION))]
    assert sorted(resolved) == sorted(answer.review_id for answer in escalated)


def test_a_store_at_the_file_size_limit_stays_refusing_until_the_limit_is_lifted(tmp_path, caplog):
    """A drill (`aios-kernel serve` under RLIMIT_FSIZE): the refusing state's probe, one small row that still fits in
    the write-ahead log's old frames, committed under the limit; the store was taken for recovered, the next real
    write failed again, and health and the log flapped ("takes writes again" / "refusing writes" / "health is
    NOT_SERVING", each second). It stays refusing while kernel.sqlite3 or its log is at the limit, as on a full
    disk. A real limit (RLIMIT_FSIZE, this process only, restored after; Python ignores SIGXFSZ)."""
    from kernel.review import ReviewQueue
    from kernel.store import open_database
    from lane_support import until
    from test_store_operator_errors import big_case, refusing_at_the_file_size_limit

    db = open_database(tmp_path / "data")
    queue = ReviewQueue(db)
    try:
        with caplog.at_level(logging.WARNING, logger="aios.store"):
            with refusing_at_the_file_size_limit(db, queue):
                assert "file-size limit" in db.refusing_writes
                probes = db.write_probes
                until(lambda: db.write_probes >= probes + 2 or db.refusing_writes is None, "two probes", TIMEOUT_S)
                assert db.refusing_writes is not None, "taken for recovered while at the file-size limit"
            until(lambda: db.refusing_writes is None, "the store taking writes again once the limit is lifted",
                  TIMEOUT_S)
        said = [r.getMessage() for r in caplog.records if r.name == "aios.store"]
        assert len(said) == 2 and "refusing writes" in said[0] and "takes writes again" in said[1], said
        queue.create_many([big_case(99)])
    finally:
        db.close()


def _serve_with_limits(models, pipelines, data_dir, limits: dict, env: dict | None = None):
    """``aios-kernel serve`` whose process starts under ``limits`` ({RLIMIT_*: (soft, hard)}), as a shell's
    ``ulimit`` or a systemd unit's Limit*= starts it."""
    import os
    import sys

    from kernel.testing.processes import ServeProcess

    code = ("import resource, runpy, sys\n"
            f"for name, pair in {limits!r}.items(): resource.setrlimit(getattr(resource, name), pair)\n"
            "sys.argv = ['aios-kernel', *sys.argv[1:]]\n"
            "runpy.run_module('kernel', run_name='__main__')\n")
    return ServeProcess(models, "--pipelines", str(pipelines), data_dir=data_dir, cli=[sys.executable, "-c", code],
                        env={**os.environ, "AIOS_PIPELINE_POLL_S": "0", **(env or {})})


def _soft_open_files(pid: int) -> int:
    with open(f"/proc/{pid}/limits", encoding="ascii") as limits:
        for line in limits:
            if line.startswith("Max open files"):
                return int(line.split()[3])
    raise AssertionError("no 'Max open files' in /proc/PID/limits")


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/limits"), reason="reads /proc/PID/limits (Linux)")
def test_serve_raises_its_open_file_limit_to_the_hard_limit(claims_models, tmp_path):
    """systemd starts a service with 1024 open files (soft) under a hard limit of 524288: the kernel served with
    1024, a descriptor per client connection, and a flood of idle connections ran it out (new clients timed out,
    and the audit log could not open its next segment). The serving process raises its soft limit to the hard one,
    as Go's runtime and nginx do; the start line warns only when the hard limit itself is low."""
    import resource

    from claims_support import copy_pipelines

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    wanted = 4096 if hard == resource.RLIM_INFINITY else min(hard, 4096)
    if wanted <= 256:
        pytest.skip(f"this process's hard open-file limit is {hard}")
    kernel = _serve_with_limits(claims_models, copy_pipelines(tmp_path / "pipelines"), tmp_path / "data",
                                {"RLIMIT_NOFILE": (256, wanted)})
    try:
        assert _soft_open_files(kernel.proc.pid) == wanted
    finally:
        code, err = kernel.stop()
    assert code == 0, err
    assert "open-file limit (RLIMIT_NOFILE) is" not in err, err


@pytest.mark.skipif(not __import__("os").path.isdir("/proc/self/fd"), reason="counts /proc/PID/fd (Linux)")
def test_an_audit_log_rotating_while_connections_hold_every_descriptor_goes_on(claims_models, tmp_path):
    """A drill (`aios-kernel serve` under `ulimit -n 64`, idle connections opened until the kernel had no descriptor
    left): the audit log's next segment was created in the slot the full one freed, but making the creation durable
    opened the folder, a second descriptor: EMFILE, and the log fail-stopped for good (every Decide UNAVAILABLE
    until a restart, for connections a client could close a moment later). A rotation needs no descriptor beyond
    the one it frees now. Real limits, real connections (HTTP/2 prefaces that send nothing more)."""
    import os
    import socket

    from claims_support import copy_pipelines
    from examples.claims import data
    from lane_support import until

    limit = 128
    kernel = _serve_with_limits(claims_models, copy_pipelines(tmp_path / "pipelines"), tmp_path / "data",
                                {"RLIMIT_NOFILE": (limit, limit)},
                                env={"AIOS_AUDIT_SEGMENT_BYTES": "8192", "AIOS_AUDIT_PREALLOCATE_BYTES": "4096"})
    flood: list[socket.socket] = []
    try:
        with grpc.insecure_channel(kernel.address) as channel:
            decisions = kgrpc.DecisionServiceStub(channel)
            decisions.Decide(claim_request(UNSURE_CASE), timeout=TIMEOUT_S)  # (this client's connection is open)
            used = lambda: len(os.listdir(f"/proc/{kernel.proc.pid}/fd"))  # noqa: E731
            while used() < limit and len(flood) < 2 * limit:
                flood.append(socket.create_connection(kernel.address.rsplit(":", 1)))
                flood[-1].sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
                if len(flood) % 16 == 0:
                    until(lambda: used() >= min(limit, len(flood)), "the kernel taking the connections", TIMEOUT_S)
            until(lambda: used() >= limit, "every descriptor of the kernel in use", TIMEOUT_S)
            cases = data.generate_cases(60, seed=5)
            answers = [decisions.Decide(claim_request(case, tenant="flood"), timeout=TIMEOUT_S) for case in cases]
            assert answers[-1].audit_sequence - answers[0].audit_sequence == len(cases) - 1
            segments = list((tmp_path / "data" / "audit").glob("*.seg"))
            assert len(segments) >= 3, f"the log did not rotate ({len(segments)} segments)"
    finally:
        for connection in flood:
            connection.close()
        code, err = kernel.stop()
    assert code == 0, err
    assert "the log takes no more records" not in err, err
    assert verify_directory(tmp_path / "data" / "audit", strict=True).ok


def test_with_exit_on_fail_stop_serve_exits_75_once_its_audit_log_fail_stops(claims_models, tmp_path):
    """A supervisor that restarts on failure but reads no health check (systemd's Restart=on-failure) never restarted
    a kernel whose audit log had fail-stopped: it stayed up NOT_SERVING. With ``exit_on_fail_stop`` it stops and
    exits 75 (EX_TEMPFAIL), saying why; without it, it keeps serving NOT_SERVING as before. The fault: the log's
    folder moved away under the running kernel (the writer's own check finds it)."""
    import os
    import subprocess

    from claims_support import copy_pipelines
    from kernel.testing.processes import ServeProcess

    pipelines = copy_pipelines(tmp_path / "pipelines")
    for exits in (True, False):
        data_dir = tmp_path / f"data-{exits}"
        env = dict(os.environ, AIOS_EXIT_ON_FAIL_STOP=str(exits).lower())
        server = ServeProcess(claims_models, "--pipelines", str(pipelines), data_dir=data_dir, env=env)
        try:
            with grpc.insecure_channel(server.address) as channel:
                kgrpc.DecisionServiceStub(channel).Decide(claim_request(UNSURE_CASE), timeout=TIMEOUT_S)
            (data_dir / "audit").rename(data_dir / "audit.moved")
            if exits:
                code = server.proc.wait(timeout=TIMEOUT_S)
                err = server.proc.stderr.read()
                assert code == 75, err
                assert "exit_on_fail_stop: stopping the kernel, exit code 75" in err, err
            else:
                with pytest.raises(subprocess.TimeoutExpired):  # (the check interval is 1 s: it has failed by then)
                    server.proc.wait(timeout=3)
                code, err = server.stop()
                assert "health is NOT_SERVING: the audit log" in err and code == 1, (code, err)
        finally:
            if server.proc.poll() is None:
                server.kill()
