"""Register gRPC handlers from service descriptors, with deserializers that never raise.

grpc answers INTERNAL (sync) or UNKNOWN (asyncio) when a request deserializer
raises, yet bytes that are not a valid message are the caller's mistake. Our
deserializers hand such bytes on as ``Unparsable``; ``ensure_parsed`` turns
them into INVALID_ARGUMENT inside the handler, per message on streams.
"""

from __future__ import annotations

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


def generic_handler(service, messages, behaviours: dict[str, Callable]) -> grpc.GenericRpcHandler:
    """A handler for every method of ``service`` (a ServiceDescriptor); ``messages`` is its _pb2 module."""
    methods = {}
    for method in service.methods:
        request_cls = getattr(messages, method.input_type.name)
        response_cls = getattr(messages, method.output_type.name)
        factory = _FACTORIES[(method.client_streaming, method.server_streaming)]
        methods[method.name] = factory(
            behaviours[method.name],
            request_deserializer=_safe_parser(request_cls),
            response_serializer=response_cls.SerializeToString,
        )
    return grpc.method_handlers_generic_handler(service.full_name, methods)
