"""The Open Inference Protocol service, independent of the gRPC front end.

Each method takes a request message and returns a response message or raises
a ``KernelError``; the front ends (``frontends.py``) only adapt calling
conventions, so the sync and asyncio servers run exactly this code.
"""

from __future__ import annotations

import logging
import time

from .. import __version__
from .._proto.inference import grpc_service_pb2 as pb
from ..errors import (DeadlineExceeded, FailedPrecondition, Internal, InvalidArgument, NotFound, Unavailable,
                      Unimplemented, quote)
from ..limits import MAX_MODEL_NAME_BYTES, MAX_REQUEST_ID_CHARS, MAX_TENANT_CHARS, check_identifier
from ..observability.refusals import CallRefusals
from ..models import ModelConfigError, ModelHub, ModelInUse, ModelVersion
from ..models.hub import requested_version
from ..scheduling import Lanes, WorkItem
from ..scheduling.execute import request_id_of
from ..scheduling.deadlines import MAX_DEADLINE_NS, request_deadline
from ..scheduling.types import NO_DEADLINE
from . import converters, tensors
from .expiry_timer import ExpiryTimer
from .registration import Unparsable, ensure_parsed

log = logging.getLogger("aios.api")

SERVER_NAME = "aios-kernel"
# Triton's extension names, so clients that probe for them find what we do support.
EXTENSIONS = ["classification", "model_repository", "model_configuration", "statistics", "schedule_policy"]

_NO_SHARED_MEMORY = ("shared memory is not offered; send inputs in raw_input_contents (or typed contents), "
                     "outputs come back in raw_output_contents")
# Triton's RPCs for extensions the kernel does not offer (not in EXTENSIONS): answered UNIMPLEMENTED with what
# to do instead. Left out of the proto, they got gRPC's bare "Method not found!" (a Triton-migration audit).
NOT_OFFERED = {
    "SystemSharedMemoryStatus": _NO_SHARED_MEMORY,
    "SystemSharedMemoryRegister": _NO_SHARED_MEMORY,
    "SystemSharedMemoryUnregister": _NO_SHARED_MEMORY,
    "CudaSharedMemoryStatus": _NO_SHARED_MEMORY,
    "CudaSharedMemoryRegister": _NO_SHARED_MEMORY,
    "CudaSharedMemoryUnregister": _NO_SHARED_MEMORY,
    "TraceSetting": ("tracing is not offered; the kernel's per-request timings are in ModelStatistics (queue, "
                     "compute input/infer/output) and the decision's phase timings (Decision.phase_timings_ns)"),
    "LogSettings": ("log settings cannot be read or changed at run time; the log level is set at start by "
                    "log_level in kernel.toml (env AIOS_LOG_LEVEL, serve --log-level): DEBUG, INFO, WARNING "
                    "or ERROR"),
}


def not_offered(rpc: str):
    """The behaviour of an RPC in NOT_OFFERED: UNIMPLEMENTED naming it and what to do instead."""
    message = f"{rpc}: {NOT_OFFERED[rpc]}"

    def refuse(request):
        raise Unimplemented(message)

    return refuse


# Clients such as perf_analyzer send "infinite" deadlines (years away); beyond
# this horizon a deadline means "none" rather than a number to overflow on.
MAX_DEADLINE_S = MAX_DEADLINE_NS / 1e9


def deadline_from(time_remaining: float | None, timeout_us: int = 0, arrived_ns: int | None = None) -> int:
    """Absolute monotonic deadline (ns) from a gRPC time-remaining and Triton's ``timeout`` (µs): see deadlines.py."""
    now = time.monotonic_ns()
    call_deadline = None if time_remaining is None or time_remaining >= MAX_DEADLINE_S else now + int(time_remaining * 1e9)
    return request_deadline(now, call_deadline, timeout_us * 1000, arrived_ns)


