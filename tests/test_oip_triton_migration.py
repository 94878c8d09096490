"""Findings of a Triton-migration audit, each checked with tritonclient against the real server (both front ends).

Triton's shared-memory, trace and log RPCs got gRPC's bare "Method not found!" (they were missing from the
proto): now UNIMPLEMENTED saying what to do instead. ``model_version="01"`` was NOT_FOUND where Triton reads
the version as an integer (version 1); a version that is not a whole number is INVALID_ARGUMENT naming the
field. ``sequence_id`` on a model without sequence batching is accepted and ignored, as Triton does.
"""

from __future__ import annotations

import base64

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

from kernel._proto.inference import grpc_service_pb2 as pb

SHARED_MEMORY = "send inputs in raw_input_contents (or typed contents), outputs come back in raw_output_contents"


def unimplemented(call, *args, **kwargs) -> str:
    """The message of the UNIMPLEMENTED that ``call`` must raise."""
    with pytest.raises(InferenceServerException) as info:
        call(*args, **kwargs)
    assert info.value.status() == "StatusCode.UNIMPLEMENTED", info.value
    message = info.value.message()
    assert "Method not found" not in message
    return message


# ----------------------------------------------------------------------------- not offered, said so
@pytest.mark.parametrize("rpc, call", [
    ("SystemSharedMemoryStatus", lambda t: t.get_system_shared_memory_status()),
    ("SystemSharedMemoryRegister", lambda t: t.register_system_shared_memory("region", "/aios_shm", 64)),
    ("SystemSharedMemoryUnregister", lambda t: t.unregister_system_shared_memory("region")),
    ("CudaSharedMemoryStatus", lambda t: t.get_cuda_shared_memory_status()),
    ("CudaSharedMemoryRegister", lambda t: t.register_cuda_shared_memory("region", base64.b64encode(b"handle"), 0, 64)),
    ("CudaSharedMemoryUnregister", lambda t: t.unregister_cuda_shared_memory()),
])
def test_shared_memory_rpcs_are_unimplemented_and_say_to_send_raw_contents(triton, rpc, call):
    message = unimplemented(call, triton)
    assert message.startswith(f"{rpc}: shared memory is not offered; "), message
    assert SHARED_MEMORY in message


def test_trace_settings_are_unimplemented_and_point_at_the_kernels_timings(triton):
    for call in (triton.get_trace_settings, lambda: triton.update_trace_settings(settings={"trace_rate": "1"})):
        message = unimplemented(call)
        assert message.startswith("TraceSetting: tracing is not offered; "), message
        assert "ModelStatistics" in message and "phase timings" in message


def test_log_settings_are_unimplemented_and_name_the_setting_that_sets_the_level(triton):
    for call in (triton.get_log_settings, lambda: triton.update_log_settings({"log_verbose_level": 1})):
        message = unimplemented(call)
        assert message.startswith("LogSettings: "), message
        assert "log_level in kernel.toml" in message and "AIOS_LOG_LEVEL" in message and "--log-level" in message


def test_server_metadata_claims_none_of_the_extensions_not_offered(triton):
    extensions = set(triton.get_server_metadata().extensions)
    assert "model_repository" in extensions  # (what is offered is still claimed)
    assert not extensions & {"system_shared_memory", "cuda_shared_memory", "trace", "logging", "sequence"}


def test_the_service_is_still_served_after_the_refusals(triton):
    unimplemented(triton.get_log_settings)
    assert triton.is_server_ready() and triton.is_model_ready("tiny")


# ----------------------------------------------------------------------------- versions read as integers
def tiny_inputs(rows: int = 2) -> list[tc.InferInput]:
    tensor = tc.InferInput("INPUT0", [rows, 16], "FP32")
    tensor.set_data_from_numpy(np.ones((rows, 16), np.float32))
    return [tensor]


@pytest.mark.parametrize("asked, served", [("01", "1"), ("002", "2"), ("1", "1")])
def test_a_version_with_leading_zeros_is_that_number_as_triton_reads_it(triton, asked, served):
    # (was NOT_FOUND "model 'tiny' has no loaded version '01'")
    result = triton.infer("tiny", tiny_inputs(), model_version=asked)
    assert result.get_response().model_version == served
    assert triton.is_model_ready("tiny", asked)
    assert list(triton.get_model_metadata("tiny", asked).versions) == ["1", "2"]
    assert triton.get_model_config("tiny", asked).config.max_batch_size == (8 if served == "1" else 64)
    assert [s.version for s in triton.get_inference_statistics("tiny", asked).model_stats] == [served]


