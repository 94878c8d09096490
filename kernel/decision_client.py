"""A small client for the decision API: Python values in, ``Decision`` messages out.

Used by ``aios-kernel decide`` and the demo; the Python client package on
the roadmap will grow from this. Errors are ``grpc.RpcError`` as gRPC raises
them (``.code()``, ``.details()``, ``.trailing_metadata()``); ``decide`` can
retry the refusals that say when to come back (``retries``).
"""

from __future__ import annotations

import json
import numbers
import time
from collections.abc import Iterable, Iterator

import grpc
import numpy as np

from ._proto.aios.kernel.v1 import kernel_pb2 as kpb
from ._proto.aios.kernel.v1 import kernel_pb2_grpc as kgrpc

# Refusals a caller may simply send again: a full queue or busy kernel (RESOURCE_EXHAUSTED, with a
# retry-after-ms hint), the same idempotency key in flight (ABORTED, with a hint), a kernel draining
# (UNAVAILABLE: one the kernel sent, or any with an idempotency key — see may_send_again). DEADLINE_EXCEEDED
# only with an idempotency key: without one a retry may decide twice.
RETRYABLE = frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED, grpc.StatusCode.UNAVAILABLE})
DEFAULT_BACKOFF_S = 0.05  # when a refusal carries no hint (UNAVAILABLE), doubled per attempt


def to_value(value) -> kpb.Value:
    """A protobuf Value from a Python (or numpy scalar) bool, int, float or str."""
    if isinstance(value, (bool, np.bool_)):
        return kpb.Value(bool_value=bool(value))
    if isinstance(value, numbers.Integral):
        if not -2**63 <= value < 2**63:  # (protobuf's own error named neither the field nor the limit)
            raise ValueError(f"{int(value)} does not fit a 64-bit integer; a number field takes it as a float "
                             f"({float(value):g})")
        return kpb.Value(int_value=int(value))
    if isinstance(value, numbers.Real):
        return kpb.Value(number_value=float(value))
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
    """A DecisionRequest: ``fields`` as typed values (``to_value``), ``text`` as text fields, ``options`` any other
    DecisionRequest field (``tenant``, ``request_id``, ``idempotency_key``, ``priority``, ``timeout_ms``)."""
    request = kpb.DecisionRequest(pipeline=pipeline, **options)
    for name, value in fields.items():
        try:
            request.fields[name].CopyFrom(to_value(value))
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"field {name!r}: {exc}") from None
    for name, value in (text or {}).items():
        request.text_fields[name] = value
    return request


def _recorded_at(error: grpc.RpcError) -> str | None:
    """The ``aios-audit-sequence`` trailer of a refusal whose decision was recorded all the same, if any."""
    for key, value in error.trailing_metadata() or ():
        if key == "aios-audit-sequence":
            return value
    return None


def _not_decided(error: grpc.RpcError) -> bool:
    """Whether an UNAVAILABLE proves nothing was decided: the kernel said so (its ``aios-not-decided``
    trailer, kernel/errors.py), or the channel never reached a kernel. gRPC's own UNAVAILABLE ending a call
    in progress ("Cancelling all calls" at the end of a drain, a connection lost) proves nothing."""
    if any(key == "aios-not-decided" for key, _ in error.trailing_metadata() or ()):
        return True
    return "failed to connect" in (error.details() or "")


def may_send_again(error: grpc.RpcError, request: kpb.DecisionRequest) -> bool:
    """README "Retrying": whether ``request`` may be sent again after ``error`` without deciding it twice
    (its idempotency key, if any, makes a retry return a decision already made)."""
    code, keyed = error.code(), bool(request.idempotency_key)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return keyed  # (a late decision is kept under its key)
    if code not in RETRYABLE or _recorded_at(error) is not None:
        # An UNAVAILABLE whose decision was recorded all the same (its review could not be stored: the
        # aios-audit-sequence trailer) is not sent again: nothing was kept under its key.
        return False
    return keyed or code != grpc.StatusCode.UNAVAILABLE or _not_decided(error)


def retry_after_s(error: grpc.RpcError) -> float | None:
    """The kernel's ``retry-after-ms`` hint on a refusal, in seconds; None when it gave none."""
    for key, value in error.trailing_metadata() or ():
        if key == "retry-after-ms":
            try:
                return int(value) / 1000
            except ValueError:
                return None
    return None


class DecisionClient:
    """Decisions over one channel to ``address`` (``host:port``); also the review, task and audit stubs.

    ``timeout``: the deadline of each unary call in seconds, unless a call gives its own;
    ``stream_timeout``: that of a ``decide_stream`` (None: no deadline).
    """

    def __init__(self, address: str, timeout: float = 10.0, stream_timeout: float | None = 300.0):
        self.channel = grpc.insecure_channel(address)
        self.stub = kgrpc.DecisionServiceStub(self.channel)
        self.reviews = kgrpc.ReviewServiceStub(self.channel)
        self.tasks = kgrpc.TaskServiceStub(self.channel)
        self.audit = kgrpc.AuditServiceStub(self.channel)
        self.timeout = timeout
        self.stream_timeout = stream_timeout

    def decide(self, pipeline: str, fields: dict, text: dict | None = None, *, timeout: float | None = None,
               retries: int = 0, **options) -> kpb.Decision:
        """One decision (``make_request``'s arguments). ``timeout``: this call's deadline in seconds (default the
        client's), shared by all its attempts. ``retries``: how many times to send it again after a refusal
        in ``RETRYABLE`` that cannot make it decided twice (``may_send_again``: an UNAVAILABLE gRPC sent
        ending a call in progress only with an ``idempotency_key``), waiting as the kernel's hint says; after
        DEADLINE_EXCEEDED too if it has an ``idempotency_key`` (the retry then returns the decision made
        late, not a second one). Raises the last ``grpc.RpcError``."""
        if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
            raise ValueError(f"retries must be an integer >= 0, got {retries!r}")
        request = make_request(pipeline, fields, text, **options)
        end = time.monotonic() + (self.timeout if timeout is None else timeout)
        backoff = DEFAULT_BACKOFF_S
        for attempt in range(retries + 1):
            try:
                return self.stub.Decide(request, timeout=max(0.0, end - time.monotonic()))
            except grpc.RpcError as error:
                retryable = may_send_again(error, request)
                pause = retry_after_s(error)
                if pause is None:
                    pause, backoff = backoff, backoff * 2
                if attempt == retries or not retryable or time.monotonic() + pause >= end:
                    raise
                time.sleep(pause)
        raise AssertionError("unreachable")  # (the loop returns or raises)

    def decide_stream(self, requests: Iterable[kpb.DecisionRequest], timeout: float | None = ...) -> Iterator[kpb.Decision]:
        """Many decisions on one stream: answers in completion order, each with its request's ``request_id``
        (set one per request to match them). ``timeout``: the whole stream's deadline (default the client's
        ``stream_timeout``)."""
        return self.stub.DecideStream(iter(requests), timeout=self.stream_timeout if timeout is ... else timeout)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> DecisionClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