class InferenceService:
    __slots__ = ("hub", "lanes", "expiry", "ready", "refusals", "payload")

    def __init__(self, hub: ModelHub, lanes: Lanes):
        self.hub = hub
        self.lanes = lanes
        # What ServerReady answers: a model loaded here; the server sets its own rule, gRPC health's (KernelServer.ready:
        # draining, or the audit log or the store failed, is not ready either).
        self.ready = lambda: bool(hub.loaded())
        # Expires queued items at their deadline for callers that do not wait on them (calls answered
        # later); its thread starts with the first deadline. The server closes it.
        self.expiry = ExpiryTimer(self.expire)
        # Calls answered with an error, every service's (the metrics endpoint's aios_calls_failed_total).
        self.refusals = CallRefusals()
        # The bytes of large requests held across calls (payload_budget.py): set by the server from
        # payload_budget_bytes before its front end is built; None: not counted.
        self.payload = None

    # -- lookup -------------------------------------------------------------
    def resolve(self, name: str, version: str, field: str = "model_name") -> ModelVersion:
        mv = self.hub.get(name, version)
        if mv is not None:
            return mv
        check_model_name(name, field)  # (before the repository is looked at for why it is not served)
        if version:
            number = requested_version(version)
            if number is None:  # Triton refuses a version it cannot read as an integer (INVALID_ARG)
                version_field = "model_version" if field == "model_name" else "version"
                raise InvalidArgument(f"{version_field} {quote(version)} is not a model version: a version is a "
                                      "whole number (e.g. '1'), or empty for the latest")
            version = number
        # In the repository but not served: the reason the kernel holds (UNAVAILABLE), as RepositoryIndex says.
        why = self.hub.unavailable_reason(name, version)
        versions = self.hub.versions(name)
        if why:
            which = f"model {quote(name)} version {quote(version)}" if versions else f"model {quote(name)}"
            raise Unavailable(f"{which} is not loaded: {why}")
        if versions:
            if not version and (mv := self.hub.get(name, version)) is not None:
                return mv  # a load finished since the first look: serve it (not "no loaded version ''; loaded: 1")
            raise NotFound(f"model {quote(name)} has no loaded version {quote(version)}; loaded versions: "
                           f"{', '.join(versions)}")
        loaded = sorted({m.name for m in self.hub.loaded()})
        raise NotFound(f"model {quote(name)} is not loaded; loaded models: {', '.join(loaded) or '(none)'}")

    # -- health and metadata ---------------------------------------------------
    def server_live(self, request) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    def server_ready(self, request) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.ready())

    def server_metadata(self, request) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=__version__, extensions=EXTENSIONS)

    def model_ready(self, request) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=self.hub.get(request.name, request.version) is not None)

    def model_metadata(self, request) -> pb.ModelMetadataResponse:
        mv = self.resolve(request.name, request.version, "name")
        return converters.model_metadata(mv.name, self.hub.versions(mv.name), mv)

    def model_config(self, request) -> pb.ModelConfigResponse:
        return converters.model_config(self.resolve(request.name, request.version, "name"))

    def model_statistics(self, request) -> pb.ModelStatisticsResponse:
        if request.name and not request.version:  # every loaded version, as Triton answers
            chosen = self.hub.loaded_versions(request.name) or [self.resolve(request.name, "", "name")]
        elif request.name:
            chosen = [self.resolve(request.name, request.version, "name")]
        else:
            chosen = self.hub.loaded()
        response = pb.ModelStatisticsResponse()
        for mv in chosen:
            response.model_stats.append(converters.model_statistics(mv))
        return response

    # -- repository ---------------------------------------------------------------
    def repository_index(self, request) -> pb.RepositoryIndexResponse:
        _one_repository(request.repository_name)
        response = pb.RepositoryIndexResponse()
        for entry in self.hub.index():
            if request.ready and entry.state != "READY":
                continue
            response.models.add(name=entry.name, version=entry.version, state=entry.state, reason=entry.reason)
        return response

    def repository_model_load(self, request) -> pb.RepositoryModelLoadResponse:
        name = request.model_name
        check_model_name(name)
        _one_repository(request.repository_name)
        _refuse_load_parameters(request.parameters)
        if name not in self.hub.scan():
            raise NotFound(f"model {quote(name)} is not in the repository {self.hub.root}")
        not_served: dict[str, str] = {}  # (as this load left them: another may follow it at once)
        live: list[str] = []  # (the versions a failed load left serving, as it left them)
        try:
            loaded = self.hub.load(name, not_served, live)
        except ModelConfigError as exc:
            # The previous versions (if any) stay live; the caller learns why, and so does the operator.
            outcome = (f"the versions loaded before keep serving ({', '.join(live)})" if live
                       else "it is not served")
            log.warning("model %r was not loaded (RepositoryModelLoad): %s; %s", name, exc, outcome)
            # (Files valid in themselves that no longer fit a pipeline serving on the version: the kernel's state.)
            refusal = FailedPrecondition if isinstance(exc, ModelInUse) else InvalidArgument
            raise refusal(f"model {quote(name)} was not loaded: {exc}; {outcome}") from None
        # The versions that loaded serve, but a load that could not bring up every numbered version folder is
        # not an OK: Triton answers such a load with an error naming the version, and an operator deploying
        # version 3 with a damaged model.onnx was answered OK while requests went on to version 2 (a
        # lifecycle audit; the index said so, the answer did not).
        if not_served:
            serving = [mv.version for mv in loaded]  # (oldest first)
            which = (f"version {next(iter(not_served))} was" if len(not_served) == 1
                     else f"versions {', '.join(not_served)} were")
            why = "; ".join(not_served.values())
            outcome = (f"its other versions were loaded and serve ({', '.join(serving)}; a request without a "
                       f"version gets {serving[-1]})" if serving else "no version of it serves")
            log.warning("model %r: %s not loaded (RepositoryModelLoad): %s; %s", name, which, why, outcome)
            raise InvalidArgument(f"model {quote(name)} {which} not loaded: {why}; {outcome}")
        return pb.RepositoryModelLoadResponse()

    def repository_model_unload(self, request) -> pb.RepositoryModelUnloadResponse:
        name = request.model_name
        check_model_name(name)
        _one_repository(request.repository_name)
        # A model with nothing loaded is unloaded already: OK, as Triton answers (a clean-up script, or one
        # unloading each model the index lists, got NOT_FOUND for the UNAVAILABLE ones). A name the repository
        # does not hold is still NOT_FOUND, where Triton says OK: a typo is told.
        if not self.hub.unload(name) and name not in self.hub.scan():
            raise NotFound(f"model {quote(name)} is not in the repository {self.hub.root} (nor loaded)")
        return pb.RepositoryModelUnloadResponse()

    # -- inference ------------------------------------------------------------------
    def prepare(self, request, time_remaining: float | None, arrived_ns: int | None = None) -> WorkItem:
        """Validate ``request`` and turn it into a work item for the lane (``arrived_ns``: see deadline_from)."""
        if type(request) is Unparsable:
            ensure_parsed(request)
        # hub.get is the cheap lookup; resolve() only words the error when it misses.
        mv = self.hub.get(request.model_name, request.model_version) or self.resolve(
            request.model_name, request.model_version)
        if request.id:  # (echoed in the answer, logged with a model fault: kernel/limits.py)
            check_identifier(request.id, "id", MAX_REQUEST_ID_CHARS)
        config = mv.config
        inputs, rows, shape_key, decoded = tensors.decode_inputs(config, request)
        priority, timeout_us, tenant = config.priority, 0, ""
        parameters = request.parameters
        if parameters:
            priority, timeout_us, tenant = _schedule_params(parameters, priority, config.priority_levels)
            decoded += len(parameters) * tensors.PARAMETER_HELD
        if timeout_us == 0 and (time_remaining is None or time_remaining >= MAX_DEADLINE_S):
            deadline_ns = NO_DEADLINE  # the common case, without reading the clock
        else:
            try:
                deadline_ns = deadline_from(time_remaining, timeout_us, arrived_ns)
            except DeadlineExceeded:
                mv.stats.record_refused("expired_before_queue")
                raise
        # An empty request id stays empty: one is made only if an error needs it
        # (kernel.scheduling.execute.request_id_of), not for every call.
        item = WorkItem(mv, rows, shape_key, inputs, request_id=request.id, priority=priority,
                        deadline_ns=deadline_ns, tenant=tenant)
        if request.outputs:
            item.selected, held = tensors.requested_outputs(config, request)
            decoded += held
        if decoded:  # (typed contents, BYTES, parameters: not a raw request's fast path)
            item.decoded_bytes = decoded
        return item

    def respond(self, request, item: WorkItem) -> pb.ModelInferResponse:
        """The response for a finished item, or its error raised."""
        if item.error is not None:
            raise item.error
        outputs = item.outputs
        if outputs is None:  # a lane bug, not the caller's: say so instead of failing to encode
            raise Internal(f"request {request_id_of(item)} finished without a result")
        mv = item.model
        response = pb.ModelInferResponse(model_name=mv.name, model_version=mv.version, id=request.id)
        tensors.encode_outputs(mv.config, outputs, item.selected, response)
        return response

    def _lane(self, item: WorkItem):
        try:
            return self.lanes.for_model(item.model)
        except KeyError:  # unloaded between lookup and queueing
            raise Unavailable(f"model {item.model.name}/{item.model.version} is being unloaded") from None

    def submit(self, item: WorkItem, watch=None) -> None:
        """Queue ``item`` on its model's lane; ``item.on_done`` reports the outcome. If it is refused at
        admission, its ``watch`` (from ``watch_deadline``) goes: nothing to expire."""
        self._forget_if_refused(watch, self._lane(item).submit, item)

    def run_if_idle(self, item: WorkItem, max_ns: int, watch=None) -> bool:
        """Run ``item`` on this thread if its lane is idle and the batch is short (``Lane.run_if_idle``).
        If it is refused at admission, its ``watch`` (from ``watch_deadline``) goes: nothing to expire."""
        return self._forget_if_refused(watch, self._lane(item).run_if_idle, item, max_ns)

    def predicted_ns(self, item: WorkItem) -> int:
        """How long a batch of just ``item`` is predicted to run (0: not measured yet)."""
        return self._lane(item).predict(item.model, item.rows)

    def watch_deadline(self, item: WorkItem):
        """Have the expiry timer expire ``item`` at its deadline (for callers that do not wait on it);
        the watch to ``expiry.forget`` once answered, or None without a deadline."""
        return None if item.deadline_ns == NO_DEADLINE else self.expiry.watch(item, item.deadline_ns)

    def run_or_queue(self, item: WorkItem, watch=None) -> bool:
        """Queue ``item``; run the next batch on this thread if a slot is free (``Lane.run_or_queue``).
        If it is refused at admission, its ``watch`` (from ``watch_deadline``) goes: nothing to expire."""
        return self._forget_if_refused(watch, self._lane(item).run_or_queue, item)

    def _forget_if_refused(self, watch, queue, *args) -> bool:
        try:
            return queue(*args)
        except BaseException:
            if watch is not None:
                self.expiry.forget(watch)
            raise

    def cancel(self, item: WorkItem) -> bool:
        try:
            return self.lanes.for_model(item.model).cancel(item)
        except KeyError:
            return False

    def expire(self, item: WorkItem) -> bool:
        try:
            return self.lanes.for_model(item.model).expire(item)
        except KeyError:
            return False

    def run_blocking(self, item: WorkItem, on_wait=None) -> None:
        """Queue ``item`` and return once it is finished (this thread may run batches itself)."""
        self._lane(item).run_blocking(item, on_wait)

    def answer(self, request, item: WorkItem) -> pb.ModelInferResponse:
        """``respond``, unless the deadline passed meanwhile: the lane checked it when the batch
        finished, but under load the caller may wait a while for the GIL after that. Never hand
        gRPC an answer that is already late."""
        response = self.respond(request, item)
        deadline = item.deadline_ns
        if deadline != NO_DEADLINE:
            now = time.monotonic_ns()
            if now > deadline:
                item.model.stats.record_answered_late(item, now)  # (counted a success when its batch ended)
                raise DeadlineExceeded(f"the answer was ready {(now - deadline) / 1e6:.1f} ms after the request's deadline")
        return response