@pytest.mark.parametrize("asked, number", [("09", "9"), ("00", "0")])
def test_a_number_not_loaded_is_still_not_found(triton, asked, number):
    with pytest.raises(InferenceServerException) as info:
        triton.infer("tiny", tiny_inputs(), model_version=asked)
    assert info.value.status() == "StatusCode.NOT_FOUND", info.value
    assert f"no loaded version '{number}'; loaded versions: 1, 2" in info.value.message()


@pytest.mark.parametrize("asked", ["1.0", " 1", "1 ", "+1", "-1", "latest", "1e0", "١"])
def test_a_version_that_is_not_a_whole_number_is_invalid_argument(triton, stub, asked):
    for call, field in ((lambda: triton.infer("tiny", tiny_inputs(), model_version=asked), "model_version"),
                        (lambda: triton.get_model_metadata("tiny", asked), "version"),
                        (lambda: triton.get_model_config("tiny", asked), "version"),
                        (lambda: triton.get_inference_statistics("tiny", asked), "version")):
        with pytest.raises(InferenceServerException) as info:
            call()
        assert info.value.status() == "StatusCode.INVALID_ARGUMENT", (asked, info.value)
        assert info.value.message().startswith(f"{field} {asked!r} is not a model version: "), info.value.message()
    assert not triton.is_model_ready("tiny", asked)  # a probe still just answers "not ready"
    # (in a stream too: its error names the field)
    request = pb.ModelInferRequest(model_name="tiny", model_version=asked, id="v")
    request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 16])
    request.raw_input_contents.append(np.ones(16, np.float32).tobytes())
    (answer,) = list(stub.ModelStreamInfer(iter([request]), timeout=10))
    assert answer.error_message.startswith(f"INVALID_ARGUMENT: model_version {asked!r} is not a model version")


def test_a_very_long_version_is_read_without_int(stub):
    # (Python's int() refuses a string of over 4,300 digits: the kernel never passes a version through it)
    answer = stub.ModelMetadata(pb.ModelMetadataRequest(name="tiny", version="0" * 9000 + "1"), timeout=10)
    assert answer.name == "tiny"
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelMetadata(pb.ModelMetadataRequest(name="tiny", version="9" * 9000), timeout=10)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND and len(info.value.details()) < 400, info.value


# ----------------------------------------------------------------------------- sequence parameters
def test_sequence_parameters_are_accepted_and_ignored_as_triton_does_without_sequence_batching(triton):
    # Triton checks a correlation id only in its sequence batcher; a model without one runs the request as any.
    plain = triton.infer("tiny", tiny_inputs(), model_version="1").as_numpy("OUTPUT0")
    for start, end in ((True, False), (False, False), (False, True)):
        result = triton.infer("tiny", tiny_inputs(), model_version="1", sequence_id=42, sequence_start=start,
                              sequence_end=end)
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), plain)


# ----------------------------------------------------------------------------- unload, as Triton's, is idempotent
def test_unloading_a_model_that_is_not_loaded_succeeds_as_triton_does(triton):
    # Triton's unload of a model with nothing loaded is a success (a clean-up script, or one unloading every
    # model the index lists, UNAVAILABLE ones too, runs unchanged); the kernel answered NOT_FOUND.
    triton.unload_model("identity")
    try:
        triton.unload_model("identity")  # (already unloaded)
        assert not triton.is_model_ready("identity")
        for entry in triton.get_model_repository_index().models:  # every model the index lists, as such scripts do
            triton.unload_model(entry.name)
        assert not triton.is_server_ready()  # (nothing loaded: see "Not ready without a model")
    finally:
        for name in ("tiny", "identity", "reshape"):
            triton.load_model(name)
    assert triton.is_model_ready("identity") and triton.is_model_ready("tiny")


def test_unloading_a_name_the_repository_does_not_hold_is_still_not_found(triton):
    # (a typo is told, not answered OK: the one difference from Triton's unload, in the README)
    with pytest.raises(InferenceServerException) as info:
        triton.unload_model("not_in_repo")
    assert info.value.status() == "StatusCode.NOT_FOUND", info.value
    assert "not_in_repo" in info.value.message() and "repository" in info.value.message()
