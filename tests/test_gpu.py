"""The CUDA execution provider, where onnxruntime-gpu and an NVIDIA GPU are present (skipped elsewhere)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from conftest import start_kernel
from kernel.testing import onnx_models

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        "CUDAExecutionProvider" not in ort.get_available_providers(),
        reason="no CUDA execution provider here (needs onnxruntime-gpu and an NVIDIA GPU)",
    ),
]


def test_auto_provider_places_models_on_the_gpu_lane(tmp_path):
    import tritonclient.grpc as tc

    onnx_models.save(onnx_models.mlp([16, 64, 4], seed=3), tmp_path / "tiny" / "1" / "model.onnx")
    server = start_kernel(tmp_path, "sync")
    try:
        mv = server.hub.get("tiny")
        assert mv.runtime.provider == "CUDAExecutionProvider"
        assert server.lanes.for_model(mv).name == "cuda:0"
        client = tc.InferenceServerClient(f"127.0.0.1:{server.port}")
        config = client.get_model_config("tiny").config
        assert config.instance_group[0].kind == tc.model_config_pb2.ModelInstanceGroup.KIND_GPU
        assert config.parameters["execution_provider"].string_value == "CUDAExecutionProvider"
        x = np.random.default_rng(0).normal(size=(8, 16)).astype(np.float32)
        tensor = tc.InferInput("INPUT0", [8, 16], "FP32")
        tensor.set_data_from_numpy(x)
        got = client.infer("tiny", [tensor]).as_numpy("OUTPUT0")
        cpu = ort.InferenceSession(str(tmp_path / "tiny" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
        np.testing.assert_allclose(got, cpu.run(None, {"INPUT0": x})[0], rtol=1e-4, atol=1e-5)
    finally:
        server.stop(grace=1)
