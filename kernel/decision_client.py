"""A small client for the decision API: Python values in, ``Decision`` messages out.

Used by ``aios-kernel decide`` and the demo; the Python client package on
the roadmap will grow from this.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator

import grpc

from ._proto.aios.kernel.v1 import kernel_pb2 as kpb
from ._proto.aios.kernel.v1 import kernel_pb2_grpc as kgrpc


def to_value(value) -> kpb.Value:
    """A protobuf Value from a Python bool, int, float or str."""
    if isinstance(value, bool):
        return kpb.Value(bool_value=value)
    if isinstance(value, int):
        return kpb.Value(int_value=value)
    if isinstance(value, float):
        return kpb.Value(number_value=value)
    if isinstance(value, str):
        return kpb.Value(string_value=value)
    raise TypeError(f"a field value must be bool, int, float or str, got {type(value).__name__}")


def parse_cli_value(text: str):
    """``--field k=v``: a JSON scalar when ``v`` is one (``12``, ``0.5``, ``true``, ``"12"``), else the string."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return text
    return value if isinstance(value, (bool, int, float, str)) else text


def make_request(pipeline: str, fields: dict, text: dict | None = None, **options) -> kpb.DecisionRequest:
    request = kpb.DecisionRequest(pipeline=pipeline, **options)
    for name, value in fields.items():
        request.fields[name].CopyFrom(to_value(value))
    for name, value in (text or {}).items():
        request.text_fields[name] = value
    return request


class DecisionClient:
    def __init__(self, address: str, timeout: float = 10.0):
        self.channel = grpc.insecure_channel(address)
        self.stub = kgrpc.DecisionServiceStub(self.channel)
        self.reviews = kgrpc.ReviewServiceStub(self.channel)
        self.tasks = kgrpc.TaskServiceStub(self.channel)
        self.audit = kgrpc.AuditServiceStub(self.channel)
        self.timeout = timeout

    def decide(self, pipeline: str, fields: dict, text: dict | None = None, **options) -> kpb.Decision:
        return self.stub.Decide(make_request(pipeline, fields, text, **options), timeout=self.timeout)

    def decide_stream(self, requests: Iterable[kpb.DecisionRequest], timeout: float | None = None) -> Iterator[kpb.Decision]:
        return self.stub.DecideStream(iter(requests), timeout=timeout)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> DecisionClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
