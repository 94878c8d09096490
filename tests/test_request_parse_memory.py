"""A large ModelInferRequest past the element limits is refused from its bytes, before protobuf parses it.

upb holds 16 bytes of each empty ``contents.bytes_contents`` entry (2 on the wire) and 8 of each 1-byte varint of a
packed ``int64_contents`` or ``shape``, in arrays grown by doubling: a 60 MiB request took the kernel ~1.1 GB while
it parsed, before the element limits (kernel/limits.py) could refuse it. Now such a request (over 1 MiB) is walked
first (kernel/api/wire_limits.py) and refused INVALID_ARGUMENT naming the input, as the check after parsing words
it, on both front ends and inside ModelStreamInfer, and counted in aios_calls_failed_total.

Real kernels (in this process, so its peak RSS is the kernel's and the client's), real gRPC, the requests' bytes
made by hand (the client would pay upb's price too if it built them as messages).
"""

from __future__ import annotations

import struct

import grpc
import pytest
from wire_bytes import delimited, varint
from conftest import free_port, start_kernel
from test_metrics_endpoint import scrape, value

from kernel._proto.inference import grpc_service_pb2 as pb
from kernel.testing import onnx_models

Code = grpc.StatusCode
MIB = 1 << 20
SIZE = 16 * MIB  # each request's bytes on the wire: ~256 MiB while upb parsed it
BIG = [("grpc.max_send_message_length", 256 * MIB), ("grpc.max_receive_message_length", 256 * MIB)]
SERVICE = "/inference.GRPCInferenceService"


def _input(name: str, datatype: str, shape: list[int], contents: bytes = b"", packed_shape: bytes = b"") -> bytes:
    shape_bytes = packed_shape or b"".join(varint(d) for d in shape)
    return delimited(5, delimited(1, name.encode()) + delimited(2, datatype.encode()) + delimited(3, shape_bytes)
                  + (delimited(5, contents) if contents else b""))


def _request(tensor: bytes, request_id: str = "") -> bytes:
    return pb.ModelInferRequest(model_name="wide", id=request_id).SerializeToString() + tensor


# Each: its bytes, and what the refusal says (the words of the check after parsing).
N_STRINGS, N_INTS, N_DIMS, N_TENSORS, N_PARAMS = SIZE // 2, SIZE, SIZE, 2 * MIB, SIZE // 16
KINDS = {
    "empty bytes_contents": (lambda: _request(_input("s", "BYTES", [1, N_STRINGS], b"\x42\x00" * N_STRINGS)),
                             (f"input 's': shape [1, {N_STRINGS}] makes {N_STRINGS:,} BYTES elements in this request; "
                              "at most 1,048,576 are taken")),
    "1-byte int64_contents": (lambda: _request(_input("i", "INT64", [1, N_INTS], delimited(3, bytes(N_INTS)))),
                              (f"input 'i': shape [1, {N_INTS}] of INT64 makes typed contents of {8 * N_INTS:,} "
                               "bytes decoded in this request; at most 67,108,864 are taken")),
    "packed shape": (lambda: _request(_input("s", "BYTES", [], packed_shape=b"\x01" * N_DIMS)),
                     f"input 's': shape [1, 1, 1, 1, 1, 1, 1, 1, ...] has {N_DIMS:,} dims"),
    # An empty input is 2 bytes on the wire and ~88 in upb, an empty requested output ~48: 4 MiB of them suffice.
    "empty inputs": (lambda: _request(b"\x2a\x00" * N_TENSORS), f"the request has {N_TENSORS:,} inputs; at most 65,536"),
    "empty outputs": (lambda: _request(b"\x32\x00" * N_TENSORS),
                      f"the request asks for {N_TENSORS:,} outputs; at most 65,536"),
    "empty raw_input_contents": (lambda: _request(b"\x3a\x00" * N_TENSORS),
                                 f"raw_input_contents has {N_TENSORS:,} entries; at most 65,536"),
    # A parameters entry with an 8-byte key is 16 bytes on the wire and a map entry in upb (~150), held while served.
    "many parameters": (lambda: _request(b"".join(delimited(4, delimited(1, b"p%07d" % n) + delimited(2, b"\x08\x01"))
                                                  for n in range(N_PARAMS))),
                        f"the request sends {N_PARAMS:,} parameters (its own, its inputs' and its outputs' together); "
                        "at most 4,096 are taken"),
}


