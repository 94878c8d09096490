"""A small client for the decision API: Python values in, ``Decision`` messages out.

Used by ``aios-kernel decide`` and the demo; the Python client package on
the roadmap will grow from this. Errors are ``grpc.RpcError`` as gRPC raises
them (``.code()``, ``.details()``, ``.trailing_metadata()``); ``decide`` can
retry the refusals that say when to come back (``retries``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator, Sequence
from types import EllipsisType
from typing import Any

import grpc

from ._proto.aios.kernel.v1 import kernel_pb2 as kpb
from ._proto.aios.kernel.v1 import kernel_pb2_grpc as kgrpc
from .channel import kernel_channel
from .field_values import to_value  # noqa: F401  (part of the client's API)

# Refusals a caller may simply send again: a full queue or busy kernel (RESOURCE_EXHAUSTED, with a
# retry-after-ms hint), the same idempotency key in flight (ABORTED, with a hint), a kernel draining
# (UNAVAILABLE: one the kernel sent, or any with an idempotency key — see may_send_again). DEADLINE_EXCEEDED
# only with an idempotency key: without one a retry may decide twice.
RETRYABLE = frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED, grpc.StatusCode.UNAVAILABLE})
# gRPC's own RESOURCE_EXHAUSTED for a call past the server's maximum_concurrent_rpcs (the threaded front end's
# `workers`): refused before the kernel saw it, so never decided.
GRPC_CALL_LIMIT = "Concurrent RPC limit exceeded!"
DEFAULT_BACKOFF_S = 0.05  # when a refusal carries no hint (UNAVAILABLE), doubled per attempt


def parse_cli_value(text: str):
    """``--field k=v``: a JSON scalar when ``v`` is one (``12``, ``0.5``, ``true``, ``"12"``), else the string."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return text
    return value if isinstance(value, (bool, int, float, str)) else text


def _text(value) -> str:
    if not isinstance(value, str):  # (protobuf's own words: "bad argument type for built-in operation")
        raise TypeError(f"must be a str, got {type(value).__name__}")
    return value


def make_request(pipeline: str, fields: dict, text: dict | None = None, **options) -> kpb.DecisionRequest:
    """A DecisionRequest: ``fields`` as typed values (``to_value``), ``text`` as text fields, ``options`` any other
    DecisionRequest field (``tenant``, ``request_id``, ``idempotency_key``, ``priority``, ``timeout_ms``).
    TypeError or ValueError naming the field for a value that cannot be sent (a client audit: protobuf's own
    errors named none)."""
    request = kpb.DecisionRequest(pipeline=pipeline, **options)
    for kind, values, put in (("field", fields, lambda name, value: request.fields[name].CopyFrom(to_value(value))),
                              ("text field", text or {}, lambda name, value: request.text_fields.__setitem__(
                                  name, _text(value)))):
        for name, value in values.items():
            try:
                put(name, value)
            except UnicodeError:  # (a lone surrogate: text that is not UTF-8 cannot be sent)
                raise ValueError(f"{kind} {name!r}: not valid UTF-8 text") from None
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"{kind} {name!r}: {exc}") from None
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
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        # The kernel's own says when to come back; gRPC's own refusal of a call past the threaded front end's
        # `workers` never ran it (a review: without it the busy kernel's usual answer was no longer retried).
        # Any other, such as this client's receive limit on an answer already decided, or a request over the
        # kernel's message limit, would fail again or decide again (a client audit: one request decided 4 times).
        return retry_after_s(error) is not None or _not_decided(error) or error.details() == GRPC_CALL_LIMIT
    return keyed or code != grpc.StatusCode.UNAVAILABLE or _not_decided(error)


def retry_after_s(error: grpc.RpcError) -> float | None:
    """The kernel's ``retry-after-ms`` hint on a refusal, in seconds; None when it gave none."""
    for key, value in error.trailing_metadata() or ():
        if key == "retry-after-ms":
            try:
                ms = int(value)
            except ValueError:
                return None
            return ms / 1000 if ms >= 0 else None  # (a negative one is no hint: time.sleep raised on it)
    return None


