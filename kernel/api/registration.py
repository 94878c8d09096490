"""Register gRPC handlers from service descriptors, with deserializers that never raise.

grpc answers INTERNAL (sync) or UNKNOWN (asyncio) when a request deserializer
raises, yet bytes that are not a valid message are the caller's mistake. Our
deserializers hand such bytes on as ``Unparsable``; ``ensure_parsed`` turns
them into INVALID_ARGUMENT inside the handler, per message on streams. A
large ModelInferRequest whose bytes show it past the element limits comes so
too, refused before it is parsed (``_PRECHECKS``, wire_limits.py).

A unary request of those types larger than ``payload_budget.CHARGE_ABOVE`` reaches its handler as
``Received`` (the message and its size), for the handler to charge against the kernel's payload budget;
every handler of ModelInfer, Decide and StartTask takes it so (``payload_budget.hold_call``).

A unary behaviour marked ``wants_arrival`` is called with ``arrived_ns``:
the ``time.monotonic_ns()`` at which gRPC took up the call, on the server's
polling thread (sync) or event loop (asyncio), as the call came in. A
request-level timeout counts from there, so the time a call waits for a
handler thread (or for the GIL) counts against it, as the client sees it.

On the threaded server, handlers are also *registered* (``add_to_server``),
as gRPC's generated ``add_*_to_server`` functions do: gRPC then matches a
call's method itself instead of asking each generic handler in turn (~1-2 µs
of Python per call). On ``grpc.aio`` they are not, and neither are the
health and reflection services (``generic_only``): the asyncio server keeps
one outstanding "request a call" task per registered method and, for every
call, awaits ``asyncio.wait`` over all of them — with the kernel's ~17 methods that
was 35 done-callbacks added and removed per call, ~14 µs of the event loop's
time (bench/RESULTS.md, "aio front end: registered methods cost the loop").
A generic handler is one dict lookup. The same handlers stay a
``grpc.GenericRpcHandler`` for every server.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import NamedTuple

import grpc

from .._proto.aios.kernel.v1 import kernel_pb2 as kpb
from .._proto.inference import grpc_service_pb2 as pb
from ..errors import InvalidArgument
from . import wire_limits
from .payload_budget import CHARGE_ABOVE


class Unparsable:
    """Stands in for a request whose bytes did not parse (or that was refused from its bytes: ``refusal``)."""

    __slots__ = ("type_name", "reason", "id", "model_name", "refusal")

    def __init__(self, type_name: str, reason: str, refusal: str = ""):
        self.type_name = type_name
        self.reason = reason
        self.refusal = refusal  # refused from its bytes before parsing (_PRECHECKS): the whole message
        self.id = ""  # stream errors echo the request id and model; there are none
        self.model_name = ""


def ensure_parsed(request) -> None:
    if type(request) is Unparsable:
        raise InvalidArgument(request.refusal or f"the request is not a valid {request.type_name} message: "
                                                 f"{request.reason}")


class Received(NamedTuple):
    """A client stream's message with the size of its bytes: what a stream holds is bounded in bytes too
    (scheduling/stream_window.py), and asking the parsed message (``ByteSize``) would serialize it again."""

    message: object  # the parsed message, or an Unparsable stand-in
    nbytes: int


# Checks of a request's bytes before they are parsed, by message type: why it is refused, or None. Parsing a
# ModelInferRequest can take ~18x its bytes of memory before its inputs can be checked (wire_limits.py).
# A DecisionRequest's (or StartTask's) fields likewise, ~15x (wire_limits.decision_refusal).
_PRECHECKS: dict[str, Callable[[bytes], str | None]] = {
    pb.ModelInferRequest.DESCRIPTOR.full_name: wire_limits.refusal,
    kpb.DecisionRequest.DESCRIPTOR.full_name: wire_limits.decision_refusal,
    kpb.StartTaskRequest.DESCRIPTOR.full_name: wire_limits.task_refusal,
}


def _safe_parser(message_cls, sized: bool = False) -> Callable[[bytes], object]:
    """``message_cls.FromString`` that never raises; ``sized``: each message comes as ``Received``."""
    parse = message_cls.FromString
    name = message_cls.DESCRIPTOR.full_name
    precheck = _PRECHECKS.get(name)

    def deserialize(data: bytes):
        if precheck is not None and len(data) > CHARGE_ABOVE:  # (small ones: this compare, nothing else)
            return large(data)
        try:
            return parse(data)
        except Exception as exc:  # DecodeError, or upb's own error for truncated input
            return Unparsable(name, str(exc) or type(exc).__name__)

    def large(data: bytes):
        """A request past CHARGE_ABOVE: checked from its bytes first when past SCAN_ABOVE; a unary one that parses
        comes as ``Received``, for its handler to charge against the payload budget (payload_budget.py)."""
        if len(data) > wire_limits.SCAN_ABOVE:
            refused = precheck(data)
            if refused is not None:
                return Unparsable(name, "", refused)
        try:
            message = parse(data)
        except Exception as exc:
            return Unparsable(name, str(exc) or type(exc).__name__)
        return message if sized else Received(message, len(data))

    if not sized:
        return deserialize
    return lambda data: Received(deserialize(data), len(data))


_FACTORIES = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


_RpcMethodHandler = type(grpc.unary_unary_rpc_method_handler(lambda request, context: None))
_UNARY_UNARY = _RpcMethodHandler._fields.index("unary_unary")


def unary_behaviour(handler: grpc.RpcMethodHandler):
    """The function a unary-unary handler was made from (``_ArrivalStamped`` wraps it per call)."""
    return tuple.__getitem__(handler, _UNARY_UNARY)


class _ArrivalStamped(_RpcMethodHandler):
    """A unary handler whose behaviour is handed the time gRPC took up the call.

    gRPC reads ``unary_unary`` once it has the call, on its polling thread or
    event loop, before the call waits for anything else; a registered handler
    (threaded server) is not looked up per call, so the stamp is taken here,
    where gRPC reads the behaviour, whether it found the handler registered or
    through ``ServiceHandlers.service`` (grpc.aio).
    """

    __slots__ = ()

    @property
    def unary_unary(self):
        behaviour = unary_behaviour(self)
        stamped = functools.partial(behaviour, arrived_ns=time.monotonic_ns())
        pool = getattr(behaviour, "experimental_thread_pool", None)  # grpc reads it here (eager_receive.py)
        if pool is not None:
            stamped.experimental_thread_pool = pool
        return stamped


class ServiceHandlers(grpc.GenericRpcHandler):
    """Every method handler of one service: a generic handler, and the table ``add_to_server`` registers."""

    def __init__(self, service_name: str, methods: dict[str, grpc.RpcMethodHandler]):
        self.service_name = service_name
        self.methods = methods
        self._by_path = {f"/{service_name}/{name}": handler for name, handler in methods.items()}

    def service(self, handler_call_details):
        return self._by_path.get(handler_call_details.method)

    def replace(self, method_name: str, handler: grpc.RpcMethodHandler) -> None:
        """Serve ``method_name`` with ``handler`` instead (before the server has it: entry_gate.guard)."""
        self.methods[method_name] = handler
        self._by_path[f"/{self.service_name}/{method_name}"] = handler


def add_to_server(server, handlers) -> None:
    """Add ``handlers`` to ``server`` as generic handlers; on a threaded server also register each
    ``ServiceHandlers``' methods (never on ``grpc.aio``: see the module docstring)."""
    target = generic_only(server)
    for handler in handlers:
        if isinstance(handler, ServiceHandlers):
            target.add_registered_method_handlers(handler.service_name, handler.methods)
    target.add_generic_rpc_handlers(list(handlers))


