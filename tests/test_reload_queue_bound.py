"""A model's queue bounds hold across a reload: the old copy's queued requests count against the new copy's bounds.

A reload leaves the requests queued on the old copy of a version to run there (test_model_reload_drain.py) while the
new copy takes new ones. Each copy counted only its own queue, so while the old one drained the version admitted up
to twice max_queue a priority level, and twice max_tenant_queue a tenant. A real kernel, real gRPC calls; the model's
runs on the test's requests are held (the injected fault), so that what the kernel admitted stays queued.
"""

from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest

from conftest import start_kernel
from kernel._proto.inference import grpc_service_pb2 as pb
from kernel._proto.inference import grpc_service_pb2_grpc as pb_grpc
from kernel.testing import onnx_models
from lane_support import request_for, until

HELD = 0.5  # the requests' value: the load's probe and profile run zeros and ones, which are never held


def hold_runs_of_requests(monkeypatch) -> threading.Event:
    """The injected fault: a model run on the test's requests (a feed holding HELD) waits until the returned event
    is set; the load's own runs (zeros and ones) go through, so a reload completes while the lane is held."""
    from kernel.models.runtime import OnnxModel

    release, run = threading.Event(), OnnxModel.run

    def held_run(self, feeds, options=None):
        if any(np.any(feed == HELD) for feed in feeds.values()):
            release.wait(60)
        return run(self, feeds, options)

    monkeypatch.setattr(OnnxModel, "run", held_run)
    return release


@pytest.fixture
def server(tmp_path, monkeypatch):
    # One batch at a time (lane_slots=1; priority-2 batches never take the urgent slot), one request a batch;
    # poller_inline off: a held run on gRPC's poller thread would keep every other call from being read.
    onnx_models.save_mlp_version(tmp_path / "models", "m", [4, 8, 2], seed=2, provider="cpu", max_batch_size=1,
                                 priority_levels=2, max_queue=3, max_tenant_queue=2)
    release = hold_runs_of_requests(monkeypatch)
    kernel = start_kernel(tmp_path / "models", lane_slots=1, poller_inline=False)
    kernel.release = release  # (the test lets the held runs go)
    try:
        yield kernel
    finally:
        release.set()
        kernel.stop(grace=5)


def _call(stub, priority: int, tenant: str = ""):
    request = request_for("m", np.full((1, 4), HELD), priority=priority)
    if tenant:
        request.parameters["tenant"].string_param = tenant
    return stub.ModelInfer.future(request, timeout=60)


def _admitted_or_refused(server, stub, model, priority: int, tenant: str = ""):
    """A call, once the kernel has refused it or holds it on ``model``'s copy (queued or running)."""
    lane = server.lanes.cpu
    before = sum(lane.load(model))
    call = _call(stub, priority, tenant)
    until(lambda: call.done() or sum(lane.load(model)) > before, "the call to be queued or refused")
    return call


def test_the_old_copys_queue_counts_against_the_reloaded_versions_bounds(server):
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        old = server.hub.get("m")
        lane = server.lanes.cpu
        held = [_admitted_or_refused(server, stub, old, 2)]  # runs, held: the lane's one slot is taken
        until(lambda: lane.load(old) == (0, 1), "the first call to run")
        held += [_admitted_or_refused(server, stub, old, 2, tenant="a") for _ in range(2)]  # tenant a: full
        held.append(_admitted_or_refused(server, stub, old, 2))  # priority 2: full (3 queued)
        assert lane.load(old) == (3, 1) and not any(call.done() for call in held)

        stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="m"), timeout=120)
        new = server.hub.get("m")
        assert new is not old and lane.load(old) == (3, 1)  # the old copy still holds them, to run them itself

        level_full = _admitted_or_refused(server, stub, new, 2)
        tenant_full = _admitted_or_refused(server, stub, new, 1, tenant="a")  # (level 1 has room)
        admitted = [call for call in (level_full, tenant_full) if not call.done()]
        held += admitted
        assert not admitted, f"{len(admitted)} of 2 calls admitted past the bounds the old copy's queue fills"
        assert level_full.exception().code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "queue for priority 2 is full (max_queue 3" in level_full.exception().details()
        assert tenant_full.exception().code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "tenant" in tenant_full.exception().details()
        other_tenant = _admitted_or_refused(server, stub, new, 1, tenant="b")  # the bounds are not the old copy's alone
        assert not other_tenant.done()
        held.append(other_tenant)
        server.release.set()
        assert all(call.result().raw_output_contents for call in held)  # each copy ran what it took
