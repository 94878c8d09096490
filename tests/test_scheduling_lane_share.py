"""Models and instances sharing one lane, seen through real gRPC clients: weighted fair share of lane time
(counted in the order the lane ran batches, with the runs' clock injected so that each is charged alike), a
failed batch charged its one-by-one retries, and two instances of a model running at once.

Each test starts a kernel of its own: fair share depends on every model's history on the lane.
"""

from __future__ import annotations

import threading

import grpc
import numpy as np
import onnxruntime as ort

from kernel._proto.inference import grpc_service_pb2_grpc as pb_grpc
from kernel.testing import onnx_models
from conftest import start_kernel
from lane_support import request_for, save_slow_model, until


def output(response) -> np.ndarray:
    return np.frombuffer(response.raw_output_contents[0], np.float32).reshape(tuple(response.outputs[0].shape))


LOOKUP_TOML = ('provider = "cpu"\nmax_batch_size = {rows}\nweight = {weight}\n[[input]]\nname = "x"\n'
               'datatype = "FP32"\ndims = [1]\n[[output]]\nname = "y"\ndatatype = "FP32"\ndims = [2]\n')


def _lane_order(root, monkeypatch, requests) -> tuple[list, list]:
    """Run ``requests`` ([(model, x)] for `lookup` copies saved in ``root``) queued in their order behind a held `slow`
    run on a fresh kernel with one lane slot; return the runs in the order the lane ran them ([(model, rows)]) and
    each request's status code. The injected faults: `slow`'s run is held until all are queued; the model runs'
    clock (execute's) ticks 1 ms a reading, so every run is charged the same lane time whatever the machine's load
    (a batch of one 1 ms, of several 3 ms; a failed batch 2 ms and each of its retries 2 ms)."""
    import itertools

    from kernel.models.runtime import OnnxModel
    from kernel.scheduling import execute

    save_slow_model(root)
    server = start_kernel(root, "sync", lane_slots=1)
    ticks, tick_lock = itertools.count(0, 1_000_000), threading.Lock()

    def clock():
        with tick_lock:
            return next(ticks)

    release, running, ran = threading.Event(), threading.Event(), []
    run = OnnxModel.run

    def recorded_run(self, feeds, options=None):
        if self.config.name == "slow":
            running.set()
            release.wait(30)
        else:
            ran.append((self.config.name, len(next(iter(feeds.values())))))
        return run(self, feeds, options)

    monkeypatch.setattr(execute, "_clock", clock)
    monkeypatch.setattr(OnnxModel, "run", recorded_run)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            blocker = stub.ModelInfer.future(request_for("slow", np.ones((1, 64)), priority=2), timeout=60)
            assert running.wait(30)
            models = [server.hub.get(name) for name in {model for model, _ in requests}]
            calls = []
            # One at a time, so that they queue (and batch) in this order: with no deadline (a gRPC deadline is
            # the kernel's clock plus the time left as the call arrived: earliest-deadline-first could reorder).
            for model, x in requests:
                calls.append(stub.ModelInfer.future(request_for(model, x, input_name="x")))
                until(lambda: sum(server.lanes.load(model)[0] for model in models) == len(calls),
                      "the request to queue")
            release.set()
            assert blocker.result().raw_output_contents
            codes = [call.exception(timeout=60).code() if call.exception(timeout=60) else grpc.StatusCode.OK
                     for call in calls]
    finally:
        release.set()
        server.stop(grace=2)
    return ran, codes


def test_models_share_a_lane_by_their_weights(tmp_path, monkeypatch):
    """Two models queued at the same priority on one lane slot run by weighted fair share of lane time: with
    weights 3 and 1 and runs of equal length (the injected clock), 3 batches of the one to 1 of the other while
    both have work, counted in the order the lane ran them."""
    for name, weight in (("heavy", 3), ("light", 1)):
        onnx_models.save(onnx_models.lookup(), tmp_path / name / "1" / "model.onnx")
        (tmp_path / name / "1" / "model.toml").write_text(LOOKUP_TOML.format(rows=1, weight=weight))
    requests = [(name, np.array([[i % 4]])) for i in range(16) for name in ("heavy", "light")]
    ran, codes = _lane_order(tmp_path, monkeypatch, requests)
    assert codes == [grpc.StatusCode.OK] * 32
    order = [name for name, _ in ran]
    assert order[:16].count("heavy") == 12, order  # both backlogged throughout: 3:1


