"""On grpc.aio the kernel registers no methods: the asyncio server waits, for every call, on one
pending call request per registered method (kernel/api/registration.py)."""

from __future__ import annotations

import asyncio

import numpy as np

from conftest import start_kernel

CALLS = 5


def test_an_aio_call_waits_on_a_handful_of_call_requests_not_one_per_method(model_repo, monkeypatch):
    import tritonclient.grpc as tc

    sizes: list[int] = []
    wait = asyncio.wait

    async def counting_wait(fs, *args, **kwargs):
        sizes.append(len(fs))
        return await wait(fs, *args, **kwargs)

    monkeypatch.setattr(asyncio, "wait", counting_wait)  # grpc's Cython server looks it up per call
    server = start_kernel(model_repo, "aio")
    try:
        client = tc.InferenceServerClient(f"127.0.0.1:{server.port}")
        tensor = tc.InferInput("INPUT0", [1, 16], "FP32")
        tensor.set_data_from_numpy(np.ones((1, 16), np.float32))
        for _ in range(CALLS):
            client.infer("tiny", [tensor])
        client.close()
    finally:
        server.stop(grace=1)
    assert len(sizes) >= CALLS, "grpc.aio no longer waits per call: this test measures nothing"
    # The generic call request and grpc's own: with the kernel's methods registered, this was 35.
    assert max(sizes) <= 3, sizes
