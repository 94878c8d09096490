"""Property-based fuzzing of the Open Inference Protocol surface, on both front ends.

The rule under test: a caller's mistake gets a clear gRPC status
(INVALID_ARGUMENT with details, NOT_FOUND, ...), never UNKNOWN, and never
INTERNAL; INTERNAL (with a request id) is reserved for a model's own run-time
fault, which only the ``reshape`` fault model can produce here. After every
example the kernel must still answer a known-good request correctly. Calls
cancelled or past their deadline in flight (their batches stopped part-way on a
slow model) must each end once, be counted once, and give back their bytes.

The tests at the end are regressions for kernel bugs this file found (their
docstrings give the original reproduction and symptom).
"""

from __future__ import annotations

import collections
import math
import threading
import time

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from google.protobuf import message_factory
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, assume, event, given, note, settings
from hypothesis import strategies as st

from call_outcome import outcome
from fuzz_budget import examples

from kernel._proto.inference import grpc_service_pb2 as pb
from kernel._proto.inference import grpc_service_pb2_grpc
from kernel.accel import bytes_codec
from kernel.models import datatypes
from conftest import IDENTITY_TENSORS, start_kernel
from lane_support import SLOW_ROWS, request_for, slow_and_tiny_repo

Code = grpc.StatusCode
SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
UNARY_METHODS = [m for m in SERVICE.methods if not m.client_streaming and not m.server_streaming]
CALL_TIMEOUT_S = 60  # only a guard against hangs; far above any answer time here

# What conftest's repository loads: (name, version) -> (max_batch_size, inputs, outputs).
SPECS = {
    ("tiny", "1"): (8, [("INPUT0", "FP32", 16)], ["OUTPUT0"]),
    ("tiny", "2"): (64, [("INPUT0", "FP32", 16)], ["OUTPUT0"]),  # no model.toml: derived, default 64
    ("identity", "1"): (64, [(n, dt, w) for n, dt, w in IDENTITY_TENSORS], [f"{n}_out" for n, _, _ in IDENTITY_TENSORS]),
    ("reshape", "1"): (0, [("data", "FP32", 6), ("shape", "INT64", 2)], ["reshaped"]),
}
LOADED = {"tiny": ("1", "2"), "identity": ("1",), "reshape": ("1",)}
LATEST = {"tiny": "2", "identity": "1", "reshape": "1"}

INPUT_NAMES = sorted({i[0] for spec in SPECS.values() for i in spec[1]})
OUTPUT_NAMES = sorted({o for spec in SPECS.values() for o in spec[2]})
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# ----------------------------------------------------------------------------- strategies
model_names = st.one_of(
    st.sampled_from(["tiny", "identity", "reshape", "", "nope", "Tiny", "tiny ", "tiny/1", "../tiny", "\x00", "模型"]),
    st.text(max_size=12),
)
versions = st.one_of(
    st.sampled_from(["", "1", "2", "3", "0", "-1", "01", " 1", "latest", "1.0", "99999999999999999999"]),
    st.text(max_size=4),
)
input_names = st.one_of(st.sampled_from(INPUT_NAMES + ["", "input0", "INPUT0 "]), st.text(max_size=8))
datatype_names = st.one_of(
    st.sampled_from(list(datatypes.NAMES)),
    st.sampled_from(["", "fp32", "FLOAT", "BF16", "STRING", "INT128", " FP32", "FP32\x00", "TYPE_FP32"]),
    st.text(max_size=6),
)
dims = st.one_of(
    st.integers(-3, 20),
    st.sampled_from([0, 64, 65, 2**31 - 1, 2**31, 2**32, 2**62, 2**63 - 1, -(2**63)]),
    st.integers(-(2**63), 2**63 - 1),
)
shapes = st.lists(dims, max_size=5)
INT64 = st.integers(-(2**63), 2**63 - 1)
UINT64 = st.integers(0, 2**64 - 1)
CONTENT_VALUES = {
    "bool_contents": st.booleans(),
    "int_contents": st.integers(-(2**31), 2**31 - 1),
    "int64_contents": INT64,
    "uint_contents": st.integers(0, 2**32 - 1),
    "uint64_contents": UINT64,
    "fp32_contents": st.floats(width=32),
    "fp64_contents": st.floats(),
    "bytes_contents": st.binary(max_size=12),
}
PARAM_VALUES = {
    "bool_param": st.booleans(),
    "int64_param": st.one_of(st.integers(-5, 5), INT64),
    "string_param": st.text(max_size=8),
    "double_param": st.floats(),
    "uint64_param": st.one_of(st.integers(0, 5), UINT64),
}
STRINGS = ["", "a", "héllo", "日本語", "x" * 20, "\x00nul", "tab\t"]
RESHAPE_TARGETS = [[2, 3], [3, 2], [6, 1], [1, 6], [-1, 2], [3, -1], [4, 4], [0, 0], [-1, -1], [7, 1], [0, 6]]


