"""The environment running out under a serving kernel (file descriptors, memory): every call that needed more is
answered UNAVAILABLE with a ``retry-after-ms`` hint, naming the fault in the OS's words and no file of the server
(never INTERNAL with a request id and a traceback per call); the log says so in one line for the episode, with what
to do; once the resource is back, the same calls work (kernel/os_faults.py).

A real ``aios-kernel serve`` under a real open-file limit, its descriptors taken by real idle connections; and, for
the paths that open no file of their own, an in-process kernel whose steps raise the OS's error (an injected fault,
named so where it is made)."""

from __future__ import annotations

import errno
import logging
import os
import socket

import grpc
import pytest

from claims_support import UNSURE_CASE, claim_request, copy_pipelines
from conftest import module_claims_kernel
from kernel._proto.aios.kernel.v1 import kernel_pb2 as kpb
from kernel._proto.aios.kernel.v1 import kernel_pb2_grpc as kgrpc
from kernel._proto.inference import grpc_service_pb2 as ipb
from kernel._proto.inference import grpc_service_pb2_grpc as igrpc
from lane_support import until
from test_serving_faults import _serve_with_limits

TIMEOUT_S = 20
LIMIT = 128  # the open-file limit the served kernel runs under
SECRET = "/srv/aios-private/audit/00000000000000000042.seg"  # a server path no caller may learn

server, channel = module_claims_kernel("os_faults", front_ends=("sync", "aio"))


def _refusal(call):
    """(code, details, trailers) of the call's error; ("OK", "", {}) if it was answered."""
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code().name, exc.details(), dict(exc.trailing_metadata() or ())
    return "OK", "", {}


def _raises(fault: BaseException):
    def step(*_args, **_kwargs):
        raise fault  # injected fault: the OS's answer where a step would have opened a file or taken memory
    return step


def test_every_front_end_path_answers_an_environment_fault_unavailable_with_a_hint(server, channel, monkeypatch,
                                                                                    caplog):
    decisions, reviews = kgrpc.DecisionServiceStub(channel), kgrpc.ReviewServiceStub(channel)
    inference = igrpc.GRPCInferenceServiceStub(channel)
    escalated = decisions.Decide(claim_request(UNSURE_CASE), timeout=TIMEOUT_S)
    assert escalated.review_id
    emfile = OSError(errno.EMFILE, "Too many open files", SECRET)
    side = server.decisions
    monkeypatch.setattr(side.reviews, "claim_next", _raises(emfile))
    monkeypatch.setattr(side.reviews, "get", _raises(emfile))
    monkeypatch.setattr(side.engine, "prepare", _raises(emfile))
    monkeypatch.setattr(server.service.hub, "get", _raises(emfile))
    before = server.service.refusals.snapshot()
    unary = {
        "ReviewService.ClaimNextReview": lambda: reviews.ClaimNextReview(kpb.ClaimNextReviewRequest(reviewer="ann"),
                                                                         timeout=TIMEOUT_S),
        "ReviewService.GetReview": lambda: reviews.GetReview(kpb.ReviewRef(review_id=escalated.review_id),
                                                             timeout=TIMEOUT_S),
        "DecisionService.Decide": lambda: decisions.Decide(claim_request(UNSURE_CASE), timeout=TIMEOUT_S),
        "GRPCInferenceService.ModelInfer": lambda: inference.ModelInfer(
            ipb.ModelInferRequest(model_name="claims_triage"), timeout=TIMEOUT_S),
    }
    with caplog.at_level(logging.WARNING, logger="aios"):
        for rpc, call in unary.items():
            code, details, trailers = _refusal(call)
            assert code == "UNAVAILABLE", (rpc, code, details)
            assert "ran out of file descriptors (EMFILE: Too many open files)" in details, (rpc, details)
            assert SECRET not in details and "aios-private" not in details, (rpc, details)
            assert trailers.get("retry-after-ms") == "1000", (rpc, trailers)
            assert "aios-not-decided" not in trailers, "nothing says the call decided nothing"
        streamed = list(decisions.DecideStream(iter([claim_request(UNSURE_CASE)] * 2), timeout=TIMEOUT_S))
        assert [a.error_code for a in streamed] == ["UNAVAILABLE"] * 2, streamed
        assert all(a.retry_after_ms == 1000 and "EMFILE" in a.error_message and SECRET not in a.error_message
                   for a in streamed), streamed
        infers = list(inference.ModelStreamInfer(iter([ipb.ModelInferRequest(model_name="claims_triage", id="a")]),
                                                 timeout=TIMEOUT_S))
        assert [a.error_message.partition(":")[0] for a in infers] == ["UNAVAILABLE"], infers
        assert "EMFILE" in infers[0].error_message and SECRET not in infers[0].error_message
        monkeypatch.setattr(side.engine, "prepare", _raises(MemoryError()))  # injected fault: out of memory
        code, details, trailers = _refusal(unary["DecisionService.Decide"])
        assert (code, trailers.get("retry-after-ms")) == ("UNAVAILABLE", "1000"), (code, details)
        assert "ran out of memory (ENOMEM" in details, details
    traced = [r.getMessage() for r in caplog.records if r.exc_info]
    assert not traced, f"an environment fault is no bug, no traceback: {traced}"
    assert not [r for r in caplog.records if "internal error" in r.getMessage()]
    said = [r.getMessage() for r in caplog.records if r.name == "aios.os"]
    for fault in ("EMFILE", "ENOMEM"):  # one line for each episode (the first front end's test logs it)
        assert len([line for line in said if fault in line]) <= 1, said
    after = server.service.refusals.snapshot()
    for rpc in unary:  # counted under the status they were answered with (aios_calls_failed_total)
        assert after.get((rpc, "UNAVAILABLE"), 0) > before.get((rpc, "UNAVAILABLE"), 0), rpc
        assert after.get((rpc, "INTERNAL"), 0) == before.get((rpc, "INTERNAL"), 0), rpc
    monkeypatch.undo()  # the resource is back
    assert reviews.GetReview(kpb.ReviewRef(review_id=escalated.review_id), timeout=TIMEOUT_S).review_id
    assert decisions.Decide(claim_request(UNSURE_CASE), timeout=TIMEOUT_S).review_id


