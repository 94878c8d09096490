"""Every bad-input case gets its specific status code, and the next good request still succeeds."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from kernel._proto.inference import grpc_service_pb2 as pb
from kernel._proto.inference import grpc_service_pb2_grpc as pb_grpc
from conftest import start_kernel


def tiny_request(rows: int = 1, **fields) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="tiny", model_version="1", **fields)
    request.inputs.add(name="INPUT0", datatype="FP32", shape=[rows, 16])
    request.raw_input_contents.append(np.ones((rows, 16), np.float32).tobytes())
    return request


def assert_status(stub, request, code: grpc.StatusCode, *fragments: str) -> str:
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request, timeout=10)
    assert info.value.code() == code, info.value.details()
    for fragment in fragments:
        assert fragment in info.value.details()
    # The server keeps serving: a good request right after succeeds.
    response = stub.ModelInfer(tiny_request(), timeout=10)
    assert np.frombuffer(response.raw_output_contents[0], np.float32).shape == (4,)
    return info.value.details()


def test_unknown_model(stub):
    request = tiny_request()
    request.model_name = "nope"
    assert_status(stub, request, grpc.StatusCode.NOT_FOUND, "'nope' is not loaded", "tiny")


def test_unknown_version(stub):
    request = tiny_request()
    request.model_version = "7"
    assert_status(stub, request, grpc.StatusCode.NOT_FOUND, "no loaded version '7'", "1, 2")


def test_empty_model_name(stub):
    request = tiny_request()
    request.model_name = ""
    assert_status(stub, request, grpc.StatusCode.INVALID_ARGUMENT, "model_name")


def test_wrong_dtype(stub):
    request = tiny_request()
    request.inputs[0].datatype = "INT32"
    assert_status(stub, request, grpc.StatusCode.INVALID_ARGUMENT, "'INPUT0'", "INT32", "FP32")


def test_unknown_dtype_name(stub):
    request = tiny_request()
    request.inputs[0].datatype = "FLOAT"
    assert_status(stub, request, grpc.StatusCode.INVALID_ARGUMENT, "'INPUT0'", "FLOAT")


@pytest.mark.parametrize("shape", [[1, 15], [16], [1, 16, 1], [1, -16]])
def test_wrong_shape(stub, shape):
    request = tiny_request()
    del request.inputs[0].shape[:]
    request.inputs[0].shape.extend(shape)
    assert_status(stub, request, grpc.StatusCode.INVALID_ARGUMENT, "'INPUT0'", "shape")


def test_zero_rows(stub):
    request = tiny_request()
    request.inputs[0].shape[0] = 0
    request.raw_input_contents[0] = b""
    assert_status(stub, request, grpc.StatusCode.INVALID_ARGUMENT, "'INPUT0'", "batch dim is 0")


def test_missing_tensor(stub):
    request = pb.ModelInferRequest(model_name="tiny", model_version="1")
    assert_status(stub, request, grpc.StatusCode.INVALID_ARGUMENT, "missing input 'INPUT0'")


def test_extra_tensor(stub):
    request = tiny_request()
    request.inputs.add(name="EXTRA", datatype="FP32", shape=[1, 16])
    request.raw_input_contents.append(np.ones((1, 16), np.float32).tobytes())
    assert_status(stub, request, grpc.StatusCode.INVALID_ARGUMENT, "unexpected input 'EXTRA'")


def test_duplicate_tensor(stub):
    request = tiny_request()
    request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 16])
    request.raw_input_contents.append(np.ones((1, 16), np.float32).tobytes())
    assert_status(stub, request, grpc.StatusCode.INVALID_ARGUMENT, "'INPUT0' is sent twice")


@pytest.mark.parametrize("size", [0, 63, 65, 128])
def test_raw_byte_size_mismatch(stub, size):
    request = tiny_request()
    request.raw_input_contents[0] = b"\0" * size
    details = assert_status(stub, request, grpc.StatusCode.INVALID_ARGUMENT, "'INPUT0'", f"holds {size} bytes", "needs 64")
    assert "raw_input_contents[0]" in details


def test_raw_count_mismatch(stub):
    request = tiny_request()
    request.raw_input_contents.append(b"\0" * 64)
    assert_status(stub, request, grpc.StatusCode.INVALID_ARGUMENT, "raw_input_contents has 2 entries for 1 inputs")


def test_typed_contents_count_mismatch(stub):
    request = pb.ModelInferRequest(model_name="tiny", model_version="1")
    tensor = request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 16])
    tensor.contents.fp32_contents.extend([1.0] * 5)
    assert_status(stub, request, grpc.StatusCode.INVALID_ARGUMENT, "'INPUT0'", "fp32_contents has 5 elements", "needs 16")


def test_typed_contents_in_another_types_field_are_named(stub):
    """(A model operator's audit) values in int_contents for an FP32 input were refused as 'fp32_contents has 0
    elements', naming none of what was sent."""
    request = pb.ModelInferRequest(model_name="tiny", model_version="1")
    tensor = request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 16])
    tensor.contents.int_contents.extend([1] * 16)
    assert_status(stub, request, grpc.StatusCode.INVALID_ARGUMENT, "'INPUT0'", "fp32_contents has 0 elements",
                  "the values came in contents.int_contents (16): values of an FP32 input go in fp32_contents")


