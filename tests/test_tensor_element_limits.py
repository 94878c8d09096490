"""What one ModelInfer may make the kernel hold: element counts bounded where an element costs far more than its
bytes on the wire.

A BYTES element becomes a Python ``str``, its slot in a list and in an object array, an onnxruntime
``std::string`` and the same again for an output: ~240 bytes of memory however short it is (a 4-byte length
prefix and its text on the wire). One 32 MiB request of 2-byte strings took a kernel from 117 MiB to 1.47 GB;
typed ``bytes_contents`` cost more. Typed integer contents are varints of one byte each on the wire, eight
decoded (INT64). So the element counts are refused (INVALID_ARGUMENT naming the input) before any decoding.

Real kernel over real gRPC; each refusal is shown one element past the bound, and the bound itself accepted.
"""

from __future__ import annotations

import struct
import tracemalloc

import grpc
import numpy as np
import pytest

from conftest import start_kernel
from kernel._proto.inference import grpc_service_pb2 as pb
from kernel._proto.inference import grpc_service_pb2_grpc as pb_grpc
from kernel.limits import MAX_BYTES_ELEMENTS, MAX_TYPED_CONTENTS_BYTES
from kernel.testing import onnx_models

Code = grpc.StatusCode
MIB = 1 << 20
BIG = [("grpc.max_send_message_length", 256 * MIB), ("grpc.max_receive_message_length", 256 * MIB)]


@pytest.fixture(scope="module")
def stub(tmp_path_factory):
    root = tmp_path_factory.mktemp("element_limits")
    # Per-row dims dynamic: nothing in the model's shape bounds how many elements a request holds.
    model = onnx_models.identity([("s", "BYTES", (None,)), ("t", "BYTES", (None,)), ("i", "INT64", (None,))])
    onnx_models.save(model, root / "wide" / "1" / "model.onnx")
    onnx_models.save(onnx_models.identity([("v", "FP32", 4)]), root / "fixed" / "1" / "model.onnx")  # (fast path)
    kernel = start_kernel(root)
    with grpc.insecure_channel(f"127.0.0.1:{kernel.port}", options=BIG) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)
    kernel.stop(grace=1)


def request(s: int, t: int = 1, i: int = 1, raw: bool = True) -> pb.ModelInferRequest:
    """``s``, ``t`` empty strings and ``i`` zeros (one byte each on the wire as typed contents)."""
    req = pb.ModelInferRequest(model_name="wide")
    for name, datatype, count in (("s", "BYTES", s), ("t", "BYTES", t), ("i", "INT64", i)):
        tensor = req.inputs.add(name=name, datatype=datatype, shape=[1, count])
        if raw:
            req.raw_input_contents.append(struct.pack("<I", 0) * count if datatype == "BYTES"
                                          else np.zeros(count, np.int64).tobytes())
        elif datatype == "BYTES":
            tensor.contents.bytes_contents.extend([b""] * count)
        else:
            tensor.contents.int64_contents.extend(np.zeros(count, np.int64))
    return req


def refused(stub, req) -> str:
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(req, timeout=60)
    assert caught.value.code() == Code.INVALID_ARGUMENT, caught.value.details()
    return caught.value.details()


@pytest.mark.parametrize("raw", [True, False], ids=["raw", "typed"])
def test_bytes_elements_past_the_bound_are_refused_naming_the_input(stub, raw):
    details = refused(stub, request(MAX_BYTES_ELEMENTS, 1, raw=raw))  # one past, across the two inputs
    assert "input 't'" in details and f"{MAX_BYTES_ELEMENTS:,}" in details, details


def test_bytes_elements_at_the_bound_are_served(stub):
    response = stub.ModelInfer(request(MAX_BYTES_ELEMENTS - 1, 1), timeout=60)
    assert list(response.outputs[0].shape) == [1, MAX_BYTES_ELEMENTS - 1]


def test_typed_integers_decoding_past_the_bound_are_refused(stub):
    over = MAX_TYPED_CONTENTS_BYTES // 8 + 1  # INT64: 8 bytes decoded from each 1-byte varint
    details = refused(stub, request(1, 1, over, raw=False))
    assert "input 'i'" in details and "raw_input_contents" in details, details


@pytest.mark.parametrize("model, name", [("wide", "s"), ("fixed", "v")])
def test_a_shape_of_millions_of_dims_is_refused_without_copying_it(stub, model, name):
    """A shape is a packed varint, one byte a dim on the wire: 2M dims of 1 are 2 MiB. The kernel copied them into
    a tuple (and the fast path into a list), then wrote every dim into the refusal's text before clamping it:
    ~20x the request's bytes of Python memory (traced here, the kernel being in this process), against what a
    request of the same size refused at once (an unknown model) takes in gRPC's hands and ours."""
    req = pb.ModelInferRequest(model_name=model)
    dims = np.ones(2 << 20, np.int64)
    req.inputs.add(name=name, datatype="BYTES" if model == "wide" else "FP32").shape.extend(dims)
    del dims
    size = req.ByteSize()
    baseline = pb.ModelInferRequest(model_name="absent", raw_input_contents=[b"x" * size])

    def peak_of(request, code):
        tracemalloc.start()
        try:
            with pytest.raises(grpc.RpcError) as caught:
                stub.ModelInfer(request, timeout=60)
            return tracemalloc.get_traced_memory()[1], caught.value
        finally:
            tracemalloc.stop()

    base_peak, _ = peak_of(baseline, Code.NOT_FOUND)
    peak, error = peak_of(req, Code.INVALID_ARGUMENT)
    assert error.code() == Code.INVALID_ARGUMENT, error.details()
    assert peak < base_peak + size // 2, f"a {size:,}-byte request's refusal took {peak:,} bytes ({base_peak:,})"
    assert f"input '{name}'" in error.details() and "2,097,152 dims" in error.details(), error.details()[:300]
