"""A kernel stopped under a steady load: every call it does not answer gets UNAVAILABLE, never CANCELLED.

gRPC's stop cuts the calls it has received but not yet handed to the kernel with CANCELLED, which clients do not
retry (grpc's retry policy and the usual client libraries retry UNAVAILABLE). Under 24 callers in a closed loop
that was most of their last calls on the asyncio front end and a few on the threaded one. The drain now answers
new requests UNAVAILABLE for a moment before gRPC's stop (kernel/server.py ``_refuse_until_quiet``), so those
calls reach a handler and get a status that says "send it again". None of them may have been decided: each
refused request id is checked against the audit log. A real kernel process, real gRPC calls.
"""

from __future__ import annotations

import collections
import threading

import grpc
import pytest

from claims_support import build_small_model, claim_request, copy_pipelines
from examples.claims import data
from kernel._proto.aios.kernel.v1 import kernel_pb2_grpc as kgrpc
from kernel.audit import iter_directory
from kernel.testing.processes import ServeProcess

CALLERS = 24


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return build_small_model(tmp_path_factory.mktemp("claims_models"))


@pytest.mark.parametrize("front_end", ["sync", "aio"])
def test_calls_a_stopping_kernel_does_not_answer_are_unavailable_and_not_decided(models, tmp_path, front_end):
    server = ServeProcess(models, "--pipelines", str(copy_pipelines(tmp_path / "pipelines")), "--front-end",
                          front_end, "--log-level", "WARNING", data_dir=tmp_path / "data")
    cases = data.generate_cases(50, seed=11)
    codes: collections.Counter = collections.Counter()
    refused: list[str] = []
    lock = threading.Lock()
    answered = threading.Semaphore(0)

    def call_until_refused(caller: int) -> None:
        with grpc.insecure_channel(server.address) as channel:
            stub = kgrpc.DecisionServiceStub(channel)
            for n in range(100_000):
                request_id = f"{caller}-{n}"
                try:
                    stub.Decide(claim_request(cases[n % len(cases)], request_id=request_id), timeout=30)
                    answered.release()
                except grpc.RpcError as exc:
                    with lock:
                        codes[exc.code().name] += 1
                        refused.append(request_id)
                    if exc.code() == grpc.StatusCode.UNAVAILABLE:  # a client would now try another replica
                        return

    callers = [threading.Thread(target=call_until_refused, args=(i,)) for i in range(CALLERS)]
    for caller in callers:
        caller.start()
    for _ in range(20 * CALLERS):  # (a real wait on real answers: the load is on when the signal comes)
        assert answered.acquire(timeout=30), "the kernel stopped answering before the stop"
    code, err = server.stop()
    for caller in callers:
        caller.join(60)
    assert code == 0, err
    assert set(codes) == {"UNAVAILABLE"}, codes  # never CANCELLED
    recorded = {record.request_id for record in iter_directory(tmp_path / "data" / "audit")}
    assert not recorded & set(refused)  # what was refused was not decided