def test_fp16_typed_contents_refused(stub):
    request = pb.ModelInferRequest(model_name="identity")
    tensor = request.inputs.add(name="f16", datatype="FP16", shape=[1, 2])
    tensor.contents.fp32_contents.extend([1.0, 2.0])
    assert_status(stub, request, grpc.StatusCode.INVALID_ARGUMENT, "'f16'", "raw_input_contents")


def test_bytes_tensor_malformed(stub):
    request = pb.ModelInferRequest(model_name="identity")
    for name, datatype, width in [("f32", "FP32", 3), ("f16", "FP16", 2), ("f64", "FP64", 2), ("i32", "INT32", 2),
                                  ("i64", "INT64", 2), ("i8", "INT8", 2), ("u8", "UINT8", 2), ("flag", "BOOL", 2)]:
        request.inputs.add(name=name, datatype=datatype, shape=[1, width])
        request.raw_input_contents.append(b"\0" * (width * np.dtype({"FP32": "f4", "FP16": "f2", "FP64": "f8", "INT32": "i4", "INT64": "i8", "INT8": "i1", "UINT8": "u1", "BOOL": "?"}[datatype]).itemsize))
    request.inputs.add(name="text", datatype="BYTES", shape=[1, 1])
    request.raw_input_contents.append(b"\x10\x00\x00\x00abc")  # claims 16 bytes, has 3
    assert_status(stub, request, grpc.StatusCode.INVALID_ARGUMENT, "'text'", "runs past the end")


def test_bool_bytes_other_than_0_or_1_are_refused(stub):
    """(Scheduling audit) a BOOL byte 2 reached the model as it was: Not(2) = 3, which a client reads as true."""
    request = pb.ModelInferRequest(model_name="identity")
    for name, datatype, width in [("f32", "FP32", 3), ("f16", "FP16", 2), ("f64", "FP64", 2), ("i32", "INT32", 2),
                                  ("i64", "INT64", 2), ("i8", "INT8", 2), ("u8", "UINT8", 2), ("flag", "BOOL", 2)]:
        request.inputs.add(name=name, datatype=datatype, shape=[1, width])
        size = width * np.dtype({"FP32": "f4", "FP16": "f2", "FP64": "f8", "INT32": "i4", "INT64": "i8", "INT8": "i1",
                                 "UINT8": "u1", "BOOL": "?"}[datatype]).itemsize
        request.raw_input_contents.append(b"\x01\x02" if datatype == "BOOL" else b"\0" * size)
    request.inputs.add(name="text", datatype="BYTES", shape=[1, 1])
    request.raw_input_contents.append(b"\x03\x00\x00\x00abc")
    assert_status(stub, request, grpc.StatusCode.INVALID_ARGUMENT, "'flag'", "byte 1 is 2", "0 (false) or 1 (true)")


def test_over_max_batch_size(stub):
    details = assert_status(stub, tiny_request(rows=9), grpc.StatusCode.INVALID_ARGUMENT, "'INPUT0'", "max_batch_size 8")
    assert "9 rows" in details


def test_unknown_requested_output(stub):
    request = tiny_request()
    request.outputs.add(name="OUTPUT9")
    assert_status(stub, request, grpc.StatusCode.INVALID_ARGUMENT, "requested output 'OUTPUT9'")


def test_bad_schedule_parameters(stub):
    request = tiny_request()
    request.parameters["priority"].string_param = "high"
    assert_status(stub, request, grpc.StatusCode.INVALID_ARGUMENT, "parameter 'priority'")
    request = tiny_request()
    request.parameters["timeout"].int64_param = -5
    assert_status(stub, request, grpc.StatusCode.INVALID_ARGUMENT, "parameter 'timeout'")