def make_array(datatype: str, shape: tuple[int, ...], rng: np.random.Generator, tensor: str = "") -> np.ndarray:
    if tensor == "shape":  # the reshape model's target shape: sometimes it fits [6], sometimes not
        return np.array(RESHAPE_TARGETS[rng.integers(len(RESHAPE_TARGETS))], dtype=np.int64).reshape(shape)
    dt = datatypes.from_name(datatype)
    if datatype == "BYTES":
        return np.array([STRINGS[i] for i in rng.integers(len(STRINGS), size=shape).reshape(-1)], dtype=object).reshape(shape)
    if datatype == "BOOL":
        return rng.integers(0, 2, size=shape).astype(bool)
    if dt.numpy.kind == "f":
        return rng.normal(size=shape).astype(dt.numpy)
    info = np.iinfo(dt.numpy)
    return rng.integers(info.min, info.max, size=shape, dtype=dt.numpy, endpoint=True)


def raw_of(array: np.ndarray) -> bytes:
    return bytes_codec.encode(array.reshape(-1)) if array.dtype == object else array.tobytes()


def set_contents(tensor, array: np.ndarray, datatype: str) -> None:
    field = datatypes.from_name(datatype).contents_field
    if field is None:  # FP16 has no typed field: the kernel must say so
        return
    flat = array.reshape(-1).tolist()
    if datatype == "BYTES":
        flat = [s.encode("utf-8") for s in flat]
    getattr(tensor.contents, field).extend(flat)


def good_request(key: tuple[str, str], rows: int, seed: int, raw: bool, version_field: str) -> pb.ModelInferRequest:
    """A structurally and semantically valid request for ``key``."""
    max_batch, inputs, _ = SPECS[key]
    rng = np.random.default_rng(seed)
    request = pb.ModelInferRequest(model_name=key[0], model_version=version_field, id=f"req-{seed}")
    for name, datatype, width in inputs:
        shape = (rows, width) if max_batch else (width,)
        array = make_array(datatype, shape, rng, name)
        tensor = request.inputs.add(name=name, datatype=datatype, shape=shape)
        if raw:
            request.raw_input_contents.append(raw_of(array))
        else:
            set_contents(tensor, array, datatype)
    return request


def random_tensor(draw, request, raw_mode: bool) -> None:
    tensor = request.inputs.add(name=draw(input_names), datatype=draw(datatype_names), shape=draw(shapes))
    if raw_mode:
        request.raw_input_contents.append(draw(st.binary(max_size=96)))
    elif draw(st.booleans()):
        field = draw(st.sampled_from(sorted(CONTENT_VALUES)))
        getattr(tensor.contents, field).extend(draw(st.lists(CONTENT_VALUES[field], max_size=20)))


def add_parameters(draw, request) -> None:
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.one_of(st.sampled_from(["priority", "timeout", "sequence_id", "binary_data_output"]), st.text(max_size=6)))
        kind = draw(st.sampled_from(sorted(PARAM_VALUES)))
        request.parameters[key].Clear()
        setattr(request.parameters[key], kind, draw(PARAM_VALUES[kind]))


MUTATIONS = [
    "model_name", "model_version", "id", "input_name", "datatype", "shape", "batch_dim", "drop_input",
    "dup_input", "extra_input", "raw_bytes", "raw_count", "contents", "parameters", "outputs",
]


