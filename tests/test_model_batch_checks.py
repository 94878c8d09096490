"""What a load learns by running a model on a small batch, and refuses: a model whose rows change each other.

Batching puts several requests' rows into one model call and slices the outputs back per request. That is only
right when each output row depends on its own input row alone; a graph with a batch-wide step keeps the batch
dim (so nothing at run time can tell) and hands each request an answer made from the others' inputs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kernel.models import ModelHub
from kernel.testing import onnx_models

CENTERED_TOML = ('max_batch_size = {max_batch}\n[[input]]\nname = "x"\ndatatype = "FP32"\ndims = [{dims}]\n'
                 '[[output]]\nname = "y"\ndatatype = "FP32"\ndims = [{dims}]\n')


def _centered(root: Path, name: str, toml: str | None = None) -> None:
    onnx_models.save(onnx_models.batch_centered(), root / name / "1" / "model.onnx")
    if toml is not None:
        (root / name / "1" / "model.toml").write_text(toml)


def test_a_model_whose_rows_change_each_other_is_refused_batching_with_why_and_the_others_serve(tmp_path):
    """(Model repository audit) y = x - mean(x over the batch) loaded with max_batch_size 64 and served: two
    requests batched together each got the other's row mixed into its answer ([-0.5, ..] and [0.5, ..] where
    each alone gets zeros), with no error anywhere."""
    _centered(tmp_path, "derived")  # no model.toml: the graph's dynamic first dim made it batch
    _centered(tmp_path, "declared", CENTERED_TOML.format(max_batch=8, dims="2"))
    onnx_models.save(onnx_models.mlp([16, 8, 4], seed=1), tmp_path / "good" / "1" / "model.onnx")
    hub = ModelHub(tmp_path)
    loaded, failed = hub.load_all()
    assert [mv.name for mv in loaded] == ["good"]
    for name in ("derived", "declared"):
        reason = failed[name]
        assert "max_batch_size" in reason and "output 'y'" in reason and "other rows" in reason, reason
        assert "set max_batch_size = 0" in reason, reason
        assert hub.unavailable_reason(name) == reason


def test_the_same_model_serves_when_its_model_toml_runs_each_request_alone(tmp_path):
    """max_batch_size = 0 (no batch dim: a request's tensor is the model's whole input) or 1 (one row a call) never
    puts two requests in one call: both load, and a request's rows are centered on its own mean."""
    _centered(tmp_path, "alone", CENTERED_TOML.format(max_batch=0, dims="-1, 2"))
    _centered(tmp_path, "one_row", CENTERED_TOML.format(max_batch=1, dims="2"))
    hub = ModelHub(tmp_path)
    loaded, failed = hub.load_all()
    assert failed == {} and sorted(mv.name for mv in loaded) == ["alone", "one_row"]
    out = hub.get("alone").runtime.run({"x": np.array([[1, 2], [3, 4]], np.float32)})[0]
    np.testing.assert_array_equal(out, [[-1, -1], [1, 1]])


def test_models_whose_rows_are_their_own_still_batch(tmp_path):
    """The check runs an all-zeros and an all-ones row alone and together: every datatype the identity model
    passes through (exactly), and an MLP (whose batched GEMM may round differently in the last bits), load."""
    onnx_models.save(onnx_models.identity([("b", "BOOL", 2), ("i8", "INT8", 3), ("u8", "UINT8", 1), ("h", "FP16", 2),
                                           ("l", "INT64", 2), ("s", "BYTES", 2)]), tmp_path / "types" / "1" / "model.onnx")
    onnx_models.save(onnx_models.mlp([64, 256, 256, 8], seed=4), tmp_path / "mlp" / "1" / "model.onnx")
    onnx_models.save(onnx_models.first_row(), tmp_path / "first_row" / "1" / "model.onnx")
    loaded, failed = ModelHub(tmp_path).load_all()
    assert failed == {}
    assert {mv.name: mv.config.max_batch_size for mv in loaded} == {"first_row": 64, "mlp": 64, "types": 64}