def check_model_name(name: str, field: str = "model_name") -> None:
    """INVALID_ARGUMENT for a name no model folder can have (empty, over MAX_MODEL_NAME_BYTES, with '/' or
    NUL), before anything looks for it on disk: the file system's own refusal (``OSError: File name too
    long``) was an INTERNAL with a traceback that logged the whole name."""
    if not name:
        raise InvalidArgument(f"{field} is empty")
    size = len(name.encode("utf-8")) if len(name) * 4 > MAX_MODEL_NAME_BYTES else 0
    if size > MAX_MODEL_NAME_BYTES:
        raise InvalidArgument(f"{field} {quote(name)} is {size} bytes; a model name is a folder name in the "
                              f"repository, at most {MAX_MODEL_NAME_BYTES} bytes (UTF-8)")
    if "/" in name or "\x00" in name:
        raise InvalidArgument(f"{field} {quote(name)} cannot name a model: a model name is a folder name in the "
                              "repository, without '/' or NUL")


def _one_repository(name: str) -> None:
    """The kernel serves one repository: a named one is refused, as Triton refuses it (a client written for
    several repositories was told it had loaded, unloaded or listed the one it named)."""
    if name:
        raise Unimplemented(f"repository_name {quote(name)}: this kernel serves one model repository; leave "
                            "repository_name empty")


