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
        assert config.parameters["cuda_tf32"].string_value == "false"
        x = np.random.default_rng(0).normal(size=(8, 16)).astype(np.float32)
        tensor = tc.InferInput("INPUT0", [8, 16], "FP32")
        tensor.set_data_from_numpy(x)
        got = client.infer("tiny", [tensor]).as_numpy("OUTPUT0")
        cpu = ort.InferenceSession(str(tmp_path / "tiny" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
        np.testing.assert_allclose(got, cpu.run(None, {"INPUT0": x})[0], rtol=1e-4, atol=1e-5)
    finally:
        server.stop(grace=1)


@pytest.mark.parametrize("tf32", [False, True])
def test_tf32_is_off_unless_the_model_asks_for_it(tmp_path, tf32):
    from kernel.models.runtime import CUDA, OnnxModel

    path = tmp_path / "m" / "1" / "model.onnx"
    onnx_models.save(onnx_models.mlp([16, 64, 4], seed=3), path)
    config = None
    if tf32:
        from kernel.models import config as model_config

        config = model_config.parse(path.with_name("model.toml"), "m", "1", {
            "cuda_tf32": True,
            "input": [{"name": "INPUT0", "datatype": "FP32", "dims": [16]}],
            "output": [{"name": "OUTPUT0", "datatype": "FP32", "dims": [4]}],
        })
    model = OnnxModel.load(path, config, "m", "1")
    session = model._free[0]
    assert session.get_provider_options()[CUDA]["use_tf32"] == ("1" if tf32 else "0")


def test_gpu_batches_split_back_exactly_and_match_the_cpu(tmp_path):
    """Random row counts batched together on the GPU lane: each caller gets its own rows, equal to the CPU's."""
    import concurrent.futures as cf

    import tritonclient.grpc as tc

    path = tmp_path / "big" / "1" / "model.onnx"
    onnx_models.save(onnx_models.mlp([64, 512, 512, 8], seed=5), path)
    server = start_kernel(tmp_path, "sync")
    try:
        assert server.lanes.for_model(server.hub.get("big")).name == "cuda:0"
        cpu = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(1)
        inputs = [rng.normal(size=(int(rng.integers(1, 9)), 64)).astype(np.float32) for _ in range(64)]

        def call(x):
            client = tc.InferenceServerClient(f"127.0.0.1:{server.port}")
            tensor = tc.InferInput("INPUT0", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x)
            return client.infer("big", [tensor]).as_numpy("OUTPUT0")

        with cf.ThreadPoolExecutor(16) as pool:
            results = list(pool.map(call, inputs))
        for x, got in zip(inputs, results):
            np.testing.assert_allclose(got, cpu.run(None, {"INPUT0": x})[0], rtol=1e-4, atol=1e-5)
    finally:
        server.stop(grace=1)


def test_auto_front_end_serves_gpu_models_on_asyncio(tmp_path):
    import tritonclient.grpc as tc

    onnx_models.save(onnx_models.mlp([16, 64, 4], seed=3), tmp_path / "tiny" / "1" / "model.onnx")
    server = start_kernel(tmp_path, "auto")
    try:
        assert server.front_end == "aio" and server.lanes.devices_in_use() == ["cuda:0"]
        client = tc.InferenceServerClient(f"127.0.0.1:{server.port}")
        x = np.ones((2, 16), np.float32)
        tensor = tc.InferInput("INPUT0", [2, 16], "FP32")
        tensor.set_data_from_numpy(x)
        assert client.infer("tiny", [tensor]).as_numpy("OUTPUT0").shape == (2, 4)
    finally:
        server.stop(grace=1)
