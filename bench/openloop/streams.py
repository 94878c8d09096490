"""What the generator sends: a pre-serialised ``ModelInferRequest`` per kind of request (``Stream``), with its
deadline and how that deadline travels, and the two kinds of load (``OpenLoad``: a schedule of send times;
``ClosedLoad``: a fixed number of requests in flight)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bench.tiny_models import MODELS

GUARD_S = 1.0  # gRPC deadline beyond the request's own deadline ("timeout" mode): only ends stuck calls
NO_DEADLINE_TIMEOUT_S = 30.0  # gRPC deadline of requests without a deadline


def payload(model: str, rows: int = 1, priority: int | None = None, timeout_us: int | None = None,
            seed: int = 0, served_as: str | None = None) -> bytes:
    """A serialised ModelInferRequest for ``model`` (FP32 INPUT0 [rows, width]); ``served_as``: the name the
    server knows a copy of the model by (default ``model``)."""
    from kernel._proto.inference import grpc_service_pb2 as pb

    width = MODELS[model][0]
    request = pb.ModelInferRequest(model_name=served_as or model)
    tensor = request.inputs.add()
    tensor.name, tensor.datatype = "INPUT0", "FP32"
    tensor.shape.extend([rows, width])
    request.raw_input_contents.append(
        np.random.default_rng(seed).standard_normal((rows, width), dtype=np.float32).tobytes())
    if priority is not None:
        request.parameters["priority"].int64_param = priority
    if timeout_us is not None:
        request.parameters["timeout"].int64_param = timeout_us
    return request.SerializeToString()


@dataclass
class Stream:
    """One kind of request: a model, pre-serialised bytes, a deadline (None = none) and how it is sent."""

    name: str
    model: str
    data: bytes
    deadline_s: float | None = None
    deadline_via: str = "timeout"  # "timeout": Triton parameter (+ GUARD_S gRPC guard); "grpc": gRPC deadline
    url: str | None = None  # another server than the run's (a neighbour in a kernel process of its own)

    @property
    def grpc_timeout(self) -> float:
        if self.deadline_s is None:
            return NO_DEADLINE_TIMEOUT_S
        return self.deadline_s + (GUARD_S if self.deadline_via == "timeout" else 0.0)


def make_stream(name: str, model: str, *, priority: int | None = None, deadline_ms: float | None = None,
                deadline_via: str = "timeout", rows: int = 1, served_as: str | None = None,
                url: str | None = None) -> Stream:
    deadline_s = deadline_ms / 1000 if deadline_ms else None
    timeout_us = int(deadline_ms * 1000) if deadline_ms and deadline_via == "timeout" else None
    return Stream(name, served_as or model, payload(model, rows, priority, timeout_us, served_as=served_as),
                  deadline_s, deadline_via, url)


@dataclass
class OpenLoad:
    stream: Stream
    times: np.ndarray  # scheduled send offsets (s) from the run's start


@dataclass
class ClosedLoad:
    stream: Stream
    concurrency: int