def test_a_stream_whose_thread_cannot_be_started_is_unavailable_with_a_hint(server, channel, monkeypatch, caplog):
    """At the limit on threads (ulimit -u, a container's pids limit) a stream's call could not start its thread
    (the threaded front end's ModelStreamInfer reader, grpc.aio's server-stream worker): the handler's
    RuntimeError "can't start new thread" escaped to gRPC, which answered UNKNOWN "Exception iterating responses"
    with its own traceback. UNAVAILABLE with a hint now, as for any fault of the environment."""
    import threading

    refused = "aios-stream-reader" if server.front_end == "sync" else "aio-"
    real_start = threading.Thread.start

    def start(thread):
        if thread.name.startswith(refused):
            raise RuntimeError("can't start new thread")  # injected fault: pthread_create's EAGAIN
        return real_start(thread)

    monkeypatch.setattr(threading.Thread, "start", start)
    if server.front_end == "sync":
        call = lambda: list(igrpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(  # noqa: E731
            iter([ipb.ModelInferRequest(model_name="claims_triage")]), timeout=TIMEOUT_S))
    else:
        call = lambda: list(kgrpc.ReviewServiceStub(channel).WatchReviews(  # noqa: E731
            kpb.WatchReviewsRequest(include_open=True), timeout=TIMEOUT_S))
    with caplog.at_level(logging.WARNING, logger="aios"):
        code, details, trailers = _refusal(call)
    assert code == "UNAVAILABLE", (code, details)
    assert details.startswith("the kernel's process could not start a thread (EAGAIN: "), details
    assert trailers.get("retry-after-ms") == "1000", trailers
    assert not [r.getMessage() for r in caplog.records if r.exc_info], "no traceback"


def _flood(kernel, limit: int) -> list[socket.socket]:
    """Idle connections (HTTP/2 prefaces that send nothing more) until the kernel has no descriptor left."""
    flood: list[socket.socket] = []
    while _used(kernel) < limit and len(flood) < 2 * limit:
        flood.append(socket.create_connection(kernel.address.rsplit(":", 1)))
        flood[-1].sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        if len(flood) % 16 == 0:
            until(lambda: _used(kernel) >= min(limit, len(flood)), "the kernel taking the connections", TIMEOUT_S)
    until(lambda: _used(kernel) >= limit, "every descriptor of the kernel in use", TIMEOUT_S)
    return flood


