"""Our own API (``aios.kernel.v1``): handlers built from the service descriptors.

RPCs nobody implements answer UNIMPLEMENTED and say so. Implemented RPCs are
plain blocking handlers (see ``rpc.py``) passed in as a table keyed by
``(service, method)``; the same table serves the sync and the asyncio front
ends.
"""

from __future__ import annotations

import grpc

from .._proto.aios.kernel.v1 import kernel_pb2
from ..models import ModelHub
from . import registration, rpc

PACKAGE = "aios.kernel.v1"
SERVICE_NAMES = [f"{PACKAGE}.{name}" for name in kernel_pb2.DESCRIPTOR.services_by_name]


_COUNTERS = (
    "submitted", "rejected_queue_full", "rejected_tenant_full", "rejected_deadline",
    "expired", "expired_predicted", "cancelled", "batches", "rows",
)
_OUTSIDE = ("expired_before_queue", "rejected_busy", "finished_late")  # counted by ModelStats, not the scheduler
_LATEST = ("fit_ns_per_row", "fit_ns_fixed", "service_stretch")  # the latest version's, not summed


def _list_models(hub: ModelHub, lanes):
    def list_models(request, ctx):
        response = kernel_pb2.ListModelsResponse()
        by_name: dict[str, list] = {}
        for mv in hub.loaded():
            by_name.setdefault(mv.name, []).append(mv)
        stats = lanes.stats()["models"]
        # Queued and running on every copy of a version: a reload's old copy keeps the requests queued on it until
        # they have run there (the new copy's alone read 0 queued while they waited).
        by_version = lanes.version_counters()
        for name in sorted(by_name):
            versions = by_name[name]
            totals = [by_version.get(id(mv.stats), {}) for mv in versions]
            summary = response.models.add(
                name=name,
                versions=hub.versions(name),
                state="READY",
                provider=versions[0].runtime.provider,
                queued_requests=sum(total.get("queued", 0) for total in totals),
                running_batches=sum(total.get("in_flight", 0) for total in totals),
            )
            counters = summary.scheduler
            for mv in versions:
                for key, value in stats.get(mv, {}).items():
                    if key in _COUNTERS:
                        setattr(counters, key, getattr(counters, key) + value)
                for key in _OUTSIDE:
                    setattr(counters, key, getattr(counters, key) + getattr(mv.stats, key))
            latest = stats.get(hub.get(name), {})
            for key in _LATEST:
                setattr(counters, key, latest.get(key, 0.0))
        return response

    return list_models


def _unimplemented_message(service: str, method: str) -> str:
    return f"{service}.{method} is not implemented yet in this kernel version"


def generic_handlers(
    hub: ModelHub, lanes, asynchronous: bool, implemented: dict | None = None, refusals=None, payload=None,
) -> list[grpc.GenericRpcHandler]:
    """Handlers for every service of kernel.proto; ``implemented`` maps (service, method) to a handler; each error
    status they answer is counted in ``refusals`` (``observability.refusals.CallRefusals``), if given; large
    requests (Decide's, StartTask's) are held against ``payload`` (api/payload_budget.py), if given."""
    implemented = {("AdminService", "ListModels"): _list_models(hub, lanes), **(implemented or {})}
    handlers = []
    for service in kernel_pb2.DESCRIPTOR.services_by_name.values():
        behaviours = {
            method.name: _make(
                implemented.get((service.name, method.name)), service.name, method.name,
                asynchronous, method.client_streaming, method.server_streaming, refusals, payload,
            )
            for method in service.methods
        }
        handlers.append(registration.generic_handler(service, kernel_pb2, behaviours))
    return handlers


def _make(func, service: str, method: str, asynchronous: bool, streaming_in: bool, streaming_out: bool, refusals,
          payload=None):
    if func is not None:
        wrap = rpc.aio_handler if asynchronous else rpc.sync_handler
        return wrap(f"{service}.{method}", func, streaming_in, streaming_out, refusals, payload)
    message = _unimplemented_message(service, method)
    count = (lambda: None) if refusals is None else (lambda: refusals.count(f"{service}.{method}", "UNIMPLEMENTED"))
    if asynchronous:
        if streaming_out:
            async def call(request, context):
                count()
                await context.abort(grpc.StatusCode.UNIMPLEMENTED, message)
                yield  # an async generator, as grpc.aio expects for streaming responses
        else:
            async def call(request, context):
                count()
                await context.abort(grpc.StatusCode.UNIMPLEMENTED, message)
        return call

    def call(request, context):
        count()
        context.abort(grpc.StatusCode.UNIMPLEMENTED, message)

    return call