def test_a_failed_batch_is_charged_its_one_by_one_retries_in_the_lanes_fair_share(tmp_path, monkeypatch):
    """Models share a lane by weighted fair share of lane time. A failed batch holds its slot for its run and then
    one run per request (the retries that let a poisoned request fail alone), but only the failed run was charged:
    `lookup`, a poisoned request in each batch of 4, took turns 1:1 with the clean `lookup2` while holding the lane
    5 runs a batch to its 1 (a poisoned flood took several times its share). Measured by the order batches ran in."""
    for name in ("lookup", "lookup2"):
        onnx_models.save(onnx_models.lookup(), tmp_path / name / "1" / "model.onnx")
        (tmp_path / name / "1" / "model.toml").write_text(LOOKUP_TOML.format(rows=4, weight=1))
    # Every fourth of lookup's is poisoned: one in each of its batches of 4.
    requests = [(name, np.array([[np.nan if name == "lookup" and i % 4 == 3 else i % 4]]))
                for i in range(16) for name in ("lookup", "lookup2")]
    ran, codes = _lane_order(tmp_path, monkeypatch, requests)
    assert codes.count(grpc.StatusCode.INVALID_ARGUMENT) == 4 and codes.count(grpc.StatusCode.OK) == 28
    batches = [name for name, rows in ran if rows == 4]  # each model's batches of 4, in the order the lane ran them
    assert len(batches) == 8
    # lookup's batch holds the lane 10 ms (2 + 4 retries of 2), lookup2's 3 ms: lookup2 runs ~3 to its 1.
    assert batches[:5].count("lookup2") == 4, ran


def test_random_row_counts_come_back_exactly_split_from_two_instances_running_at_once(tmp_path, monkeypatch):
    """instances = 2 on a lane of two slots: two batches of one model run at once, and each of 48 requests of 1-8
    rows sent at once gets exactly its own rows back. The injected fault: the model's first two runs wait for each
    other (a barrier), so two run at once for sure, and then for every request to be queued: the rest share batches.
    (poller_inline off: the first run, alone on an idle lane, would hold gRPC's poller at the barrier.)"""
    from concurrent.futures import ThreadPoolExecutor

    from kernel.models.runtime import OnnxModel

    onnx_models.save_mlp_version(tmp_path, "pair", [16, 64, 4], seed=4, max_batch_size=8, instances=2,
                                 provider="cpu")
    server = start_kernel(tmp_path, "sync", lane_slots=2, poller_inline=False)
    pair = server.hub.get("pair")
    both, begun, begun_lock = threading.Barrier(2, timeout=30), [0], threading.Lock()
    run = OnnxModel.run

    def paired_run(self, feeds, options=None):
        with begun_lock:
            first_two = begun[0] < 2
            begun[0] += 1
        if first_two:  # both running at once, then held until all 48 requests have reached the queue
            both.wait()
            until(lambda: server.lanes.stats()["models"][pair]["submitted"] == 48, "the other requests to queue")
        return run(self, feeds, options)

    monkeypatch.setattr(OnnxModel, "run", paired_run)
    session = ort.InferenceSession(str(tmp_path / "pair" / "1" / "model.onnx"))
    rng = np.random.default_rng(5)
    inputs = [rng.normal(size=(int(rng.integers(1, 9)), 16)).astype(np.float32) for _ in range(48)]
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel, ThreadPoolExecutor(48) as pool:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            answers = list(pool.map(lambda x: output(stub.ModelInfer(request_for("pair", x), timeout=60)), inputs))
        for x, answer in zip(inputs, answers):
            np.testing.assert_allclose(answer, session.run(None, {"INPUT0": x})[0], rtol=1e-5, atol=1e-6)
        assert server.hub.get("pair").stats.execution_count < 48  # requests shared batches
    finally:
        server.stop(grace=2)
