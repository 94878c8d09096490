"""An answered decision whose idempotency entry could not be written (a full disk) is still replayed to a retry.

An upgrade audit filled the disk under a running kernel: SQLite ran out of room before the audit log (which keeps
256 KiB preallocated), so keyed decisions were recorded and answered but their entries not stored, and each retry
in that window was decided again: a second audit record and a second review for one key. The entry is now kept in
memory until the store takes writes again. The full disk is an injected fault on the store's write of entries
(``disk_full_on_put``); everything else is a real claims kernel over gRPC.
"""

from __future__ import annotations

import grpc
import pytest

from claims_support import claim_request
from conftest import start_claims_kernel
from examples.claims import data
from kernel._proto.aios.kernel.v1 import kernel_pb2 as kpb
from kernel._proto.aios.kernel.v1 import kernel_pb2_grpc as kgrpc
from kernel.audit import RecordFilter, iter_directory
from kernel.store.faults import StoreFailed
from kernel.store.idempotency import IdempotencyStore

TIMEOUT_S = 20


def disk_full_on_put(*args, **kwargs):
    """The injected fault: SQLite's answer to a write on a full disk, as the store raises it."""
    raise StoreFailed("the store cannot write to data_dir: database or disk is full (SQLITE_FULL)")


def decided_with_the_disk_full(fault, decide, cases, keys: int) -> dict:
    """The first ``keys`` cases decided under keys k0..k<keys-1> with ``disk_full_on_put`` in place (``fault``: a
    monkeypatch context, left in place for the caller): index -> answer."""
    fault.setattr(IdempotencyStore, "put", disk_full_on_put)
    return {i: decide(claim_request(cases[i], idempotency_key=f"k{i}"), timeout=TIMEOUT_S) for i in range(keys)}


def assert_one_decision_per_key(tmp_path, keys: int) -> None:
    """The audit log holds one decision for each of the keys k0..k<keys-1>: none was decided again."""
    decided = [r.idempotency_key for r in iter_directory(tmp_path / "data" / "audit", wanted=RecordFilter(
        kind=kpb.DECISION)) if r.idempotency_key.startswith("k")]
    assert sorted(decided) == sorted(f"k{i}" for i in range(keys))


def test_a_retry_gets_the_answer_back_while_its_entry_cannot_be_written(claims_models, tmp_path, monkeypatch):
    server = start_claims_kernel(claims_models, tmp_path)
    store = server.decisions.idempotency
    cases = data.generate_cases(40, seed=3)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            decide = kgrpc.DecisionServiceStub(channel).Decide
            with monkeypatch.context() as fault:
                first = decided_with_the_disk_full(fault, decide, cases, 6)
                assert store.unwritten() == 6
                for i, answer in first.items():  # retried while the disk is still full
                    again = decide(claim_request(cases[i], idempotency_key=f"k{i}"), timeout=TIMEOUT_S)
                    assert again.replayed and not answer.replayed
                    assert (again.audit_sequence, again.review_id, again.action) == \
                        (answer.audit_sequence, answer.review_id, answer.action)
                with pytest.raises(grpc.RpcError) as reused:  # the key still means that one request
                    decide(claim_request(cases[7], idempotency_key="k0"), timeout=TIMEOUT_S)
                assert reused.value.code() == grpc.StatusCode.FAILED_PRECONDITION

            decide(claim_request(cases[10], idempotency_key="later"), timeout=TIMEOUT_S)  # the store writes again
            assert store.unwritten() == 0
            assert all(store.get("acme", f"k{i}") is not None for i in first)
            again = decide(claim_request(cases[0], idempotency_key="k0"), timeout=TIMEOUT_S)
            assert again.replayed and again.audit_sequence == first[0].audit_sequence
    finally:
        server.stop(grace=1)
    assert_one_decision_per_key(tmp_path, 6)