def test_model_fault_is_internal_with_request_id_and_server_keeps_serving(stub):
    request = pb.ModelInferRequest(model_name="reshape", id="fault-1")
    request.inputs.add(name="data", datatype="FP32", shape=[6])
    request.inputs.add(name="shape", datatype="INT64", shape=[2])
    request.raw_input_contents.append(np.arange(6, dtype=np.float32).tobytes())
    request.raw_input_contents.append(np.array([4, 3], np.int64).tobytes())
    details = assert_status(stub, request, grpc.StatusCode.INTERNAL, "reshape/1 failed at run time", "request id fault-1")
    assert "Reshape" in details
    # The faulting model itself still serves a good request.
    request.raw_input_contents[1] = np.array([2, 3], np.int64).tobytes()
    response = stub.ModelInfer(request, timeout=10)
    assert list(response.outputs[0].shape) == [2, 3]


def test_message_over_limit_is_resource_exhausted(model_repo):
    server = start_kernel(model_repo, "sync", max_message_bytes=4096)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            big = tiny_request()
            big.raw_input_contents[0] = b"\0" * 8192
            with pytest.raises(grpc.RpcError) as info:
                stub.ModelInfer(big, timeout=10)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "larger than max" in info.value.details()
            assert stub.ModelInfer(tiny_request(), timeout=10).raw_output_contents
    finally:
        server.stop(grace=1)


def test_a_timeout_that_passed_before_the_kernel_got_to_it_is_deadline_exceeded(stub, kernel):
    """Triton's ``timeout`` counts from the call's arrival: 1 µs has passed by the time a handler
    thread reads the request, so it is DEADLINE_EXCEEDED at once and the model never runs it.
    (A deadline that is still ahead but cannot be met is refused with a retry hint:
    tests/test_scheduling_grpc.py.)"""
    before = kernel.hub.get("tiny", "1").stats.execution_count
    request = tiny_request()
    request.parameters["timeout"].int64_param = 1
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request, timeout=10)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, info.value.details()
    assert "after it arrived" in info.value.details()
    assert kernel.hub.get("tiny", "1").stats.execution_count == before
    assert stub.ModelInfer(tiny_request(), timeout=10).raw_output_contents



def test_tenant_must_be_a_string(stub):
    request = tiny_request()
    request.parameters["tenant"].int64_param = 3
    assert_status(stub, request, grpc.StatusCode.INVALID_ARGUMENT, "parameter 'tenant' must be a string")


@pytest.mark.parametrize("front_end", ["sync", "aio"])
@pytest.mark.parametrize("shape", [[2, 2**63 - 1], [64, 2**58], [1, 3]])
def test_a_bytes_shape_larger_than_its_buffer_is_refused_naming_the_input(tmp_path, front_end, shape):
    """(Fuzz campaign) a BYTES input whose shape multiplies past 2**63 overflowed the compiled decoder's element
    count: INTERNAL where the pure-Python one said INVALID_ARGUMENT. Every element needs its 4-byte length first,
    so a shape the buffer cannot hold is refused before decoding, on both, with the sizes."""
    from kernel.testing import onnx_models

    onnx_models.save(onnx_models.identity([("s", "BYTES", None), ("f", "FP32", None)]),
                     tmp_path / "words" / "1" / "model.onnx")
    server = start_kernel(tmp_path, front_end)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            request = pb.ModelInferRequest(model_name="words")
            request.inputs.add(name="s", datatype="BYTES", shape=shape)
            request.inputs.add(name="f", datatype="FP32", shape=[shape[0], 1])
            request.raw_input_contents.extend([b"\0\0\0\0", b"\0" * 4 * shape[0]])
            with pytest.raises(grpc.RpcError) as info:
                stub.ModelInfer(request, timeout=10)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
            assert "input 's'" in info.value.details() and "holds 4 bytes" in info.value.details()
            fine = pb.ModelInferRequest(model_name="words")
            fine.inputs.add(name="s", datatype="BYTES", shape=[1, 1])
            fine.inputs.add(name="f", datatype="FP32", shape=[1, 1])
            fine.raw_input_contents.extend([b"\2\0\0\0ok", b"\0" * 4])
            assert stub.ModelInfer(fine, timeout=10).raw_output_contents  # and the kernel keeps serving
    finally:
        server.stop(grace=1)