class DecisionStream:
    """The answers of one ``DecideStream``, in completion order: an iterator that can be cancelled.

    Leaving a ``for`` loop early does not end the stream (the kernel decides every request sent, and
    answers no one): cancel it, or use it as a context manager, which cancels it on leaving (a client audit:
    after a ``break`` all 3,000 requests were decided). A request the iterable cannot give (a failing
    generator, a value that cannot be sent) ends the sending; the answers to what was sent still come, and
    then that error is raised, never gRPC's "Exception iterating requests!" in its place.
    """

    def __init__(self, open_call, requests: Iterable[kpb.DecisionRequest]):
        self._failure: BaseException | None = None
        self._call = open_call(self._sent(requests))

    def _sent(self, requests: Iterable[kpb.DecisionRequest]) -> Iterator[kpb.DecisionRequest]:
        try:
            for index, request in enumerate(requests):
                if not isinstance(request, kpb.DecisionRequest):  # (gRPC: INTERNAL "Exception serializing request!")
                    raise TypeError(f"requests[{index}] is a {type(request).__name__}, not a DecisionRequest "
                                    "(make_request builds one)")
                yield request
        except Exception as exc:  # (raised to the caller once the answers to what was sent are in)
            self._failure = exc

    def __iter__(self) -> DecisionStream:
        return self

    def __next__(self) -> kpb.Decision:
        try:
            return next(self._call)
        except StopIteration:
            if self._failure is not None:
                failure, self._failure = self._failure, None
                raise failure from None
            raise

    def cancel(self) -> None:
        """End the stream now: requests not yet answered may or may not have been decided."""
        self._call.cancel()

    def __getattr__(self, name: str):
        # gRPC's call itself for the rest (code(), details(), trailing_metadata(), is_active(), ...): what
        # decide_stream returned before it returned this (a review: code calling them got AttributeError).
        return getattr(self._call, name)

    def __enter__(self) -> DecisionStream:
        return self

    def __exit__(self, *exc) -> None:
        self.cancel()  # (a no-op for a stream already over)


class DecisionClient:
    """Decisions over one channel to ``address`` (``host:port``); also the review, task and audit stubs.

    ``timeout``: the deadline of each unary call in seconds, unless a call gives its own (None: no deadline);
    ``stream_timeout``: that of a ``decide_stream`` (None: no deadline). ``credentials``: TLS to a proxy in
    front of the kernel (grpc.ssl_channel_credentials(...)); ``options``: gRPC channel options (the kernel's
    64 MiB answers are taken by default: kernel/channel.py); ``metadata``: sent with every decide and stream
    (an authenticating proxy's token, say).
    """

    def __init__(self, address: str, timeout: float | None = 10.0, stream_timeout: float | None = 300.0, *,
                 credentials: grpc.ChannelCredentials | None = None, options: Sequence[tuple[str, Any]] = (),
                 metadata: Sequence[tuple[str, str]] = ()):
        self.channel = kernel_channel(address, options, credentials)
        self.stub = kgrpc.DecisionServiceStub(self.channel)
        self.reviews = kgrpc.ReviewServiceStub(self.channel)
        self.tasks = kgrpc.TaskServiceStub(self.channel)
        self.audit = kgrpc.AuditServiceStub(self.channel)
        self.timeout = timeout
        self.stream_timeout = stream_timeout
        self.metadata = tuple(metadata)

    def decide(self, pipeline: str, fields: dict, text: dict | None = None, *,
               timeout: float | None | EllipsisType = ..., retries: int = 0, **options) -> kpb.Decision:
        """One decision (``make_request``'s arguments). ``timeout``: this call's deadline in seconds (default the
        client's; None: none), shared by all its attempts. ``retries``: how many times to send it again after a
        refusal in ``RETRYABLE`` that cannot make it decided twice (``may_send_again``: an UNAVAILABLE gRPC sent
        ending a call in progress only with an ``idempotency_key``), waiting as the kernel's hint says; after
        DEADLINE_EXCEEDED too if it has an ``idempotency_key`` (the retry then returns the decision made
        late, not a second one). Raises the last ``grpc.RpcError``."""
        if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
            raise ValueError(f"retries must be an integer >= 0, got {retries!r}")
        request = make_request(pipeline, fields, text, **options)
        limit = self.timeout if timeout is ... else timeout
        end = None if limit is None else time.monotonic() + limit
        backoff = DEFAULT_BACKOFF_S
        for attempt in range(retries + 1):
            try:
                return self.stub.Decide(request, timeout=None if end is None else max(0.0, end - time.monotonic()),
                                        metadata=self.metadata or None)
            except grpc.RpcError as error:
                retryable = may_send_again(error, request)
                pause = retry_after_s(error)
                if pause is None:
                    pause, backoff = backoff, backoff * 2
                if attempt == retries or not retryable or (end is not None and time.monotonic() + pause >= end):
                    raise
                time.sleep(pause)
        raise AssertionError("unreachable")  # (the loop returns or raises)

    def decide_stream(self, requests: Iterable[kpb.DecisionRequest],
                      timeout: float | None | EllipsisType = ...) -> DecisionStream:
        """Many decisions on one stream (``DecisionStream``: cancel it, or use it in a ``with``, to end it early):
        answers in completion order, each with its request's ``request_id`` (set one per request to match them).
        ``timeout``: the whole stream's deadline (default the client's ``stream_timeout``; None: none)."""
        limit = self.stream_timeout if timeout is ... else timeout
        return DecisionStream(lambda sent: self.stub.DecideStream(sent, timeout=limit, metadata=self.metadata or None),
                              requests)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> DecisionClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