def test_kept_answers_are_written_in_batches_by_the_next_put_and_expired_ones_dropped(tmp_path):
    """(Review audit) every put rewrote every kept answer, one transaction each (12,002 transactions for 3,004
    rows under 4 concurrent puts), and wrote expired ones back with a fresh expiry."""
    from kernel.store import open_database

    now = [10**18]
    db = open_database(tmp_path)
    try:
        store = IdempotencyStore(db, retention_hours=1, clock=lambda: now[0])
        assert store.keep_unwritten("acme", "old", "h0", b"a0")
        now[0] += 3_000 * 10**9  # 50 minutes
        for i in range(1, 1201):
            assert store.keep_unwritten("acme", f"k{i}", f"h{i}", f"a{i}".encode())
        now[0] += 1_200 * 10**9  # "old" is past its hour now; the others are not
        commits = []
        real = db.transact
        db.transact = lambda work, **kw: (commits.append(1), real(work, **kw))[1]
        store.put("acme", "new", "hn", b"an")
        assert store.unwritten() == 0 and len(commits) == 1 + 2  # the put, then 1,201 kept in batches of 1,000
        assert store.get("acme", "old") is None and store.get("acme", "k1200") == ("h1200", b"a1200")
    finally:
        db.close()


def test_a_store_that_keeps_refusing_entries_is_logged_once_then_counted(claims_models, tmp_path, monkeypatch,
                                                                        caplog):
    """(Incident drill, a file-size limit on the data dir) every keyed group whose entries the full store refused
    logged an ERROR of its own: 856 lines in 44 s at 20 decisions/s. Now the first in full, later ones counted at
    most every 30 s, and one line when the store takes them again."""
    server = start_claims_kernel(claims_models, tmp_path)
    cases = data.generate_cases(30, seed=5)
    caplog.set_level("INFO", logger="aios.decisions")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            decide = kgrpc.DecisionServiceStub(channel).Decide
            with monkeypatch.context() as fault:
                fault.setattr(IdempotencyStore, "put", disk_full_on_put)
                for i in range(25):  # one at a time: a group each
                    decide(claim_request(cases[i], idempotency_key=f"s{i}"), timeout=TIMEOUT_S)
            decide(claim_request(cases[29], idempotency_key="after"), timeout=TIMEOUT_S)  # the store writes again
    finally:
        server.stop(grace=1)
    lines = [r for r in caplog.records if r.name == "aios.decisions" and "idempotency entries" in r.getMessage()]
    errors = [r.getMessage() for r in lines if r.levelname == "ERROR"]
    assert len(errors) == 1, errors
    assert "key 's0'" in errors[0] and "SQLITE_FULL" in errors[0] and "kept in memory (1 now)" in errors[0]
    assert [r.getMessage() for r in lines if r.levelname == "WARNING"] == [
        "storing the idempotency entries of answered decisions works again, after 25 failures in a row"]


def test_answers_kept_in_memory_at_a_stop_are_stored_from_their_records_at_the_next_start(
        claims_models, tmp_path, monkeypatch):
    """The review mark (below it, every keyed decision's entry is stored) passed the answers kept in memory: their
    groups let go of the mark once the store refused their entries. A stop (or a kill) while the disk was still full
    then lost their keys for good, and a retry after the restart decided again (a crash audit, by reading). The mark
    stays below them now, so the next start stores them again from their audit records."""
    cases = data.generate_cases(20, seed=5)
    server = start_claims_kernel(claims_models, tmp_path)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            decide = kgrpc.DecisionServiceStub(channel).Decide
            with monkeypatch.context() as fault:
                first = decided_with_the_disk_full(fault, decide, cases, 4)
                for case in cases[10:16]:  # later decisions (escalations among them) store review rows and the mark
                    decide(claim_request(case), timeout=TIMEOUT_S)
                assert server.decisions.idempotency.unwritten() == 4
                server.stop(grace=1)  # with the disk still full: the entries never reach the store
    finally:
        server.stop(grace=0)
    server = start_claims_kernel(claims_models, tmp_path)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            decide = kgrpc.DecisionServiceStub(channel).Decide
            for i, answer in first.items():
                again = decide(claim_request(cases[i], idempotency_key=f"k{i}"), timeout=TIMEOUT_S)
                assert again.replayed and (again.audit_sequence, again.action) == (answer.audit_sequence, answer.action)
    finally:
        server.stop(grace=1)
    assert_one_decision_per_key(tmp_path, 4)
