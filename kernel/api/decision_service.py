"""DecisionService (Decide, DecideStream) and the pipeline admin RPCs over the decision engine."""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict

from .._proto.aios.kernel.v1 import kernel_pb2 as kpb
from ..origin import requested_by
from ..pipelines import DecisionEngine, PipelineRegistry
from ..scheduling.types import ITEM_QUEUED
from ..pipelines.stream import decide_stream
from . import answer_later
from .aio_wait import attach, wait_finished
from .payload_budget import StreamCharges


def pipeline_info(pipeline) -> kpb.PipelineInfo:
    policy = pipeline.policy
    return kpb.PipelineInfo(
        name=pipeline.name, version=pipeline.label, hash=pipeline.hash, model=pipeline.model,
        model_version=pipeline.bound_version,
        policy_name=policy.name, policy_version=str(policy.version), policy_hash=policy.hash,
        fields=[f.name for f in pipeline.fields],
    )


def decision_handlers(engine: DecisionEngine, registry: PipelineRegistry, budget=None, streams=None,
                      payload=None) -> dict:
    """``budget``: the threaded front end's CallBudget (priority reserve, and its stream cap); ``streams``: a
    StreamBudget capping open DecideStreams where there is no CallBudget (grpc.aio); ``payload``: the kernel's
    PayloadBudget, which a DecideStream's large requests hold until answered (Decide's: rpc.py)."""
    streams = budget if streams is None else streams
    # A Decide holds its handler thread until answered, like ModelInfer: under a flood the same budget
    # keeps the last threads for priority 1 (kernel/api/call_budget.py).
    admit = None if budget is None else budget.admit_item

    def decide(request, ctx):
        def on_wait(item) -> None:
            # Only a request still queued when its caller has to wait can be taken back from the queue
            # if the client leaves (one already run waits for its finisher: nothing to cancel there).
            if item.state == ITEM_QUEUED:
                ctx.on_done(lambda: engine.inference.cancel(item))

        later = answer_later.take("DecisionService.Decide")
        if later is not None:  # the finisher thread answers; this thread goes on to the next call
            return engine.decide_later(request, ctx.deadline_ns, later, arrived_ns=ctx.arrived_ns, admit=admit,
                                       on_queued=on_wait)
        return engine.decide(request, ctx.deadline_ns, on_wait=on_wait, arrived_ns=ctx.arrived_ns, admit=admit)

    async def decide_on_loop(request, ctx):
        """``decide`` for grpc.aio, on the event loop: the lane runs the model and the finisher decides, then
        a future wakes this call (``engine.decide`` blocks a thread instead; on grpc.aio that was a worker
        thread per call from asyncio's small default pool: 0.52x ModelInfer's throughput there)."""
        pending = engine.prepare(request, ctx.deadline_ns, arrived_ns=ctx.arrived_ns)
        if isinstance(pending, kpb.Decision):  # answered from the idempotency store
            return pending
        item = engine.finish_in_groups(pending)
        done = attach(item)
        try:
            engine.inference.submit(item)
        except BaseException:  # refused at admission: nothing queued, its idempotency key is free again
            engine.release(pending)
            raise
        try:
            await wait_finished(engine.inference, item, done)
        except asyncio.CancelledError:  # the caller left: a decision that never ran still frees its key
            engine.abandon(pending)
            raise
        item.owner = None  # finished: no reference cycle left (a cancelled call leaves it to the finisher)
        if pending.result is None:  # it never ran (expired in the queue): decided alone, off the loop
            return await asyncio.to_thread(engine.answer, pending)
        return engine.answer(pending)  # (the loop may have been busy since the finisher checked its deadline)

    decide.on_loop = decide_on_loop  # rpc.aio_handler awaits this instead of running ``decide`` on a thread

    def stream(requests, ctx):
        if streams is not None:  # (a pumped stream is admitted by the pump: stream_pump.py)
            streams.admit_stream()
            ctx.on_done(streams.stream_ended)  # its slot comes back when the call ends, however it ends
        charges = StreamCharges(payload, "DecideStream request")
        ctx.on_done(charges.close)  # what its requests still hold comes back when the call ends, however it ends
        return decide_stream(engine, requests, ctx, charges=charges)

    def upload(request, ctx):
        policy = request.policy_toml or None
        deadline_ns = ctx.deadline_ns
        # (An upload whose caller gave up while it waited or was validated must not be activated behind its back.)
        time_left = None if deadline_ns is None else (lambda: (deadline_ns - time.monotonic_ns()) / 1e9)
        warnings: list[str] = []
        with requested_by(f"UploadPipeline from {ctx.peer}"):  # (named on the change's audit record)
            info = pipeline_info(registry.put(request.pipeline_toml, policy, time_left=time_left, warnings=warnings))
        info.warnings.extend(warnings)
        return info

    def list_pipelines(request, ctx):
        response = kpb.ListPipelinesResponse(refused=registry.errors)
        for pipeline in registry.all():
            info = pipeline_info(pipeline)
            info.decisions.CopyFrom(kpb.DecisionCounters(**asdict(engine.tally.get(pipeline.name))))
            info.unavailable_reason = registry.unavailable_reason(pipeline)
            response.pipelines.append(info)
        return response

    return {
        ("DecisionService", "Decide"): decide,
        ("DecisionService", "DecideStream"): stream,
        ("AdminService", "UploadPipeline"): upload,
        ("AdminService", "ListPipelines"): list_pipelines,
    }