@st.composite
def mutated_requests(draw) -> pb.ModelInferRequest:
    """A valid request for a random model, then 0-3 random mutations of any field."""
    key = draw(st.sampled_from(sorted(SPECS)))
    max_batch = SPECS[key][0]
    raw_mode = draw(st.booleans())
    version_field = draw(st.sampled_from(["", key[1]])) if LATEST[key[0]] == key[1] else key[1]
    request = good_request(key, draw(st.integers(1, min(max_batch, 8))) if max_batch else 1,
                           draw(st.integers(0, 2**32 - 1)), raw_mode, version_field)
    for mutation in draw(st.lists(st.sampled_from(MUTATIONS), max_size=3)):
        note(f"mutation {mutation}")
        n = len(request.inputs)
        i = draw(st.integers(0, n - 1)) if n else None
        if mutation == "model_name":
            request.model_name = draw(model_names)
        elif mutation == "model_version":
            request.model_version = draw(versions)
        elif mutation == "id":
            request.id = draw(st.text(max_size=10))
        elif mutation == "input_name" and n:
            request.inputs[i].name = draw(input_names)
        elif mutation == "datatype" and n:
            request.inputs[i].datatype = draw(datatype_names)
        elif mutation == "shape" and n:
            del request.inputs[i].shape[:]
            request.inputs[i].shape.extend(draw(shapes))
        elif mutation == "batch_dim" and n and request.inputs[i].shape:
            request.inputs[i].shape[0] = draw(st.sampled_from([0, -1, 2, 9, 65, 2**31, 2**63 - 1, -(2**63)]))
        elif mutation == "drop_input" and n:
            del request.inputs[i]
            if i < len(request.raw_input_contents) and draw(st.booleans()):
                del request.raw_input_contents[i]
        elif mutation == "dup_input" and n:
            request.inputs.add().CopyFrom(request.inputs[i])
            if i < len(request.raw_input_contents):
                request.raw_input_contents.append(request.raw_input_contents[i])
        elif mutation == "extra_input":
            random_tensor(draw, request, bool(request.raw_input_contents))
        elif mutation == "raw_bytes" and request.raw_input_contents:
            j = draw(st.integers(0, len(request.raw_input_contents) - 1))
            old = request.raw_input_contents[j]
            request.raw_input_contents[j] = draw(st.one_of(
                st.binary(max_size=128), st.just(old[:-1]), st.just(old + b"\x00"), st.just(old[: len(old) // 2]),
                st.just(bytes(len(old))), st.just(b"\xff" * len(old)),
            ))
        elif mutation == "raw_count":
            if request.raw_input_contents and draw(st.booleans()):
                del request.raw_input_contents[-1]
            else:
                request.raw_input_contents.append(draw(st.binary(max_size=64)))
        elif mutation == "contents" and n:
            tensor = request.inputs[i]
            own = datatypes.BY_NAME.get(tensor.datatype)
            field = draw(st.sampled_from(sorted(CONTENT_VALUES) + ([own.contents_field] * 4 if own and own.contents_field else [])))
            if draw(st.booleans()):
                tensor.contents.Clear()
            getattr(tensor.contents, field).extend(draw(st.lists(CONTENT_VALUES[field], max_size=20)))
        elif mutation == "parameters":
            add_parameters(draw, request)
        elif mutation == "outputs":
            for name in draw(st.lists(st.one_of(st.sampled_from(OUTPUT_NAMES), st.text(max_size=6)), min_size=1, max_size=3)):
                request.outputs.add(name=name)
    return request


@st.composite
def random_requests(draw) -> pb.ModelInferRequest:
    """Every field random (but a valid protobuf)."""
    request = pb.ModelInferRequest(model_name=draw(model_names), model_version=draw(versions), id=draw(st.text(max_size=6)))
    raw_mode = draw(st.booleans())
    for _ in range(draw(st.integers(0, 4))):
        random_tensor(draw, request, raw_mode)
    if draw(st.booleans()):
        for _ in range(draw(st.integers(0, 3))):
            request.raw_input_contents.append(draw(st.binary(max_size=64)))
    if draw(st.booleans()):
        add_parameters(draw, request)
    for name in draw(st.lists(st.text(max_size=6), max_size=2)):
        request.outputs.add(name=name)
    return request


# ----------------------------------------------------------------------------- oracles
@pytest.fixture(scope="module")
def reference(model_repo):
    """onnxruntime sessions on the tiny model files, run directly: the numbers the kernel must return."""
    return {
        v: ort.InferenceSession(str(model_repo / "tiny" / v / "model.onnx"), providers=["CPUExecutionProvider"])
        for v in ("1", "2")
    }


def tiny_expected(reference, version: str, x: np.ndarray) -> np.ndarray:
    return reference[version or LATEST["tiny"]].run(None, {"INPUT0": x})[0]


def cannot_be_a_model(name: str) -> bool:
    """A name no model folder can have: INVALID_ARGUMENT, not NOT_FOUND (kernel/api/inference.py check_model_name)."""
    return not name or "/" in name or "\x00" in name or len(name.encode()) > 255


def not_a_version(version: str) -> bool:
    """A version Triton cannot read as a whole number: INVALID_ARGUMENT, not NOT_FOUND (kernel/models/hub.py
    requested_version; "01" is version 1, as Triton reads it)."""
    return bool(version) and not (version.isascii() and version.isdigit())


def resolved(name: str, version: str) -> str | None:
    """The version the kernel serves for (name, version), or None when nothing is loaded under it."""
    if name not in LOADED or not_a_version(version):
        return None
    if not version:
        return LATEST[name]
    version = version.lstrip("0") or "0"
    return version if version in LOADED[name] else None


def infer(stub, request):
    """(code, details, response) of one ModelInfer."""
    try:
        return Code.OK, "", stub.ModelInfer(request, timeout=CALL_TIMEOUT_S)
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or "", None


def assert_kernel_serves(stub, reference, seed: int = 7) -> None:
    """A known-good request still gets the right numbers."""
    x = np.random.default_rng(seed).normal(size=(3, 16)).astype(np.float32)
    request = pb.ModelInferRequest(model_name="tiny", model_version="1", id="canary")
    request.inputs.add(name="INPUT0", datatype="FP32", shape=[3, 16])
    request.raw_input_contents.append(x.tobytes())
    code, details, response = infer(stub, request)
    assert code == Code.OK, f"the kernel stopped serving a good request: {code} {details!r}"
    got = np.frombuffer(response.raw_output_contents[0], np.float32).reshape(3, 4)
    np.testing.assert_allclose(got, tiny_expected(reference, "1", x), rtol=1e-5, atol=1e-6)


def valid_timeout(request) -> bool:
    if "timeout" not in request.parameters:
        return False
    value = request.parameters["timeout"]
    kind = value.WhichOneof("parameter_choice")
    return kind in ("int64_param", "uint64_param") and getattr(value, kind) > 0


def input_array(request, index: int, datatype: str) -> np.ndarray:
    tensor = request.inputs[index]
    shape = tuple(tensor.shape)
    if request.raw_input_contents:
        buf = request.raw_input_contents[index]
        if datatype == "BYTES":
            return np.array(bytes_codec.decode(buf, math.prod(shape)), dtype=object).reshape(shape)
        return np.frombuffer(buf, datatypes.from_name(datatype).numpy).reshape(shape)
    values = getattr(tensor.contents, datatypes.from_name(datatype).contents_field)
    if datatype == "BYTES":
        return np.array([bytes(v).decode() for v in values], dtype=object).reshape(shape)
    return np.asarray(values, dtype=datatypes.from_name(datatype).numpy).reshape(shape)


def check_ok_response(request, response, version: str, reference) -> None:
    name = request.model_name
    _, inputs, outputs = SPECS[(name, version)]
    assert response.model_name == name and response.model_version == version and response.id == request.id
    wanted = [o.name for o in request.outputs] or outputs
    assert [t.name for t in response.outputs] == wanted
    assert len(response.raw_output_contents) == len(response.outputs)
    dtype_of = {n: dt for n, dt, _ in inputs}
    index_of = {t.name: k for k, t in enumerate(request.inputs)}
    for tensor, raw in zip(response.outputs, response.raw_output_contents):
        if tensor.datatype != "BYTES":
            assert len(raw) == math.prod(tensor.shape) * datatypes.from_name(tensor.datatype).itemsize, tensor
        if name == "identity":  # outputs are the inputs, element for element
            source = tensor.name[: -len("_out")]
            assert tensor.datatype == dtype_of[source] and list(tensor.shape) == list(request.inputs[index_of[source]].shape)
            sent = input_array(request, index_of[source], tensor.datatype)
            if tensor.datatype == "BYTES":
                got = bytes_codec.decode(raw, math.prod(tensor.shape))
                assert got == sent.reshape(-1).tolist()
            else:
                got = np.frombuffer(raw, datatypes.from_name(tensor.datatype).numpy)
                np.testing.assert_array_equal(got, sent.reshape(-1))
        elif name == "tiny":
            x = input_array(request, 0, "FP32")
            got = np.frombuffer(raw, np.float32).reshape(tuple(tensor.shape))
            np.testing.assert_allclose(got, tiny_expected(reference, version, x), rtol=1e-5, atol=1e-6)
        else:  # reshape: all six values, in some shape
            assert math.prod(tensor.shape) == 6


# ----------------------------------------------------------------------------- 1. ModelInfer, semantic fuzz
@settings(max_examples=examples(600), **SETTINGS)
@given(request=st.one_of(mutated_requests(), mutated_requests(), random_requests()))
def test_model_infer_fuzz(stub, reference, request):
    note(f"request = {request!r}")
    code, details, response = infer(stub, request)
    note(f"answer = {code} {details!r}")
    event(f"{request.model_name if request.model_name in LOADED else '(other)'}: {code.name}")
    version = resolved(request.model_name, request.model_version)
    if cannot_be_a_model(request.model_name) or not_a_version(request.model_version):
        allowed = {Code.INVALID_ARGUMENT}
    elif version is None:
        allowed = {Code.NOT_FOUND}
    else:
        allowed = {Code.OK, Code.INVALID_ARGUMENT}
        if valid_timeout(request):
            allowed.add(Code.DEADLINE_EXCEEDED)  # expired in the queue, or finished too late
            allowed.add(Code.RESOURCE_EXHAUSTED)  # refused at admission: the deadline cannot be met
        if request.model_name == "reshape":
            allowed.add(Code.INTERNAL)  # the fault model's run-time error
    assert code in allowed, f"{code} {details!r} (allowed {sorted(c.name for c in allowed)})"
    if code != Code.OK:
        assert details.strip(), f"{code} with empty details"
    if code == Code.INTERNAL:
        assert "request id" in details, details
    if code == Code.OK:
        check_ok_response(request, response, version, reference)
    assert_kernel_serves(stub, reference)


# ----------------------------------------------------------------------------- 2. raw bytes on every unary RPC
def seed_message(method) -> bytes:
    """A well-formed request for ``method``, to mutate byte-wise (reaches deeper than pure noise)."""
    if method.name == "ModelInfer":
        return good_request(("tiny", "1"), 2, 1, True, "1").SerializeToString()
    cls = message_factory.GetMessageClass(method.input_type)
    fields = cls.DESCRIPTOR.fields_by_name
    message = cls()
    if "name" in fields:
        message.name = "tiny"
    if "version" in fields:
        message.version = "1"
    if "model_name" in fields:
        message.model_name = "not-a-model"
    return message.SerializeToString()


@st.composite
def raw_calls(draw) -> tuple[object, bytes]:
    method = draw(st.sampled_from(UNARY_METHODS))
    if draw(st.booleans()):
        return method, draw(st.binary(max_size=300))
    data = bytearray(seed_message(method))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        pos = draw(st.integers(0, len(data)))
        if op == "flip" and pos < len(data):
            data[pos] = draw(st.integers(0, 255))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[pos:pos + draw(st.integers(1, 8))]
        else:
            del data[pos:]
    return method, bytes(data)


def parse(method, data: bytes):
    try:
        return message_factory.GetMessageClass(method.input_type).FromString(data)
    except DecodeError:
        return None


@settings(max_examples=examples(500), **SETTINGS)
@given(call=raw_calls())
def test_raw_bytes_on_every_unary_rpc(channel, stub, reference, call):
    method, data = call
    message = parse(method, data)
    if method.name in ("RepositoryModelLoad", "RepositoryModelUnload"):
        # never unload (or reload) the shared test models; every other name is fair game
        assume(message is None or message.model_name not in LOADED)
    rpc = channel.unary_unary(f"/{SERVICE.full_name}/{method.name}", request_serializer=None, response_deserializer=None)
    try:
        rpc(data, timeout=CALL_TIMEOUT_S)
        code, details = Code.OK, ""
    except grpc.RpcError as exc:
        code, details = exc.code(), exc.details() or ""
    note(f"{method.name}({data!r}) -> {code} {details!r}; parses as {message!r}")
    event(f"{'parsed' if message is not None else 'unparsable'}: {code.name}")
    if message is None:  # not a valid message: the caller's mistake, said so
        assert code == Code.INVALID_ARGUMENT and details.strip(), f"{code} {details!r}"
    else:  # INTERNAL only for the fault model's run-time error
        fault = method.name == "ModelInfer" and message.model_name == "reshape" and "request id" in details
        assert code != Code.UNKNOWN and (code != Code.INTERNAL or fault), f"{code} {details!r}"
    assert_kernel_serves(stub, reference)


# ----------------------------------------------------------------------------- 3. ModelStreamInfer mix
def tiny_raw_request(rows: int, seed: int, version: str, request_id: str) -> tuple[pb.ModelInferRequest, np.ndarray]:
    x = np.random.default_rng(seed).normal(size=(rows, 16)).astype(np.float32)
    request = pb.ModelInferRequest(model_name="tiny", model_version=version, id=request_id)
    request.inputs.add(name="INPUT0", datatype="FP32", shape=[rows, 16])
    request.raw_input_contents.append(x.tobytes())
    return request, x


BAD_KINDS = {  # kind -> (how to spoil a good 2-row tiny request, status prefix in error_message)
    "unknown_model": (lambda r: setattr(r, "model_name", "no-such-model"), "NOT_FOUND"),
    "unknown_version": (lambda r: setattr(r, "model_version", "9"), "NOT_FOUND"),
    "empty_name": (lambda r: setattr(r, "model_name", ""), "INVALID_ARGUMENT"),
    "datatype": (lambda r: setattr(r.inputs[0], "datatype", "FP64"), "INVALID_ARGUMENT"),
    "width": (lambda r: r.inputs[0].shape.__setitem__(1, 15), "INVALID_ARGUMENT"),
    "negative_dim": (lambda r: r.inputs[0].shape.__setitem__(0, -2), "INVALID_ARGUMENT"),
    "rank": (lambda r: r.inputs[0].shape.append(1), "INVALID_ARGUMENT"),
    "short_raw": (lambda r: r.raw_input_contents.__setitem__(0, r.raw_input_contents[0][:-1]), "INVALID_ARGUMENT"),
    "missing_input": (lambda r: (r.inputs.pop(), r.raw_input_contents.pop()), "INVALID_ARGUMENT"),
    "input_name": (lambda r: setattr(r.inputs[0], "name", "INPUT1"), "INVALID_ARGUMENT"),
    "over_batch": (lambda r: r.inputs[0].shape.__setitem__(0, 9), "INVALID_ARGUMENT"),
    "priority_type": (lambda r: setattr(r.parameters["priority"], "string_param", "high"), "INVALID_ARGUMENT"),
    "timeout_negative": (lambda r: setattr(r.parameters["timeout"], "int64_param", -1), "INVALID_ARGUMENT"),
    "output_name": (lambda r: r.outputs.add(name="OUTPUT9"), "INVALID_ARGUMENT"),
    "fp16_no_raw": (lambda r: (setattr(r.inputs[0], "datatype", "FP16"), r.raw_input_contents.pop()), "INVALID_ARGUMENT"),
}

stream_entries = st.lists(
    st.one_of(
        st.tuples(st.just("good"), st.sampled_from(["1", "2", ""]), st.integers(1, 8), st.integers(0, 2**16)),
        st.tuples(st.just("bad"), st.sampled_from(sorted(BAD_KINDS)), st.just(2), st.integers(0, 2**16)),
        st.tuples(st.just("fault"), st.sampled_from([(4, 4), (5, 1), (-1, 4)]), st.just(1), st.integers(0, 2**16)),
        st.tuples(st.just("garbage"), st.binary(min_size=1, max_size=40), st.just(0), st.just(0)),
    ),
    min_size=1,
    max_size=12,
)


@settings(max_examples=examples(120), **SETTINGS)
@given(entries=stream_entries)
def test_stream_mix_of_good_and_bad(channel, stub, reference, entries):
    requests, expect, garbage = [], {}, 0
    for k, (kind, arg, rows, seed) in enumerate(entries):
        request_id = f"s{k}-{kind}"
        if kind == "garbage":  # bytes that are no ModelInferRequest: answered in-stream, without an id
            assume(parse(SERVICE.methods_by_name["ModelInfer"], arg) is None)
            requests.append(arg)
            garbage += 1
            continue
        if kind == "good":
            request, x = tiny_raw_request(rows, seed, arg, request_id)
            expect[request_id] = ("good", arg, x)
        elif kind == "bad":
            request, _ = tiny_raw_request(rows, seed, "1", request_id)
            spoil, prefix = BAD_KINDS[arg]
            spoil(request)
            expect[request_id] = ("bad", prefix, None)
        else:  # the fault model with a target shape that does not hold 6 values: a run-time error
            request = pb.ModelInferRequest(model_name="reshape", id=request_id)
            request.inputs.add(name="data", datatype="FP32", shape=[6]).contents.fp32_contents.extend(range(6))
            request.inputs.add(name="shape", datatype="INT64", shape=[2]).contents.int64_contents.extend(arg)
            expect[request_id] = ("bad", "INTERNAL", None)
        requests.append(request.SerializeToString())
    call = channel.stream_stream(f"/{SERVICE.full_name}/ModelStreamInfer", request_serializer=None, response_deserializer=None)
    responses = [pb.ModelStreamInferResponse.FromString(raw) for raw in call(iter(requests), timeout=CALL_TIMEOUT_S)]
    ids = [r.infer_response.id for r in responses]
    note(f"responses: {[(r.infer_response.id, r.error_message) for r in responses]}")
    assert len(responses) == len(requests), f"{len(requests)} requests, {len(responses)} responses"
    assert collections.Counter(ids) == collections.Counter([*expect.keys()] + [""] * garbage), ids
    for response in responses:
        if not response.infer_response.id:
            assert response.error_message.startswith("INVALID_ARGUMENT: "), response.error_message
            continue
        kind, arg, x = expect[response.infer_response.id]
        if kind == "good":
            assert not response.error_message, response.error_message
            out = response.infer_response
            assert [t.name for t in out.outputs] == ["OUTPUT0"] and list(out.outputs[0].shape) == [len(x), 4]
            assert out.model_name == "tiny" and out.model_version == (arg or LATEST["tiny"])
            got = np.frombuffer(out.raw_output_contents[0], np.float32).reshape(len(x), 4)
            np.testing.assert_allclose(got, tiny_expected(reference, arg, x), rtol=1e-5, atol=1e-5)
        else:
            assert response.error_message.startswith(f"{arg}: "), response.error_message
            assert len(response.error_message) > len(arg) + 2
            if arg == "INTERNAL":
                assert "request id" in response.error_message
    assert_kernel_serves(stub, reference)


# ----------------------------------------------------------------------------- 4. metadata/config/ready/statistics
@settings(max_examples=examples(300), **SETTINGS)
@given(rpc=st.sampled_from(["ModelMetadata", "ModelConfig", "ModelReady", "ModelStatistics"]),
       name=model_names, version=versions)
def test_model_lookup_rpcs_fuzz(stub, reference, rpc, name, version):
    request = getattr(pb, f"{rpc}Request")(name=name, version=version)
    try:
        response = getattr(stub, rpc)(request, timeout=CALL_TIMEOUT_S)
        code, details = Code.OK, ""
    except grpc.RpcError as exc:
        response, code, details = None, exc.code(), exc.details() or ""
    note(f"{rpc}(name={name!r}, version={version!r}) -> {code} {details!r}")
    served = resolved(name, version)
    if rpc == "ModelReady":
        expected = Code.OK
    elif rpc == "ModelStatistics" and not name:
        expected = Code.OK  # no name: every loaded model
    elif cannot_be_a_model(name) or not_a_version(version):
        expected = Code.INVALID_ARGUMENT
    else:
        expected = Code.OK if served else Code.NOT_FOUND
    assert code == expected, f"{code} {details!r}, expected {expected}"
    if code != Code.OK:
        assert details.strip()
    elif rpc == "ModelReady":
        assert response.ready == (served is not None)
    elif rpc == "ModelMetadata":
        assert response.name == name and list(response.versions) == list(LOADED[name])
        assert [t.name for t in response.inputs] == [i[0] for i in SPECS[(name, served)][1]]
    elif rpc == "ModelConfig":
        assert response.config.name == name and response.config.max_batch_size == SPECS[(name, served)][0]
    elif name and not version:  # every loaded version, as Triton answers
        assert [(s.name, s.version) for s in response.model_stats] == [(name, v) for v in LOADED[name]]
    elif name:
        assert [(s.name, s.version) for s in response.model_stats] == [(name, served)]
    else:
        assert {(s.name, s.version) for s in response.model_stats} == set(SPECS)
    assert_kernel_serves(stub, reference)


# ----------------------------------------------------------------------------- regressions: bugs found here, fixed since
def test_error_status_codes_on_every_front_end(stub):
    """Regression (found while writing this file, fixed in 715fcfe): on the aio front end every
    KernelError came back UNKNOWN "Invalid trailing metadata type ... None" because frontends.py
    passed ``trailing_metadata=None`` to grpc.aio's abort."""
    for call, request, expected in [
        (stub.ModelMetadata, pb.ModelMetadataRequest(name="nope"), Code.NOT_FOUND),
        (stub.ModelConfig, pb.ModelConfigRequest(name=""), Code.INVALID_ARGUMENT),
        (stub.ModelInfer, pb.ModelInferRequest(model_name="tiny"), Code.INVALID_ARGUMENT),
    ]:
        with pytest.raises(grpc.RpcError) as info:
            call(request, timeout=CALL_TIMEOUT_S)
        assert info.value.code() == expected, f"{type(request).__name__}: {info.value.code()} {info.value.details()!r}"


@pytest.mark.parametrize("front_end", ["sync", "aio"])
@pytest.mark.parametrize("timeout_param", [None, 2**63 - 1])
def test_concurrent_infer_without_grpc_deadline(model_repo, reference, front_end, timeout_param):
    """Regression (found while writing this file, fixed in 179804e): on the sync front end a
    ModelInfer that had to wait for a lane slot failed with INTERNAL when the call carried no gRPC
    deadline (time_remaining() is ~9.2e18 s then) or a ``timeout`` parameter above ~9.2e15 us:
    Lane.run_blocking passed the remaining time to Condition.wait(), which raised OverflowError
    ("timestamp out of range for platform time_t"). About 1 call in 4 failed under 8 threads."""
    server = start_kernel(model_repo, front_end, lane_slots=1)  # one slot: callers must queue
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
            codes: collections.Counter = collections.Counter()
            failures: list[str] = []
            lock = threading.Lock()

            def worker(w: int) -> None:
                for k in range(25):
                    request, _ = tiny_raw_request(8, w * 100 + k, "1", f"{w}-{k}")
                    if timeout_param is not None:
                        request.parameters["timeout"].int64_param = timeout_param
                    try:
                        stub.ModelInfer(request)  # deliberately no gRPC deadline
                        code = Code.OK
                    except grpc.RpcError as exc:
                        code = exc.code()
                        with lock:
                            failures.append(f"{exc.code()} {exc.details()!r}")
                    with lock:
                        codes[code] += 1

            threads = [threading.Thread(target=worker, args=(w,)) for w in range(8)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=120)
            assert codes == {Code.OK: 200}, f"{dict(codes)}; first failures: {failures[:2]}"
            assert_kernel_serves(stub, reference)
    finally:
        server.stop(grace=1)


@pytest.mark.parametrize("rpc_name", ["ModelInfer", "ModelMetadata", "RepositoryModelLoad"])
def test_unparsable_request_is_invalid_argument(channel, stub, reference, rpc_name):
    """Regression (found by this file): bytes that are not a valid protobuf got grpc's defaults,
    INTERNAL 'Exception deserializing request!' (sync) and UNKNOWN 'Unexpected <class
    'google.protobuf.message.DecodeError'>...' (aio). Repro: b'\\xff\\xff\\xff' as the serialized
    request of any unary RPC. Fixed by kernel/api/registration.py (non-raising deserializers)."""
    rpc = channel.unary_unary(f"/{SERVICE.full_name}/{rpc_name}", request_serializer=None, response_deserializer=None)
    with pytest.raises(grpc.RpcError) as info:
        rpc(b"\xff\xff\xff", timeout=CALL_TIMEOUT_S)
    assert info.value.code() == Code.INVALID_ARGUMENT, f"{info.value.code()} {info.value.details()!r}"
    assert info.value.details().strip()
    assert_kernel_serves(stub, reference)


def test_stream_with_unparsable_message_answers_every_message(channel, stub, reference):
    """Regression (found by this file): one message in ModelStreamInfer that is not a valid
    ModelInferRequest. aio front end: the stream ended OK, the bad message and every request after
    it dropped without any response or error (the reader task's DecodeError was swallowed; the log
    said only "Task exception was never retrieved"). sync front end: the whole stream ended
    INTERNAL 'Exception deserializing request!' (a caller's mistake). Repro: stream_stream with
    identity serializers, messages [good tiny v1 id g0, b'\\xff\\xff', good tiny v1 id g2]:
    aio -> OK with responses [g0] only; sync -> INTERNAL after [g0]. Now: one response per
    message, the bad one an INVALID_ARGUMENT error_message, and the stream goes on."""
    def good(request_id: str) -> bytes:
        return tiny_raw_request(1, 3, "1", request_id)[0].SerializeToString()

    call = channel.stream_stream(f"/{SERVICE.full_name}/ModelStreamInfer", request_serializer=None, response_deserializer=None)
    got: list[pb.ModelStreamInferResponse] = []
    try:
        for raw in call(iter([good("g0"), b"\xff\xff", good("g2")]), timeout=CALL_TIMEOUT_S):
            got.append(pb.ModelStreamInferResponse.FromString(raw))
        code, details = Code.OK, ""
    except grpc.RpcError as exc:
        code, details = exc.code(), exc.details()
    answered = [(r.infer_response.id, r.error_message) for r in got]
    assert code == Code.OK and len(got) == 3, f"{code} {details!r}; responses {answered}"
    by_id = {r.infer_response.id: r.error_message for r in got}
    assert by_id.keys() == {"g0", "", "g2"} and not by_id["g0"] and not by_id["g2"], answered
    assert by_id[""].startswith("INVALID_ARGUMENT: "), answered
    assert_kernel_serves(stub, reference)


# ----------------------------------------------------------------------------- calls cancelled or expired in flight
CHARGE_ABOVE = 64 << 10  # kernel/api/payload_budget.py: requests larger than this are charged


def near_threshold_request(seed: int, delta: int) -> pb.ModelInferRequest:
    """A good identity request ``delta`` bytes from the payload budget's charge threshold (its one string long)."""
    request = good_request(("identity", "1"), 1, seed, True, "1")
    index = [t.name for t in request.inputs].index("text")
    pad = CHARGE_ABOVE + delta - request.ByteSize()
    request.raw_input_contents[index] = bytes_codec.encode(np.array(["x" * max(0, pad - 8)], dtype=object))
    while request.ByteSize() < CHARGE_ABOVE + delta:
        request.raw_input_contents[index] = bytes_codec.encode(
            np.array([bytes_codec.decode(request.raw_input_contents[index], 1)[0] + "x"], dtype=object))
    return request


def served_counts(stub, names=("tiny", "identity")) -> tuple[int, int]:
    """(success, fail) requests of version 1 of the models ``names`` in ModelStatistics."""
    success = fail = 0
    for name in names:
        for stats in stub.ModelStatistics(pb.ModelStatisticsRequest(name=name, version="1"), timeout=CALL_TIMEOUT_S).model_stats:
            success += stats.inference_stats.success.count
            fail += stats.inference_stats.fail.count
    return success, fail


def fly(kernel, stub, requests, calls, names, check=lambda request, response: None) -> None:
    """Send ``requests`` at once, each with its call's deadline, cancelling those with a time at that time; each
    must end once, OK (``check``ed) or CANCELLED / DEADLINE_EXCEEDED; ModelStatistics of ``names`` counts each at
    most once and every answered one as a success; the payload budget comes back to 0."""
    before = served_counts(stub, names)
    started = time.monotonic()
    futures = [stub.ModelInfer.future(request, timeout=deadline) for request, (*_, deadline, _) in zip(requests, calls)]
    for future, (*_, cancel) in sorted(zip(futures, calls), key=lambda f: math.inf if f[1][-1] is None else f[1][-1]):
        if cancel is not None:
            time.sleep(max(0.0, started + cancel - time.monotonic()))
            future.cancel()
    answered = 0
    for future, request in zip(futures, requests):
        response, code, details = outcome(future, CALL_TIMEOUT_S)
        # (RESOURCE_EXHAUSTED: a deadline of milliseconds the scheduler predicts it cannot meet, with a retry hint)
        assert code in (Code.OK, Code.CANCELLED, Code.DEADLINE_EXCEEDED) or (
            code == Code.RESOURCE_EXHAUSTED and "retry after" in details), f"{request.id}: {code} {details!r}"
        if code == Code.OK:
            check(request, response)
            answered += 1
    give_up = time.monotonic() + CALL_TIMEOUT_S
    while True:  # (a cancelled call is counted when the kernel hears of it, after its caller moved on)
        success, fail = (now - then for now, then in zip(served_counts(stub, names), before))
        assert success + fail <= len(calls), f"{len(calls)} calls counted {success} successes and {fail} failures"
        if success >= answered and kernel.service.payload.held == 0:
            return
        assert time.monotonic() < give_up, (f"{answered} answered, {success} successes counted; "
                                            f"{kernel.service.payload.held} bytes still charged")
        time.sleep(0.01)


# (model, rows or bytes from the threshold, deadline in s, cancelled after s or None) for a few calls at once.
infer_flights = st.lists(st.tuples(
    st.sampled_from(["tiny", "tiny", "near"]), st.integers(-40, 40), st.sampled_from([CALL_TIMEOUT_S, 0.005, 0.02, 0.1]),
    st.one_of(st.none(), st.sampled_from([0.0, 0.002, 0.01, 0.05]))), min_size=1, max_size=8)


@settings(max_examples=examples(25), **SETTINGS)
@given(calls=infer_flights, seed=st.integers(0, 10_000))
def test_model_infer_calls_cancelled_or_expired_in_flight_are_answered_once_and_counted(kernel, stub, reference,
                                                                                       calls, seed):
    """ModelInfer calls in flight at once, cancelled by their caller or past their deadline at any moment, some
    just above or below the 64 KiB the payload budget charges: each ends once, OK with the right numbers or
    CANCELLED / DEADLINE_EXCEEDED, counted at most once (``fly``); the kernel serves on."""
    requests = [near_threshold_request(seed + k, amount) if kind == "near"
                else tiny_raw_request(1 + abs(amount) % 8, seed + k, "1", f"c{k}")[0]
                for k, (kind, amount, _, _) in enumerate(calls)]
    fly(kernel, stub, requests, calls, ("tiny", "identity"),
        lambda request, response: check_ok_response(request, response, "1", reference))
    assert_kernel_serves(stub, reference)


@pytest.fixture(scope="module", params=["sync", "aio"])
def slow_kernel(request, tmp_path_factory):
    """A kernel of one lane slot serving `slow` (batches of tens of ms: long enough to be stopped part-way)."""
    server = start_kernel(slow_and_tiny_repo(tmp_path_factory.mktemp("slow")), request.param, lane_slots=1)
    yield server
    server.stop(grace=1)


@settings(max_examples=examples(8), **SETTINGS)
@given(calls=st.lists(st.tuples(st.one_of(st.just(SLOW_ROWS), st.integers(1, SLOW_ROWS)), st.sampled_from([CALL_TIMEOUT_S, 0.01, 0.03, 0.1]),
                                st.one_of(st.none(), st.sampled_from([0.0, 0.005, 0.02, 0.05]))), min_size=1, max_size=6))
def test_slow_batches_whose_callers_leave_are_answered_once_and_counted(slow_kernel, reference, calls):
    """As above, on a model whose batches run long enough that all their callers may leave while they run (the
    batch is then stopped part-way: onnxruntime's RunOptions.terminate); the kernel serves on."""
    with grpc.insecure_channel(f"127.0.0.1:{slow_kernel.port}") as channel:
        stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        requests = [request_for("slow", np.full((rows, 64), 0.5)) for rows, _, _ in calls]
        for k, request in enumerate(requests):
            request.id = f"s{k}"
        def check(request, response) -> None:
            assert list(response.outputs[0].shape) == [request.inputs[0].shape[0], 8], response.outputs[0]

        stats = slow_kernel.hub.get("slow").stats
        stopped = stats.stopped_batches
        fly(slow_kernel, stub, requests, calls, ("slow",), check)
        event(f"a batch stopped part-way: {stats.stopped_batches > stopped}")
        assert_kernel_serves(stub, reference)
