"""Findings of a Triton-migration audit, each checked with tritonclient against the real server (both front ends).

Triton's shared-memory, trace and log RPCs got gRPC's bare "Method not found!" (they were missing from the
proto): now UNIMPLEMENTED saying what to do instead.
"""

from __future__ import annotations

import base64

import pytest
from tritonclient.utils import InferenceServerException

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