def _used(kernel) -> int:
    return len(os.listdir(f"/proc/{kernel.proc.pid}/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts /proc/PID/fd (Linux)")
def test_calls_while_the_kernel_has_no_descriptor_left_are_unavailable_and_logged_once(claims_models, tmp_path):
    """A drill (`ulimit -n 128`, idle connections holding every descriptor): ResolveReview, which reads the
    decision's record from the audit log, answered INTERNAL quoting the segment's path, with a traceback in the log
    per call ("on_resolved hook ... failed"). UNAVAILABLE with a hint now, one line in the log, and the same
    resolution goes through once the connections are gone. No call gets INTERNAL meanwhile."""
    kernel = _serve_with_limits(claims_models, copy_pipelines(tmp_path / "pipelines"), tmp_path / "data",
                                {"RLIMIT_NOFILE": (LIMIT, LIMIT)}, env={"AIOS_AUDIT_STREAM_ENABLED": "1"})
    flood: list[socket.socket] = []
    try:
        with grpc.insecure_channel(kernel.address) as channel:
            decisions, reviews = kgrpc.DecisionServiceStub(channel), kgrpc.ReviewServiceStub(channel)
            inference = igrpc.GRPCInferenceServiceStub(channel)
            escalated = [decisions.Decide(claim_request(UNSURE_CASE), timeout=TIMEOUT_S) for _ in range(2)]
            resolve = lambda: reviews.ResolveReview(kpb.ResolveReviewRequest(  # noqa: E731
                review_id=escalated[0].review_id, reviewer="ann", action="approve", comment="checked"),
                timeout=TIMEOUT_S)
            reviews.ClaimReview(kpb.ClaimReviewRequest(review_id=escalated[0].review_id, reviewer="ann",
                                                       lease_seconds=600), timeout=TIMEOUT_S)
            flood = _flood(kernel, LIMIT)
            for _ in range(3):  # the reviewer tries again, as the answer says
                code, details, trailers = _refusal(resolve)
                assert code == "UNAVAILABLE", (code, details)
                assert "ran out of file descriptors (EMFILE: Too many open files)" in details, details
                assert str(tmp_path) not in details and ".seg" not in details, details
                assert trailers.get("retry-after-ms") == "1000", trailers
            others = {
                "ClaimNextReview": lambda: reviews.ClaimNextReview(kpb.ClaimNextReviewRequest(reviewer="bob"),
                                                                   timeout=TIMEOUT_S),
                "GetReview": lambda: reviews.GetReview(kpb.ReviewRef(review_id=escalated[1].review_id),
                                                       timeout=TIMEOUT_S),
                "Decide": lambda: decisions.Decide(claim_request(UNSURE_CASE), timeout=TIMEOUT_S),
                # (each of these opens a file: an audit segment, the model repository's folders)
                "StreamAudit": lambda: list(kgrpc.AuditServiceStub(channel).StreamAudit(
                    kpb.StreamAuditRequest(from_sequence=0), timeout=TIMEOUT_S)),
                "RepositoryIndex": lambda: inference.RepositoryIndex(ipb.RepositoryIndexRequest(), timeout=TIMEOUT_S),
                "RepositoryModelLoad": lambda: inference.RepositoryModelLoad(
                    ipb.RepositoryModelLoadRequest(model_name="claims_triage"), timeout=TIMEOUT_S),
            }
            for rpc, call in others.items():
                code, details, trailers = _refusal(call)
                assert code == "OK" or (code == "UNAVAILABLE" and "retry-after-ms" in trailers), (rpc, code, details)
            for connection in flood:
                connection.close()
            flood = []
            until(lambda: _used(kernel) < LIMIT - 16, "the kernel closing the idle connections", TIMEOUT_S)
            resolved = resolve()
            assert resolved.state == "RESOLVED" and resolved.resolution.audit_sequence, resolved
            assert [m.state for m in inference.RepositoryIndex(ipb.RepositoryIndexRequest(), timeout=TIMEOUT_S).models
                    ] == ["READY"], "the load refused for want of a descriptor left the model serving"
    finally:
        for connection in flood:
            connection.close()
        code, err = kernel.stop()
    assert code == 0, err
    said = [line for line in err.splitlines() if "ran out of file descriptors" in line]
    assert len(said) == 1, said
    assert "ulimit -n" in said[0] and "EMFILE" in said[0] and str(tmp_path) not in said[0], said
    assert "Traceback" not in err and "internal error" not in err, err



CLI_OUT_OF_DESCRIPTORS = """\
import os, resource, sys
from kernel.cli import main
resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
held = []
while True:  # injected fault: every descriptor this process may have is taken
    try:
        held.append(os.open(os.devnull, os.O_RDONLY))
    except OSError:
        break
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("argv", [["audit", "verify", "{data}"], ["policy", "check", "{data}"]])
def test_a_command_out_of_descriptors_says_so_in_one_line(tmp_path, argv):
    """`aios-kernel audit verify` (or any command) in a process with no descriptor left printed a traceback
    ending in "OSError: [Errno 24] Too many open files: '.../kernel/audit/__init__.py'" (a module imported on
    first use): one line saying what ran out and what to do now, exit EX_OSERR."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", CLI_OUT_OF_DESCRIPTORS, *(a.format(data=tmp_path) for a in argv)],
                          capture_output=True, text=True, timeout=TIMEOUT_S, cwd=os.path.dirname(os.path.dirname(
                              os.path.abspath(__file__))))
    assert done.returncode == os.EX_OSERR, done.stderr
    assert done.stderr.splitlines() == ["aios-kernel: this process ran out of file descriptors (EMFILE: Too many "
                                        "open files): raise its open-file limit (ulimit -n)"], done.stderr


