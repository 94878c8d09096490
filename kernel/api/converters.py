"""Internal model descriptions → Open Inference Protocol / Triton messages."""

from __future__ import annotations

from .._proto.inference import grpc_service_pb2 as pb
from .._proto.inference import model_config_pb2 as mc
from ..models import ModelVersion
from ..models.stats import Duration

PLATFORM = "onnxruntime_onnx"
BACKEND = "onnxruntime"


def model_metadata(name: str, versions: list[str], mv: ModelVersion) -> pb.ModelMetadataResponse:
    config = mv.config
    response = pb.ModelMetadataResponse(name=name, versions=versions, platform=PLATFORM)
    for spec in config.inputs:
        response.inputs.add(name=spec.name, datatype=spec.datatype.name, shape=config.full_shape(spec))
    for spec in config.outputs:
        response.outputs.add(name=spec.name, datatype=spec.datatype.name, shape=config.full_shape(spec))
    return response


def model_config(mv: ModelVersion) -> pb.ModelConfigResponse:
    """Triton's ModelConfig: perf_analyzer reads max_batch_size, inputs and outputs from it."""
    config = mv.config
    out = mc.ModelConfig(
        name=mv.name,
        platform=PLATFORM,
        backend=BACKEND,
        max_batch_size=config.max_batch_size,
        default_model_filename="model.onnx",
    )
    out.version_policy.all.SetInParent()
    for spec in config.inputs:
        out.input.add(name=spec.name, data_type=mc.DataType.Value(spec.datatype.triton), dims=list(spec.dims))
    for spec in config.outputs:
        out.output.add(name=spec.name, data_type=mc.DataType.Value(spec.datatype.triton), dims=list(spec.dims))
    on_gpu = mv.runtime.provider.startswith("CUDA")
    group = out.instance_group.add(
        name=f"{mv.name}_0",
        count=config.instances,
        kind=mc.ModelInstanceGroup.KIND_GPU if on_gpu else mc.ModelInstanceGroup.KIND_CPU,
    )
    if on_gpu:
        group.gpus.append(0)
    if config.batching:
        batching = out.dynamic_batching
        batching.max_queue_delay_microseconds = config.max_queue_delay_us
        batching.preferred_batch_size.extend(config.preferred_batch_sizes)
        # What else schedules it, in Triton's fields: priorities, the default one, the queue bound.
        batching.priority_levels = config.priority_levels
        batching.default_priority_level = config.priority
        batching.default_queue_policy.max_queue_size = config.max_queue  # (per level, as in Triton)
        # A request's ``timeout`` parameter is honoured (queued past it: REJECT, never run), with no default.
        batching.default_queue_policy.allow_timeout_override = True
        out.parameters["max_tenant_queue"].string_value = str(config.max_tenant_queue)
        out.parameters["weight"].string_value = repr(config.weight)
        # A delay of 0 reads as "no wait" to a Triton user; here it means the adaptive batcher decides.
        out.parameters["batching"].string_value = "static" if config.max_queue_delay_us else "adaptive"
    out.parameters["execution_provider"].string_value = mv.runtime.provider
    if on_gpu:  # whether outputs can differ from the CPU's in the 4th digit (model.toml ``cuda_tf32``)
        out.parameters["cuda_tf32"].string_value = "true" if config.cuda_tf32 else "false"
    out.parameters["model_version"].string_value = mv.version
    card = config.card
    for key, value in (("owner", card.owner), ("intended_use", card.intended_use),
                       ("training_data", card.training_data), ("limitations", card.limitations)):
        if value:
            out.parameters[f"card.{key}"].string_value = value
    for key, value in card.metrics.items():
        out.parameters[f"card.metrics.{key}"].string_value = repr(value)
    for i, spec in enumerate(config.outputs):
        if spec.labels:
            out.parameters[f"labels.{spec.name}"].string_value = ",".join(spec.labels)
    return pb.ModelConfigResponse(config=out)


def _duration(target: pb.StatisticDuration, source: Duration) -> None:
    target.count = source.count
    target.ns = source.ns


def model_statistics(mv: ModelVersion) -> pb.ModelStatistics:
    stats = mv.stats
    with stats.lock:
        out = pb.ModelStatistics(
            name=mv.name,
            version=mv.version,
            last_inference=stats.last_inference_ms,
            inference_count=stats.inference_count,
            execution_count=stats.execution_count,
        )
        infer = out.inference_stats
        _duration(infer.success, stats.success)
        _duration(infer.fail, stats.fail)
        _duration(infer.queue, stats.queue)
        _duration(infer.compute_input, stats.compute.compute_input)
        _duration(infer.compute_infer, stats.compute.compute_infer)
        _duration(infer.compute_output, stats.compute.compute_output)
        for size in sorted(stats.batches):
            batch = out.batch_stats.add(batch_size=size)
            phases = stats.batches[size]
            _duration(batch.compute_input, phases.compute_input)
            _duration(batch.compute_infer, phases.compute_infer)
            _duration(batch.compute_output, phases.compute_output)
    return out
