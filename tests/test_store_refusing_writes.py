"""While another process holds the store's write lock, new work that needs the store is refused at once, health says
NOT_SERVING, and the kernel recovers by itself once the lock is let go, with nothing acknowledged lost.

A drill held kernel.sqlite3's write lock for 25 s under keyed Decide load: each keyed answer's entry waited the 10 s
busy timeout in turn, no caller got an answer for the whole 25 s, and health said SERVING throughout.

A real claims kernel over gRPC; the lock is real (another connection holds BEGIN IMMEDIATE, as an operator's tool
would). One fault injected on purpose, named so: the kernel's SQLite busy timeout is cut from 10 s to 100 ms so the
first refusal comes quickly.
"""

from __future__ import annotations

import sqlite3
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from claims_support import claim_request
from conftest import free_port, start_claims_kernel
from examples.claims import data
from kernel._proto.aios.kernel.v1 import kernel_pb2 as kpb
from kernel._proto.aios.kernel.v1 import kernel_pb2_grpc as kgrpc
from kernel._proto.inference import grpc_service_pb2 as ipb
from kernel._proto.inference import grpc_service_pb2_grpc as igrpc
from kernel.pipelines import group_finish
from kernel.store import sqlite as sqlite_store
from lane_support import until

TIMEOUT_S = 20
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def gauge(port: int, name: str) -> float:
    """One unlabelled sample of the metrics endpoint."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(f"{name} "):
                return float(line.split()[1])
    raise AssertionError(f"{name} is not on /metrics")


def request(n: int, key: str = "") -> kpb.DecisionRequest:
    return claim_request(data.generate_cases(n + 1, seed=11)[n], tenant="refusing", idempotency_key=key)


def health(channel) -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status


def server_ready(channel) -> bool:
    return igrpc.GRPCInferenceServiceStub(channel).ServerReady(ipb.ServerReadyRequest(), timeout=5).ready


def test_a_store_whose_write_lock_is_held_refuses_new_work_and_recovers_alone(claims_models, tmp_path, monkeypatch):
    monkeypatch.setattr(sqlite_store, "BUSY_TIMEOUT_MS", 100)  # fault injected on purpose: a refusal in 100 ms
    server = start_claims_kernel(claims_models, tmp_path, metrics_port=free_port())
    acked: dict[str, kpb.Decision] = {}
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            decisions = kgrpc.DecisionServiceStub(channel)
            tasks = kgrpc.TaskServiceStub(channel)
            for n in range(4):
                acked[f"k{n}"] = decisions.Decide(request(n, f"k{n}"), timeout=TIMEOUT_S)
            lock = sqlite3.connect(Path(server.settings.data_dir) / "kernel.sqlite3", isolation_level=None)
            try:
                lock.execute("BEGIN IMMEDIATE")  # another process holds the store's write lock
                # The first keyed Decide after it is decided (nothing said the store refused yet): answered, its
                # entry kept in memory until the store takes writes again.
                acked["k4"] = decisions.Decide(request(4, "k4"), timeout=TIMEOUT_S)
                until(lambda: health(channel) == NOT_SERVING, "health NOT_SERVING while the store refuses writes",
                      TIMEOUT_S, every_s=0.01)
                assert not server_ready(channel)
                assert gauge(server.metrics_port, "aios_store_refusing_writes") == 1
                assert gauge(server.metrics_port, "aios_ready") == 0
                recorded = server.decisions.audit.size
                with pytest.raises(grpc.RpcError) as refused:
                    decisions.Decide(request(5, "k5"), timeout=TIMEOUT_S)
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value.details()
                assert "k5" in refused.value.details() and "locked by another process" in refused.value.details()
                assert dict(refused.value.trailing_metadata())["retry-after-ms"] == "1000"
                assert server.decisions.audit.size == recorded, "a refused decision was decided all the same"
                with pytest.raises(grpc.RpcError) as refused:
                    tasks.StartTask(kpb.StartTaskRequest(request=request(6)), timeout=TIMEOUT_S)
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value.details()
                assert dict(refused.value.trailing_metadata())["retry-after-ms"] == "1000"
                replay = decisions.Decide(request(4, "k4"), timeout=TIMEOUT_S)  # a retry needs no write: answered
                assert replay.replayed and replay.audit_sequence == acked["k4"].audit_sequence
            finally:
                lock.execute("ROLLBACK")  # the store takes writes again
                lock.close()
            until(lambda: health(channel) == SERVING, "health SERVING once the store takes writes", TIMEOUT_S,
                  every_s=0.01)
            assert server_ready(channel) and gauge(server.metrics_port, "aios_store_refusing_writes") == 0
            until(lambda: server.decisions.idempotency.unwritten() == 0, "the kept entry stored", TIMEOUT_S)
            acked["k5"] = decisions.Decide(request(5, "k5"), timeout=TIMEOUT_S)
            task = tasks.StartTask(kpb.StartTaskRequest(request=request(6)), timeout=TIMEOUT_S)
    finally:
        server.stop(grace=1)
    assert any(answer.review_id for answer in acked.values()), "no acknowledged decision was escalated"
    # After a restart: every acknowledged decision's key and review, and the acknowledged task.
    server = start_claims_kernel(claims_models, tmp_path)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            decisions = kgrpc.DecisionServiceStub(channel)
            reviews = kgrpc.ReviewServiceStub(channel)
            for key, answer in acked.items():
                replay = decisions.Decide(request(int(key[1:]), key), timeout=TIMEOUT_S)
                assert replay.replayed and replay.audit_sequence == answer.audit_sequence, key
                if answer.review_id:
                    reviews.GetReview(kpb.ReviewRef(review_id=answer.review_id), timeout=TIMEOUT_S)
            assert kgrpc.TaskServiceStub(channel).GetTask(kpb.TaskRef(task_id=task.task_id), timeout=TIMEOUT_S)
    finally:
        server.stop(grace=1)


def escalated(n: int, text_bytes: int) -> kpb.DecisionRequest:
    """A claim the policy sends to a person (R04: a large claim), with ``text_bytes`` of free text."""
    found = request(n)
    found.fields["claim_amount"].number_value = 75000.0
    found.fields["fraud_score"].number_value = 0.2
    found.text_fields["description"] = "x" * text_bytes
    return found


def test_review_rows_waiting_for_a_refusing_store_are_bounded_in_bytes(claims_models, tmp_path, monkeypatch):
    """Review rows of escalated decisions wait in memory while the store refuses writes: they were bounded at 50,000
    rows whatever their size, and a row holds its request's free text (up to 1 MiB a field): GBs. Past the bound in
    bytes, a new decision is refused before it is decided. The bound is cut to 1 MiB for the test (the kernel's is 64
    MiB), and the busy timeout to 100 ms (both injected on purpose); the lock is real."""
    monkeypatch.setattr(sqlite_store, "BUSY_TIMEOUT_MS", 100)
    monkeypatch.setattr(group_finish, "MAX_REVIEW_BACKLOG_BYTES", 1 << 20, raising=False)
    server = start_claims_kernel(claims_models, tmp_path)
    acked: list[kpb.Decision] = []
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            decisions = kgrpc.DecisionServiceStub(channel)
            lock = sqlite3.connect(Path(server.settings.data_dir) / "kernel.sqlite3", isolation_level=None)
            try:
                lock.execute("BEGIN IMMEDIATE")  # another process holds the store's write lock
                acked.append(decisions.Decide(escalated(0, 300_000), timeout=TIMEOUT_S))
                rows = server.decisions.engine._review_rows
                until(lambda: rows.failing, "the store refusing the first review row", TIMEOUT_S)
                refused = None
                for n in range(1, 20):  # 300 KB of text each: the bound is reached within 4
                    try:
                        acked.append(decisions.Decide(escalated(n, 300_000), timeout=TIMEOUT_S))
                    except grpc.RpcError as error:
                        refused = error
                        break
                assert refused is not None, "20 decisions' review rows (6 MB) were all kept in memory"
                assert refused.code() == grpc.StatusCode.UNAVAILABLE, refused.details()
                assert "not started" in refused.details() and "review rows" in refused.details()
                assert dict(refused.trailing_metadata())["retry-after-ms"] == "1000"
                assert all(answer.review_id for answer in acked) and 3 <= len(acked) <= 4
                assert rows.backlog == len(acked) and rows.backlog_bytes < 2 << 20
                recorded = server.decisions.audit.size
                with pytest.raises(grpc.RpcError) as again:
                    decisions.Decide(escalated(30, 10), timeout=TIMEOUT_S)
                assert again.value.code() == grpc.StatusCode.UNAVAILABLE
                assert server.decisions.audit.size == recorded, "a refused decision was decided all the same"
                # An acknowledged review waiting in memory is not NOT_FOUND, nor left out of a listing: UNAVAILABLE.
                reviews = kgrpc.ReviewServiceStub(channel)
                for read in (lambda: reviews.GetReview(kpb.ReviewRef(review_id=acked[0].review_id), timeout=TIMEOUT_S),
                             lambda: reviews.ListReviews(kpb.ListReviewsRequest(), timeout=TIMEOUT_S)):
                    with pytest.raises(grpc.RpcError) as waiting:
                        read()
                    assert waiting.value.code() == grpc.StatusCode.UNAVAILABLE, waiting.value.details()
                    assert "wait in memory to be stored" in waiting.value.details()
                    assert dict(waiting.value.trailing_metadata())["retry-after-ms"] == "1000"
            finally:
                lock.execute("ROLLBACK")
                lock.close()
            until(lambda: server.decisions.engine._review_rows.backlog == 0, "the kept review rows stored", TIMEOUT_S)
            assert rows.backlog_bytes == 0
            acked.append(decisions.Decide(escalated(31, 10), timeout=TIMEOUT_S))
            assert len(reviews.ListReviews(kpb.ListReviewsRequest(page_size=100), timeout=TIMEOUT_S).reviews) == len(acked)
            for answer in acked:
                reviews.GetReview(kpb.ReviewRef(review_id=answer.review_id), timeout=TIMEOUT_S)
    finally:
        server.stop(grace=1)


def test_a_store_refusing_writes_on_a_full_disk_stays_refusing_while_the_disk_is_short_of_space(tmp_path, monkeypatch):
    """On a full disk one small row still fits in the write-ahead log's old frames: the probe's write committed, the
    store was taken for recovered, the next real write failed again, and health flapped every second (a drill on a
    full tmpfs). It stays refusing while less than RECOVERED_SPACE_BYTES is free. Two faults injected on purpose:
    the disk full for SQLite (its page cap, as test_store_operator_errors does), and "short of space" by raising
    the free space asked for past what this disk has."""
    import shutil

    from kernel.review import ReviewQueue
    from kernel.store import faults, open_database
    from kernel.store.faults import StoreBusy
    from test_store_operator_errors import big_case, cap_pages

    db = open_database(tmp_path / "data")
    try:
        cap_pages(db)
        with pytest.raises(StoreBusy):
            ReviewQueue(db).create_many([big_case(1)])
        assert "is full" in db.refusing_writes
        free = shutil.disk_usage(tmp_path).free
        monkeypatch.setattr(faults, "RECOVERED_SPACE_BYTES", free * 2, raising=False)
        cap_pages(db, grow_by=10_000)  # SQLite may grow the file again; the disk still reads as short of space
        until(lambda: db.write_probes >= 2, "two probes", TIMEOUT_S)
        assert db.refusing_writes is not None, "taken for recovered on a disk short of space"
        monkeypatch.setattr(faults, "RECOVERED_SPACE_BYTES", 0, raising=False)  # space freed
        until(lambda: db.refusing_writes is None, "the store taking writes again", TIMEOUT_S)
        ReviewQueue(db).create_many([big_case(2)])
    finally:
        db.close()


def test_a_write_lock_held_elsewhere_holds_a_keyed_decision_about_a_second_not_the_ten_of_the_start(claims_models,
                                                                                                     tmp_path):
    """The first write to find the lock held waited the whole 10 s busy timeout, and every decision queued behind
    it with it (a drill: no answer for 10 s). Once serving, a write waits at most WRITE_BUSY_TIMEOUT_MS (1 s), then
    the store refuses writes at once until the lock is let go. Nothing injected: the kernel's own timeouts, a real
    lock (another connection's BEGIN IMMEDIATE)."""
    import time

    server = start_claims_kernel(claims_models, tmp_path)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            decisions = kgrpc.DecisionServiceStub(channel)
            decisions.Decide(request(0, "w0"), timeout=TIMEOUT_S)
            lock = sqlite3.connect(Path(server.settings.data_dir) / "kernel.sqlite3", isolation_level=None)
            try:
                lock.execute("BEGIN IMMEDIATE")
                began = time.monotonic()
                answer = decisions.Decide(request(1, "w1"), timeout=TIMEOUT_S)  # its entry kept in memory
                took = time.monotonic() - began
                assert took < 5, f"a keyed decision took {took:.1f} s while another process held the write lock"
                assert health(channel) == NOT_SERVING
            finally:
                lock.execute("ROLLBACK")
                lock.close()
            until(lambda: health(channel) == SERVING, "health SERVING once the lock is let go", TIMEOUT_S)
            assert decisions.Decide(request(1, "w1"), timeout=TIMEOUT_S).audit_sequence == answer.audit_sequence
    finally:
        server.stop(grace=1)
