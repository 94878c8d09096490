"""Register gRPC handlers from service descriptors, with deserializers that never raise.

grpc answers INTERNAL (sync) or UNKNOWN (asyncio) when a request deserializer
raises, yet bytes that are not a valid message are the caller's mistake. Our
deserializers hand such bytes on as ``Unparsable``; ``ensure_parsed`` turns
them into INVALID_ARGUMENT inside the handler, per message on streams.

A unary behaviour marked ``wants_arrival`` is called with ``arrived_ns``:
the ``time.monotonic_ns()`` at which gRPC looked up its handler, on the
server's polling thread (sync) or event loop (asyncio), as the call came
in. A request-level timeout counts from there, so the time a call waits for
a handler thread (or for the GIL) counts against it, as the client sees it.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

import grpc

from ..errors import InvalidArgument


class Unparsable:
    """Stands in for a request whose bytes did not parse."""

    __slots__ = ("type_name", "reason", "id", "model_name")

    def __init__(self, type_name: str, reason: str):
        self.type_name = type_name
        self.reason = reason
        self.id = ""  # stream errors echo the request id and model; there are none
        self.model_name = ""


def ensure_parsed(request) -> None:
    if type(request) is Unparsable:
        raise InvalidArgument(f"the request is not a valid {request.type_name} message: {request.reason}")


def _safe_parser(message_cls) -> Callable[[bytes], object]:
    parse = message_cls.FromString
    name = message_cls.DESCRIPTOR.full_name

    def deserialize(data: bytes):
        try:
            return parse(data)
        except Exception as exc:  # DecodeError, or upb's own error for truncated input
            return Unparsable(name, str(exc) or type(exc).__name__)

    return deserialize


_FACTORIES = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


class _ArrivalStampingHandler(grpc.GenericRpcHandler):
    """``grpc.method_handlers_generic_handler`` that also hands marked unary behaviours their arrival time."""

    def __init__(self, service_name: str, methods: dict, stamped: dict):
        self._methods = {f"/{service_name}/{name}": handler for name, handler in methods.items()}
        self._stamped = {f"/{service_name}/{name}": behaviour for name, behaviour in stamped.items()}

    def service(self, handler_call_details):
        method = handler_call_details.method
        behaviour = self._stamped.get(method)
        if behaviour is None:
            return self._methods.get(method)
        return self._methods[method]._replace(
            unary_unary=functools.partial(behaviour, arrived_ns=time.monotonic_ns()))


def generic_handler(service, messages, behaviours: dict[str, Callable]) -> grpc.GenericRpcHandler:
    """A handler for every method of ``service`` (a ServiceDescriptor); ``messages`` is its _pb2 module."""
    methods, stamped = {}, {}
    for method in service.methods:
        request_cls = getattr(messages, method.input_type.name)
        response_cls = getattr(messages, method.output_type.name)
        factory = _FACTORIES[(method.client_streaming, method.server_streaming)]
        methods[method.name] = factory(
            behaviours[method.name],
            request_deserializer=_safe_parser(request_cls),
            response_serializer=response_cls.SerializeToString,
        )
        behaviour = behaviours[method.name]
        if getattr(behaviour, "wants_arrival", False) and not (method.client_streaming or method.server_streaming):
            stamped[method.name] = behaviour
    if stamped:
        return _ArrivalStampingHandler(service.full_name, methods, stamped)
    return grpc.method_handlers_generic_handler(service.full_name, methods)