@pytest.fixture(scope="module", params=["sync", "aio"])
def kernel(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"parse-memory-{request.param}")
    model = onnx_models.identity([("s", "BYTES", (None,)), ("t", "BYTES", (None,)), ("i", "INT64", (None,))])
    onnx_models.save(model, root / "wide" / "1" / "model.onnx")
    server = start_kernel(root, front_end=request.param, metrics_port=free_port())
    with grpc.insecure_channel(f"127.0.0.1:{server.port}", options=BIG) as channel:
        yield server, channel
    server.stop(grace=1)


def _unary(channel):
    return channel.unary_unary(f"{SERVICE}/ModelInfer", request_serializer=None, response_deserializer=None)


def _peak_growth(call):
    """How far this process's RSS rose above where it was while ``call`` ran (the peak reset first), and what
    the call returned or the error it ended with."""
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # resets VmHWM to the current RSS
    before = _status("VmRSS")
    try:
        outcome = call()
    except grpc.RpcError as exc:
        outcome = exc
    return _status("VmHWM") - before, outcome


def _status(key: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(key + ":"))


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_large_request_past_the_limits_is_refused_before_it_is_parsed(kernel, kind):
    server, channel = kernel
    made, words = KINDS[kind]
    data = made()
    # A request as large, refused at once after parsing (no such model): what gRPC and a parse of its bytes cost.
    baseline = pb.ModelInferRequest(model_name="absent", raw_input_contents=[bytes(len(data))]).SerializeToString()
    infer = _unary(channel)
    base_growth, base_error = _peak_growth(lambda: infer(baseline, timeout=60))
    assert base_error.code() == Code.NOT_FOUND, base_error.details()
    before = value(scrape(server.metrics_port), "aios_calls_failed_total", method="GRPCInferenceService.ModelInfer",
                   code="INVALID_ARGUMENT")
    growth, error = _peak_growth(lambda: infer(data, timeout=60))
    assert isinstance(error, grpc.RpcError) and error.code() == Code.INVALID_ARGUMENT, error.details()
    assert growth < base_growth + len(data), f"{len(data):,} bytes took {growth:,} ({base_growth:,} for the baseline)"
    assert words in error.details(), error.details()
    after = value(scrape(server.metrics_port), "aios_calls_failed_total", method="GRPCInferenceService.ModelInfer",
                  code="INVALID_ARGUMENT")
    assert after == before + 1


def test_inside_a_stream_the_request_is_refused_before_it_is_parsed_and_the_stream_goes_on(kernel):
    server, channel = kernel
    made, words = KINDS["empty bytes_contents"]
    data = made()
    baseline = pb.ModelInferRequest(model_name="absent", raw_input_contents=[bytes(len(data))]).SerializeToString()
    strings = struct.pack("<I", 1) + b"x"
    good = pb.ModelInferRequest(model_name="wide", id="after")
    for name, datatype in (("s", "BYTES"), ("t", "BYTES"), ("i", "INT64")):
        good.inputs.add(name=name, datatype=datatype, shape=[1, 1])
        good.raw_input_contents.append(strings if datatype == "BYTES" else bytes(8))
    stream = channel.stream_stream(f"{SERVICE}/ModelStreamInfer", request_serializer=None,
                                   response_deserializer=pb.ModelStreamInferResponse.FromString)
    base_growth, answers = _peak_growth(lambda: list(stream(iter([baseline, good.SerializeToString()]), timeout=60)))
    assert [a.error_message.partition(":")[0] for a in answers] == ["NOT_FOUND", ""], answers
    growth, answers = _peak_growth(lambda: list(stream(iter([data, good.SerializeToString()]), timeout=60)))
    assert len(answers) == 2, answers
    assert answers[0].error_message.startswith("INVALID_ARGUMENT: ") and words in answers[0].error_message, \
        answers[0].error_message[:300]
    assert not answers[1].error_message and answers[1].infer_response.id == "after", answers[1].error_message
    assert growth < base_growth + len(data), f"{len(data):,} bytes took {growth:,} ({base_growth:,} for the baseline)"
    assert value(scrape(server.metrics_port), "aios_calls_failed_total",
                 method="GRPCInferenceService.ModelStreamInfer", code="INVALID_ARGUMENT") >= 1
