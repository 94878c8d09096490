"""Our own API (``aios.kernel.v1``): handlers built from the service descriptors.

Services whose issue has not landed answer every RPC with UNIMPLEMENTED and
say so; implemented RPCs are registered in ``IMPLEMENTED``. Handlers are
built generically from the descriptors so the same table serves the sync
and the asyncio front ends.
"""

from __future__ import annotations

import grpc

from .._proto.aios.kernel.v1 import kernel_pb2
from ..models import ModelHub

PACKAGE = "aios.kernel.v1"
SERVICE_NAMES = [f"{PACKAGE}.{name}" for name in kernel_pb2.DESCRIPTOR.services_by_name]


def _list_models(hub: ModelHub):
    def list_models(request):
        response = kernel_pb2.ListModelsResponse()
        by_name: dict[str, list] = {}
        for mv in hub.loaded():
            by_name.setdefault(mv.name, []).append(mv)
        for name in sorted(by_name):
            versions = by_name[name]
            response.models.add(
                name=name,
                versions=hub.versions(name),
                state="READY",
                provider=versions[0].runtime.provider,
            )
        return response

    return list_models


def _unimplemented_message(service: str, method: str) -> str:
    return f"{service}.{method} is not implemented yet in this kernel version"


def generic_handlers(hub: ModelHub, asynchronous: bool) -> list[grpc.GenericRpcHandler]:
    implemented = {("AdminService", "ListModels"): _list_models(hub)}
    handlers = []
    for service in kernel_pb2.DESCRIPTOR.services_by_name.values():
        methods = {}
        for method in service.methods:
            request_cls = getattr(kernel_pb2, method.input_type.name)
            response_cls = getattr(kernel_pb2, method.output_type.name)
            func = implemented.get((service.name, method.name))
            behaviour = _make(func, service.name, method.name, asynchronous, method.server_streaming)
            kind = (method.client_streaming, method.server_streaming)
            factory = {
                (False, False): grpc.unary_unary_rpc_method_handler,
                (False, True): grpc.unary_stream_rpc_method_handler,
                (True, False): grpc.stream_unary_rpc_method_handler,
                (True, True): grpc.stream_stream_rpc_method_handler,
            }[kind]
            methods[method.name] = factory(
                behaviour,
                request_deserializer=request_cls.FromString,
                response_serializer=response_cls.SerializeToString,
            )
        handlers.append(grpc.method_handlers_generic_handler(f"{PACKAGE}.{service.name}", methods))
    return handlers


def _make(func, service: str, method: str, asynchronous: bool, streaming_out: bool):
    message = _unimplemented_message(service, method)
    if asynchronous:
        if func is not None:
            async def call(request, context):
                return func(request)
        elif streaming_out:
            async def call(request, context):
                await context.abort(grpc.StatusCode.UNIMPLEMENTED, message)
                yield  # an async generator, as grpc.aio expects for streaming responses
        else:
            async def call(request, context):
                await context.abort(grpc.StatusCode.UNIMPLEMENTED, message)
        return call
    if func is not None:
        return lambda request, context: func(request)

    def call(request, context):
        context.abort(grpc.StatusCode.UNIMPLEMENTED, message)

    return call