def test_a_call_whose_handler_thread_cannot_be_started_is_not_run_later(claims_models, tmp_path, monkeypatch):
    """The threaded front end's pool starts a thread for a call when none is idle. At the limit on threads that
    failed after the call was queued and the pool had counted the thread as a worker: the call was answered
    UNAVAILABLE "the kernel is stopping: this call was not run" (it was not stopping), and the pool counted a worker
    it never had (each such failure one fewer for good). Now the answer says what ran out, with its hint; nothing of
    the call is queued or run, and the pool grows again once threads can be had."""
    import threading

    from conftest import start_claims_kernel

    kernel = start_claims_kernel(claims_models, tmp_path, front_end="sync")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{kernel.port}") as channel:
            decisions, reviews = kgrpc.DecisionServiceStub(channel), kgrpc.ReviewServiceStub(channel)
            pool = kernel._pool
            watch = reviews.WatchReviews(kpb.WatchReviewsRequest(), timeout=TIMEOUT_S)  # holds a pool thread
            until(lambda: pool.in_progress() == 1, "the watch on a pool thread", TIMEOUT_S)
            threads = lambda: [t for t in threading.enumerate() if t.name.startswith("aios-grpc")]  # noqa: E731
            assert len(threads()) == 1, "no idle pool thread: the next call needs a new one"
            real_start = threading.Thread.start

            def start(thread):
                if thread.name.startswith("aios-grpc"):
                    raise RuntimeError("can't start new thread")  # injected fault: pthread_create's EAGAIN
                return real_start(thread)

            monkeypatch.setattr(threading.Thread, "start", start)
            code, details, trailers = _refusal(
                lambda: decisions.Decide(claim_request(UNSURE_CASE, request_id="no-thread-1"), timeout=TIMEOUT_S))
            monkeypatch.undo()
            assert code == "UNAVAILABLE", (code, details)
            assert details.startswith("the kernel's process could not start a thread (EAGAIN: "), details
            assert trailers.get("aios-not-decided") == "1" and trailers.get("retry-after-ms") == "1000", trailers
            assert pool.in_progress() == 1 and len(threads()) == 1, "the call that found no thread is not counted"
            other = reviews.WatchReviews(kpb.WatchReviewsRequest(), timeout=TIMEOUT_S)  # threads can be had again
            until(lambda: pool.in_progress() == 2 and len(threads()) == 2, "a second pool thread", TIMEOUT_S)
            watch.cancel()
            other.cancel()
            until(lambda: pool.in_progress() == 0, "the pool's calls finished", TIMEOUT_S)
            assert decisions.Decide(claim_request(UNSURE_CASE, request_id="no-thread-2"), timeout=TIMEOUT_S)
            recorded = [r.decision.request_id for r in kernel.decisions.audit.read(from_sequence=0, kind=kpb.DECISION)]
            assert "no-thread-2" in recorded and "no-thread-1" not in recorded, recorded
    finally:
        kernel.stop(grace=1)