def _refuse_load_parameters(parameters) -> None:
    """Triton's load overrides (``config``: a JSON model config; ``file:<path>``: a model file's bytes) would
    be applied without a trace in the repository: refused, naming every one sent (only the first was named,
    so a caller that dropped it was refused again for the next), with where such a change goes instead."""
    if not parameters:
        return
    keys = sorted(parameters)
    advice = {}  # what to do instead, per kind of parameter sent (in the order of their first key)
    for key in keys:
        if key == "config":
            advice.setdefault("config", "edit the version's model.toml")
        elif key.startswith("file:"):
            advice.setdefault("file:<path>", "put the model's files in its repository folder "
                                             "(<name>/<version>/model.onnx)")
        else:
            advice.setdefault("others", "RepositoryModelLoad takes no parameters")
    named = ", ".join(quote(key) for key in keys[:10]) + (f" and {len(keys) - 10} more" if len(keys) > 10 else "")
    if len(keys) == 1:
        raise InvalidArgument(f"RepositoryModelLoad parameter {named} is not supported: {advice.popitem()[1]}")
    why = "; ".join(f"{kind}: {text}" for kind, text in advice.items())
    raise InvalidArgument(f"RepositoryModelLoad parameters {named} are not supported ({why})")


def _schedule_params(parameters, priority: int, levels: int) -> tuple[int, int, str]:
    """Triton's schedule-policy parameters ``priority`` (1 = highest) and ``timeout`` (µs), and our ``tenant``.

    ``priority`` is the model's default, used for a requested priority of 0 or above ``levels``: Triton does
    the same (InferenceRequest::SetPriority), where clamping would put such a request behind everything."""
    timeout_us, tenant = 0, ""
    if "priority" in parameters:
        value = parameters["priority"]
        kind = value.WhichOneof("parameter_choice")
        if kind not in ("int64_param", "uint64_param") or getattr(value, kind) < 0:
            raise InvalidArgument("parameter 'priority' must be a non-negative integer (1 = most urgent, 0 = model default)")
        requested = getattr(value, kind)
        if 1 <= requested <= levels:
            priority = requested
    if "timeout" in parameters:
        value = parameters["timeout"]
        kind = value.WhichOneof("parameter_choice")
        if kind not in ("int64_param", "uint64_param") or getattr(value, kind) < 0:
            raise InvalidArgument("parameter 'timeout' must be a non-negative integer number of microseconds")
        timeout_us = getattr(value, kind)
    if "tenant" in parameters:
        value = parameters["tenant"]
        if value.WhichOneof("parameter_choice") != "string_param":
            raise InvalidArgument("parameter 'tenant' must be a string")
        tenant = value.string_param
        check_identifier(tenant, "parameter 'tenant'", MAX_TENANT_CHARS)
    return priority, timeout_us, tenant

