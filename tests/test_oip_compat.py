"""Findings of a compatibility audit against tritonclient: each was silently wrong before, now it is Triton's
answer or an INVALID_ARGUMENT naming the field.

The models are identities, so every expected value is exact: classification (labels, no labels, no batch
dim, clipped k, bad k, unfit outputs), out-of-range typed contents, shared memory, raw beside typed contents,
an output requested twice, ``optional`` in model.toml, and a priority above the model's levels.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

from conftest import start_kernel
from kernel._proto.inference import grpc_service_pb2 as pb
from kernel._proto.inference import grpc_service_pb2_grpc as pb_grpc
from kernel.models import ModelHub
from kernel.testing import onnx_models

SCORES = [("x", "FP32", 4), ("n", "INT32", 3)]
SCORES_TOML = (
    "max_batch_size = 8\npriority_levels = 3\npriority = 2\n"
    '[[input]]\nname = "x"\ndatatype = "FP32"\ndims = [4]\n'
    '[[input]]\nname = "n"\ndatatype = "INT32"\ndims = [3]\n'
    '[[output]]\nname = "x_out"\ndatatype = "FP32"\ndims = [4]\nlabels = ["cat", "dog", "emu", "fox"]\n'
    '[[output]]\nname = "n_out"\ndatatype = "INT32"\ndims = [3]\n'
)
# One input per integer type whose typed-contents field is wider than it (and the rest, to see they still fit).
INTEGERS = [("i8", "INT8"), ("i16", "INT16"), ("u8", "UINT8"), ("u16", "UINT16"),
            ("i32", "INT32"), ("u32", "UINT32"), ("i64", "INT64"), ("u64", "UINT64")]
FIELD = {"INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents", "INT64": "int64_contents",
         "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents", "UINT64": "uint64_contents"}


def build_repository(root: Path) -> Path:
    onnx_models.save(onnx_models.identity(SCORES), root / "scores" / "1" / "model.onnx")
    (root / "scores" / "1" / "model.toml").write_text(SCORES_TOML)
    onnx_models.save(onnx_models.identity(SCORES), root / "plain" / "1" / "model.onnx")  # derived: no labels
    onnx_models.save(onnx_models.identity([("v", "FP32", 5)], batched=False), root / "flat" / "1" / "model.onnx")
    onnx_models.save(onnx_models.reshape(), root / "reshape" / "1" / "model.onnx")  # a 2-D output, no batch dim
    typed = [(name, datatype, 2) for name, datatype in INTEGERS] + [("text", "BYTES", 1)]
    onnx_models.save(onnx_models.identity(typed), root / "typed" / "1" / "model.onnx")
    planes = [("p", "FP32", (None, None)), ("s", "BYTES", (None, None))]  # per-row dims both dynamic
    onnx_models.save(onnx_models.identity(planes), root / "planes" / "1" / "model.onnx")
    onnx_models.save(onnx_models.mlp([16, 8, 4]), root / "optional" / "1" / "model.onnx")
    (root / "optional" / "1" / "model.toml").write_text(
        onnx_models.mlp_toml(16, 4).replace('dims = [16]\n', 'dims = [16]\noptional = true\n'))
    return root


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    kernel = start_kernel(build_repository(tmp_path_factory.mktemp("compat_models")))
    yield kernel
    kernel.stop(grace=1)


@pytest.fixture
def triton(server):
    client = tc.InferenceServerClient(f"127.0.0.1:{server.port}")
    yield client
    client.close()


@pytest.fixture
def stub(server):
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def scores_inputs(x: list[list[float]], n: list[list[int]]) -> list[tc.InferInput]:
    inputs = []
    for name, array in (("x", np.array(x, np.float32)), ("n", np.array(n, np.int32))):
        tensor = tc.InferInput(name, list(array.shape), "FP32" if name == "x" else "INT32")
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


X = [[0.1, 0.7, 0.2, 0.7], [3.0, -1.0, 2.0, 0.0]]
N = [[5, 9, 9], [-4, 0, 7]]


def refused(call, *args, **kwargs) -> str:
    """The message of an INVALID_ARGUMENT that ``call`` must raise."""
    with pytest.raises(InferenceServerException) as info:
        call(*args, **kwargs)
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT", info.value
    return info.value.message()


def stub_refused(stub, request) -> str:
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    return info.value.details()


def texts(array: np.ndarray) -> list:
    return [[bytes(v).decode() for v in row] for row in array] if array.ndim == 2 else [bytes(v).decode() for v in array]


def scores_request(model: str = "scores") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="x", datatype="FP32", shape=[2, 4])
    request.inputs.add(name="n", datatype="INT32", shape=[2, 3])
    request.raw_input_contents.extend([np.array(X, np.float32).tobytes(), np.array(N, np.int32).tobytes()])
    return request


# ----------------------------------------------------------------------------- 1. classification
def test_classification_with_labels_gives_the_top_k_as_value_index_label(triton):
    outputs = [tc.InferRequestedOutput("x_out", class_count=2), tc.InferRequestedOutput("n_out")]
    result = triton.infer("scores", scores_inputs(X, N), outputs=outputs)
    tensor = result.get_response().outputs[0]
    assert (tensor.name, tensor.datatype, list(tensor.shape)) == ("x_out", "BYTES", [2, 2])
    # Floats as C++ std::to_string words them; equal scores in index order.
    assert texts(result.as_numpy("x_out")) == [["0.700000:1:dog", "0.700000:3:fox"], ["3.000000:0:cat", "2.000000:2:emu"]]
    np.testing.assert_array_equal(result.as_numpy("n_out"), N)  # a plain output beside it is untouched


def test_classification_without_labels_and_of_integers(triton):
    outputs = [tc.InferRequestedOutput("x_out", class_count=1), tc.InferRequestedOutput("n_out", class_count=2)]
    result = triton.infer("plain", scores_inputs(X, N), outputs=outputs)
    assert texts(result.as_numpy("x_out")) == [["0.700000:1"], ["3.000000:0"]]
    assert texts(result.as_numpy("n_out")) == [["9:1", "9:2"], ["7:2", "0:1"]]


def test_classification_count_over_the_classes_is_clipped(triton):
    result = triton.infer("scores", scores_inputs(X[:1], N[:1]), outputs=[tc.InferRequestedOutput("x_out", class_count=9)])
    assert texts(result.as_numpy("x_out")) == [["0.700000:1:dog", "0.700000:3:fox", "0.200000:2:emu", "0.100000:0:cat"]]


def test_classification_of_a_model_without_a_batch_dim(triton):
    tensor = tc.InferInput("v", [5], "FP32")
    tensor.set_data_from_numpy(np.array([0.5, -2.0, 4.25, 1.0, 4.25], np.float32))
    result = triton.infer("flat", [tensor], outputs=[tc.InferRequestedOutput("v_out", class_count=3)])
    assert list(result.get_response().outputs[0].shape) == [3]
    assert texts(result.as_numpy("v_out")) == ["4.250000:2", "4.250000:4", "1.000000:3"]


@pytest.mark.parametrize("kind,value,shown", [
    ("int64_param", 0, "int64_param 0"), ("int64_param", -2, "int64_param -2"),
    ("string_param", "2", "string_param '2'"), ("double_param", 2.0, "double_param 2.0"),
])
def test_classification_count_must_be_a_positive_integer(stub, kind, value, shown):
    request = scores_request()
    setattr(request.outputs.add(name="x_out").parameters["classification"], kind, value)
    details = stub_refused(stub, request)
    assert details == (f"output 'x_out': parameter 'classification' must be an integer >= 1 "
                       f"(how many top classes to return), got {shown}")


def test_classification_of_an_output_that_is_not_one_score_per_class_is_refused(triton, stub):
    data, shape = tc.InferInput("data", [6], "FP32"), tc.InferInput("shape", [2], "INT64")
    data.set_data_from_numpy(np.arange(6, dtype=np.float32))
    shape.set_data_from_numpy(np.array([2, 3], np.int64))
    message = refused(triton.infer, "reshape", [data, shape], outputs=[tc.InferRequestedOutput("reshaped", class_count=2)])
    assert "output 'reshaped': parameter 'classification' needs one score per class, a 1-D tensor" in message
    request = pb.ModelInferRequest(model_name="typed")
    for name, datatype in INTEGERS:
        getattr(request.inputs.add(name=name, datatype=datatype, shape=[1, 2]).contents, FIELD[datatype]).extend([1, 2])
    request.inputs.add(name="text", datatype="BYTES", shape=[1, 1]).contents.bytes_contents.append(b"a")
    request.outputs.add(name="text_out").parameters["classification"].int64_param = 1
    assert "output 'text_out': parameter 'classification' needs numeric scores; this output is BYTES" in \
        stub_refused(stub, request)


# ----------------------------------------------------------------------------- 2. typed integer contents
def typed_request(values: dict[str, list[int]]) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="typed")
    for name, datatype in INTEGERS:
        tensor = request.inputs.add(name=name, datatype=datatype, shape=[1, 2])
        getattr(tensor.contents, FIELD[datatype]).extend(values.get(name, [0, 1]))
    request.inputs.add(name="text", datatype="BYTES", shape=[1, 1]).contents.bytes_contents.append(b"t")
    return request


@pytest.mark.parametrize("name,values,refusal", [
    ("i8", [1, 300], "input 'i8': contents.int_contents[1] = 300 is out of range for INT8"),
    ("i8", [-129, 0], "input 'i8': contents.int_contents[0] = -129 is out of range for INT8"),
    ("i16", [0, 40000], "input 'i16': contents.int_contents[1] = 40000 is out of range for INT16"),
    ("u8", [256, 1], "input 'u8': contents.uint_contents[0] = 256 is out of range for UINT8"),
    ("u16", [1, 70000], "input 'u16': contents.uint_contents[1] = 70000 is out of range for UINT16"),
])
def test_typed_integers_out_of_range_are_refused_not_wrapped(stub, name, values, refusal):
    assert stub_refused(stub, typed_request({name: values})) == refusal


def test_typed_integers_at_their_limits_come_back_exactly(stub):
    limits = {name: [int(np.iinfo(datatype.lower()).min), int(np.iinfo(datatype.lower()).max)]
              for name, datatype in INTEGERS}
    response = stub.ModelInfer(typed_request(limits), timeout=10)
    for tensor, raw in zip(response.outputs, response.raw_output_contents):
        name = tensor.name[: -len("_out")]
        if name != "text":
            assert np.frombuffer(raw, tensor.datatype.lower()).tolist() == limits[name], name


# ----------------------------------------------------------------------------- 3. shared memory
SHM_INPUT = "input 'x': shared memory is not supported by this server; send the data in raw_input_contents"


def test_a_shared_memory_input_is_refused(triton):
    inputs = scores_inputs(X, N)
    inputs[0].set_shared_memory("region0", 32)
    assert refused(triton.infer, "scores", inputs) == SHM_INPUT


@pytest.mark.parametrize("key", ["shared_memory_region", "shared_memory_byte_size", "shared_memory_offset"])
def test_any_shared_memory_parameter_is_refused_even_beside_raw_data(stub, key):
    request = scores_request()  # every input raw as well: the decoder's fast path must not take it
    request.inputs[0].parameters[key].int64_param = 0
    assert stub_refused(stub, request) == SHM_INPUT


def test_a_shared_memory_output_is_refused(triton):
    output = tc.InferRequestedOutput("x_out")
    output.set_shared_memory("region0", 32)
    assert refused(triton.infer, "scores", scores_inputs(X, N), outputs=[output]) == (
        "output 'x_out': shared memory is not supported by this server; results come back in raw_output_contents")


# ----------------------------------------------------------------------------- 4. raw beside typed contents
def test_typed_contents_beside_raw_ones_are_refused(stub):
    request = scores_request()  # fixed shapes, all raw: the fast path's kind of request
    request.inputs[1].contents.int_contents.extend([1] * 6)
    assert stub_refused(stub, request) == (
        "input 'n': both contents and raw_input_contents are set; send its values in one of them")


def test_values_in_two_typed_contents_fields_are_refused(stub):
    """An FP32 input's values in fp32_contents and more in int_contents: the int ones were ignored without a word (a
    fuzz campaign). Which field the caller meant cannot be told, so both are refused, naming them."""
    request = pb.ModelInferRequest(model_name="scores")
    x = request.inputs.add(name="x", datatype="FP32", shape=[2, 4])
    x.contents.fp32_contents.extend(np.array(X, np.float32).ravel().tolist())
    x.contents.int_contents.extend([1] * 8)
    n = request.inputs.add(name="n", datatype="INT32", shape=[2, 3])
    n.contents.int_contents.extend(np.array(N, np.int32).ravel().tolist())
    assert stub_refused(stub, request) == (
        "input 'x': values of an FP32 input go in contents.fp32_contents only; contents.int_contents (8) also set")
    x.contents.ClearField("int_contents")
    assert stub.ModelInfer(request).model_name == "scores"  # (the same request with one field: served)


# ----------------------------------------------------------------------------- 5. an output requested twice
def test_an_output_requested_twice_is_refused(triton):
    outputs = [tc.InferRequestedOutput("x_out"), tc.InferRequestedOutput("n_out"), tc.InferRequestedOutput("x_out")]
    assert refused(triton.infer, "scores", scores_inputs(X, N), outputs=outputs) == "output 'x_out' is requested twice"


# ----------------------------------------------------------------------------- 5b. shapes with no elements
HUGE = 2**63 - 1  # (the largest dim the protocol's int64 shape can carry)


def planes_request(p_shape, s_shape, typed: bool = False) -> pb.ModelInferRequest:
    """An empty ``p`` (FP32) and ``s`` (BYTES) of those shapes, raw or in typed contents."""
    request = pb.ModelInferRequest(model_name="planes")
    for name, datatype, shape in (("p", "FP32", p_shape), ("s", "BYTES", s_shape)):
        tensor = request.inputs.add(name=name, datatype=datatype, shape=shape)
        if typed:
            tensor.contents.SetInParent()  # (no values: the shapes hold none)
    if not typed:
        request.raw_input_contents.extend([b"", b""])
    return request


@pytest.mark.parametrize("p_shape, s_shape, typed, named", [
    ([1, 0, HUGE], [1, 0, 1], False, "p"),
    ([1, HUGE, 0], [1, 0, 1], True, "p"),
    ([1, 0, 1], [1, 0, HUGE], False, "s"),
    ([1, 0, 1], [1, HUGE // 4, 0], True, "s"),
])
def test_a_shape_with_no_elements_but_dims_past_any_tensor_is_refused(stub, p_shape, s_shape, typed, named):
    # (Its element count, 0, passed every size check; numpy then refused the shape: INTERNAL with a traceback.)
    shape = p_shape if named == "p" else s_shape
    assert stub_refused(stub, planes_request(p_shape, s_shape, typed)) == (
        f"input '{named}': shape {shape} has dims past what a tensor can hold (the dims that are not 0 multiply "
        "to more than 2**63 bytes)")


def test_a_shape_with_no_elements_is_served_as_triton_serves_it(stub):
    for typed in (False, True):
        response = stub.ModelInfer(planes_request([1, 0, 2**40], [1, 3, 0], typed), timeout=10)
        assert [list(t.shape) for t in response.outputs] == [[1, 0, 2**40], [1, 3, 0]]
        assert list(response.raw_output_contents) == [b"", b""]


# ----------------------------------------------------------------------------- 6. model.toml `optional`
def test_an_optional_input_is_refused_at_load_and_listed_with_why(triton):
    index = {m.name: (m.state, m.reason) for m in triton.get_model_repository_index().models}
    state, reason = index["optional"]
    assert state == "UNAVAILABLE"
    assert reason.endswith("optional/1/model.toml: input[0].optional: model 'optional', tensor 'INPUT0': optional "
                           "inputs are not supported (every input must be sent with each request); remove the key "
                           "(line 5)")
    assert index["scores"] == ("READY", "")


@pytest.mark.parametrize("value,loads", [("false", True), ('"yes"', False)])
def test_optional_false_says_what_is_so_and_loads(tmp_path, value, loads):
    onnx_models.save(onnx_models.mlp([16, 8, 4]), tmp_path / "m" / "1" / "model.onnx")
    (tmp_path / "m" / "1" / "model.toml").write_text(
        onnx_models.mlp_toml(16, 4).replace("dims = [16]\n", f"dims = [16]\noptional = {value}\n"))
    loaded, failed = ModelHub(tmp_path).load_all()
    assert bool(loaded) == loads
    if not loads:
        assert "input[0].optional: must be true or false" in str(failed["m"])


# ----------------------------------------------------------------------------- 7. priority above the levels
@pytest.mark.parametrize("asked,runs_at", [(0, 2), (1, 1), (3, 3), (4, 2), (99, 2)])
def test_a_priority_outside_the_levels_runs_at_the_model_default(server, stub, asked, runs_at):
    request = scores_request()  # priority_levels = 3, priority = 2
    request.parameters["priority"].int64_param = asked
    config = server.hub.get("scores", "").config
    assert (config.priority_levels, config.priority) == (3, 2)
    assert server.service.prepare(request, None).priority == runs_at
    stub.ModelInfer(request, timeout=10)  # and it runs