def test_a_model_drawing_random_numbers_is_not_taken_for_one_whose_rows_mix(tmp_path):
    """Its rows differ from call to call alone as well as in a batch: nothing says batching mixes them."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("RandomUniformLike", ["x"], ["noise"]), helper.make_node("Add", ["x", "noise"], ["y"])],
        "noisy", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", onnx_models.OPSET)])
    model.ir_version = onnx_models.IR_VERSION
    onnx_models.save(model, tmp_path / "noisy" / "1" / "model.onnx")
    (mv,) = ModelHub(tmp_path).load("noisy")
    assert mv.config.max_batch_size == 64


def test_the_load_time_profile_of_a_slow_model_stops_at_its_time_budget(tmp_path, monkeypatch):
    """(Model repository audit) the profile ran every size 1, 2, 4, ... 64 three times whatever a call cost: a model
    taking 0.3 s a call held its load (and the start, or the RepositoryModelLoad call) for 7 s, one taking seconds
    for minutes. It stops before a size it predicts would take it past PROFILE_BUDGET_NS (2 s; here four of this
    model's calls), and times a long call once (best-of-three is for noise in short ones); the fit learns the rest
    from traffic."""
    import types

    from kernel.models import runtime

    onnx_models.save(onnx_models.slow(1_000), tmp_path / "slow" / "1" / "model.onnx")
    (mv,) = ModelHub(tmp_path).load("slow")
    # INJECTED: the profile's clock, 10 ms a reading, so each timed call "takes" 10 ms however busy the host is (a
    # budget in real calls' time failed when the host sped up between measuring a call and the profile: [1, 2, 4]).
    now = [0]

    def tick() -> int:
        now[0] += 10_000_000
        return now[0]

    monkeypatch.setattr(runtime, "time", types.SimpleNamespace(monotonic_ns=tick))
    monkeypatch.setattr(runtime, "PROFILE_ONE_RUN_NS", 5_000_000)  # a 10 ms call is timed once
    monkeypatch.setattr(runtime, "PROFILE_BUDGET_NS", 60_000_000)
    calls = []
    real_run = runtime.OnnxModel.run
    monkeypatch.setattr(runtime.OnnxModel, "run",
                        lambda model, feeds: calls.append(len(next(iter(feeds.values())))) or real_run(model, feeds))
    profile = mv.runtime.profile()
    # Readings: the start (10 ms); 1 row timed once (20 -> 30: 10 ms); at 40 ms, 2 rows predicted 20 ms: 30 + 20 <= 60,
    # run once (50 -> 60); at 70 ms, 4 rows predicted 20 ms: 60 + 20 > 60, not run. Without the budget, all seven
    # sizes, three times each.
    assert [rows for rows, _ in profile] == [1, 2]
    assert calls.count(2) == 1 and 4 not in calls, calls  # (the probe's calls are of 1 row)


def _widening(width: int):
    """FP32 ``x`` [batch, 1] → ``y`` [batch, width]: 4 bytes a row in, ``4 * width`` out (an upsampler's shape)."""
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Expand", ["x", "shape"], ["y"])], "widening",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])],
        initializer=[numpy_helper.from_array(np.array([1, width], np.int64), "shape")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", onnx_models.OPSET)])
    model.ir_version = onnx_models.IR_VERSION
    return model


def test_the_load_time_profile_counts_the_bytes_a_batch_answers_as_well_as_those_it_sends(tmp_path):
    """(Model repository audit) PROFILE_MAX_BYTES bounded the inputs only: a model answering 4 MiB a row for a 4-byte
    row in was profiled up to its max_batch_size of 64, 256 MiB of output (and as much again inside onnxruntime)
    at every load, 1 GiB at max_batch_size 256. Its rows in and out together are bounded now: 3 rows of 4 MiB."""
    from kernel.models.runtime import PROFILE_MAX_BYTES, profile_rows

    width = 1 << 20
    onnx_models.save(_widening(width), tmp_path / "wide" / "1" / "model.onnx")
    (mv,) = ModelHub(tmp_path).load("wide")
    assert mv.config.max_batch_size == 64 and mv.config.outputs[0].dims == (width,)
    assert profile_rows(mv.config) == PROFILE_MAX_BYTES // (4 + 4 * width) == 3
    assert [rows for rows, _ in mv.runtime.profile(repeats=1)] == [1, 2, 3]


def test_a_request_answered_with_another_number_of_rows_than_it_sent_is_the_models_fault(tmp_path):
    """(Model repository audit) a batch of several requests answered with the wrong number of rows is never sliced
    out (kernel/scheduling/execute.py), but one request of 4 rows that first_row answered with 1 row was sent that
    row with OK, the other three missing, against the batch dim its ModelMetadata promises. Now it fails as a
    batch of several does, INTERNAL with its request id, and a 1-row request still gets its row."""
    import grpc

    from conftest import start_kernel
    from kernel._proto.inference import grpc_service_pb2 as pb
    from kernel._proto.inference import grpc_service_pb2_grpc as pb_grpc

    onnx_models.save(onnx_models.first_row(), tmp_path / "first_row" / "1" / "model.onnx")
    server = start_kernel(tmp_path)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)

            def infer(rows: np.ndarray):
                return stub.ModelInfer(pb.ModelInferRequest(
                    model_name="first_row", id="r1",
                    inputs=[pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=list(rows.shape))],
                    raw_input_contents=[rows.tobytes()]), timeout=30)

            one = infer(np.array([[1, 2]], np.float32))
            assert list(one.outputs[0].shape) == [1, 2]
            with pytest.raises(grpc.RpcError) as info:
                infer(np.arange(8, dtype=np.float32).reshape(4, 2))
            assert info.value.code() == grpc.StatusCode.INTERNAL
            assert "returned (1, 2) for a batch of 4 rows" in info.value.details()
            assert "request id r1" in info.value.details()
    finally:
        server.stop(grace=1)


def test_a_load_whose_preparation_fails_says_why_in_the_index(tmp_path, caplog):
    """(Model repository audit) what makes a version ready to serve (its lane, the scheduler taking its settings)
    runs after the files are read; its failure left the model UNAVAILABLE with the reason "not loaded", and its
    requests NOT_FOUND "not loaded", as if nobody had tried. The failure is the model's reason now, as a bad file's is."""
    onnx_models.save(onnx_models.mlp([16, 8, 4], seed=1), tmp_path / "m" / "1" / "model.onnx")
    hub = ModelHub(tmp_path)

    def no_lane(fresh):
        raise OverflowError("Python int too large to convert to C long")

    hub.add_preparer(no_lane)
    loaded, failed = hub.load_all()
    assert loaded == [] and "OverflowError: Python int too large" in failed["m"]
    (entry,) = hub.index()
    assert entry.state == "UNAVAILABLE" and "OverflowError: Python int too large" in entry.reason
    assert hub.unavailable_reason("m") == entry.reason


def _one_row_only():
    """FP32 ``x`` [batch, 2] → ``y = x + 0 * Squeeze(x, axis 0)``: the graph declares (and onnxruntime infers) a batch
    dim, a row alone runs, two rows raise in the Squeeze, as a model with a step exported for a batch of 1 does."""
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Squeeze", ["x", "axis"], ["row"]), helper.make_node("Mul", ["row", "zero"], ["nothing"]),
         helper.make_node("Add", ["x", "nothing"], ["y"])],
        "one_row_only", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])],
        initializer=[numpy_helper.from_array(np.array([0], np.int64), "axis"),
                     numpy_helper.from_array(np.array(0, np.float32), "zero")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", onnx_models.OPSET)])
    model.ir_version = onnx_models.IR_VERSION
    return model


def test_a_model_that_runs_a_row_alone_but_fails_on_two_is_refused_batching_with_why(tmp_path):
    """(Model repository audit) it loaded with max_batch_size 64 and no load-time profile (the profile's 2 rows
    failed), then every batch of two requests or more failed, was logged as the model's fault and run again one by
    one: double the work under load, for good. The load runs two rows already: it says so and what to set."""
    onnx_models.save(_one_row_only(), tmp_path / "fixed1" / "1" / "model.onnx")
    (tmp_path / "alone" / "1").mkdir(parents=True)
    onnx_models.save(_one_row_only(), tmp_path / "alone" / "1" / "model.onnx")
    (tmp_path / "alone" / "1" / "model.toml").write_text(CENTERED_TOML.format(max_batch=1, dims="2"))
    hub = ModelHub(tmp_path)
    loaded, failed = hub.load_all()
    assert [mv.name for mv in loaded] == ["alone"]
    reason = failed["fixed1"]
    assert "max_batch_size" in reason and "runs one row alone but fails on two rows" in reason, reason
    assert "set max_batch_size = 1" in reason, reason