def generic_only(server):
    """``server`` as gRPC's generated ``add_*_to_server`` functions should see it: on ``grpc.aio`` a view
    that keeps their generic handlers and drops their method registrations (module docstring)."""
    return _GenericOnlyAio(server) if isinstance(server, grpc.aio.Server) else server


class _GenericOnlyAio(grpc.aio.Server):
    """A ``grpc.aio.Server`` (so code that checks for one still picks its asyncio servicers) that
    forwards everything but ``add_registered_method_handlers``."""

    def __init__(self, server: grpc.aio.Server):
        self._server = server

    def add_registered_method_handlers(self, service_name, method_handlers) -> None:
        pass  # the generated code adds the same handlers as a generic handler too

    def add_generic_rpc_handlers(self, generic_rpc_handlers) -> None:
        self._server.add_generic_rpc_handlers(generic_rpc_handlers)

    def add_insecure_port(self, address):
        return self._server.add_insecure_port(address)

    def add_secure_port(self, address, server_credentials):
        return self._server.add_secure_port(address, server_credentials)

    async def start(self) -> None:
        await self._server.start()

    async def stop(self, grace):
        await self._server.stop(grace)

    async def wait_for_termination(self, timeout=None):
        return await self._server.wait_for_termination(timeout)


# Responses their handlers hand over already serialized: an AuditRecordBatch is built from the records' stored
# bytes (kernel/audit/reader.py), which parsing only to serialize again would cost more than the rest of a send.
SERIALIZED_OUTPUTS = {"AuditRecordBatch"}


def _passed_through(message):
    return message if type(message) is bytes else message.SerializeToString()


def generic_handler(service, messages, behaviours: dict[str, Callable]) -> ServiceHandlers:
    """A handler for every method of ``service`` (a ServiceDescriptor); ``messages`` is its _pb2 module."""
    methods = {}
    for method in service.methods:
        request_cls = getattr(messages, method.input_type.name)
        response_cls = getattr(messages, method.output_type.name)
        factory = _FACTORIES[(method.client_streaming, method.server_streaming)]
        behaviour = behaviours[method.name]
        handler = factory(
            behaviour,
            request_deserializer=_safe_parser(request_cls, sized=method.client_streaming),
            response_serializer=_passed_through if method.output_type.name in SERIALIZED_OUTPUTS
            else response_cls.SerializeToString,
        )
        if getattr(behaviour, "wants_arrival", False) and not (method.client_streaming or method.server_streaming):
            handler = _ArrivalStamped._make(handler)
        methods[method.name] = handler
    return ServiceHandlers(service.full_name, methods)
