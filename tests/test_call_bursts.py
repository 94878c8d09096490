"""A burst of calls from one client reaches the kernel, or is refused by it: gRPC core never cancels it unseen.

gRPC core holds calls it received until the server takes them; past ``grpc.server.max_pending_requests`` (1,000 by
default) it cancelled new ones at random, answering CANCELLED "CANCELLED" with no trailer: nothing had run, but a
caller cannot tell that from a call cut after its decision was made, so neither client sends it again. A Node
client's burst of 3,000 ServerLive calls lost 2-20 % so (the README had put it down to grpcio's client).
"""

from __future__ import annotations

import collections

import grpc
import pytest

from conftest import start_kernel
from kernel._proto.inference import grpc_service_pb2 as pb
from kernel._proto.inference import grpc_service_pb2_grpc as pb_grpc

BURST = 4000


@pytest.mark.parametrize("front_end", ["sync", "aio"])
def test_no_call_of_a_burst_is_cancelled_unseen(model_repo, front_end):
    server = start_kernel(model_repo, front_end)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            stub.ServerLive(pb.ServerLiveRequest(), timeout=10)  # (connected before the burst)
            calls = [stub.ServerLive.future(pb.ServerLiveRequest(), timeout=60) for _ in range(BURST)]
            outcomes = collections.Counter()
            for call in calls:
                try:
                    call.result()
                    outcomes["OK"] += 1
                except grpc.RpcError as exc:
                    outcomes[f"{exc.code().name}: {exc.details()}"] += 1
    finally:
        server.stop(grace=1)
    # Each call ran, or was refused past `workers` with gRPC's RESOURCE_EXHAUSTED, which clients send again (or, on the
    # threaded front end, past workers less the priority-1 reserve waiting for their request: eager_receive.py).
    assert {outcome for outcome in outcomes if "its request message had not come" not in outcome} <= {
        "OK", "RESOURCE_EXHAUSTED: Concurrent RPC limit exceeded!"}, outcomes
