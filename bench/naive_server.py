"""The naive baseline server of ``/work/shared/PEERS.md``.

A grpc.aio (on uvloop unless ``--no-uvloop``) server of KServe v2 /
Triton's ``inference.GRPCInferenceService`` that runs onnxruntime inline in
the handler, one request at a time: no batching, no queue, no thread hop.
It uses tritonclient's generated protobuf modules, so it does not depend on
the kernel package and stays a fixed baseline while the kernel changes.

It implements what Triton's ``perf_analyzer`` and ``tritonclient.grpc`` need:
ServerLive, ServerReady, ServerMetadata, ModelReady, ModelMetadata,
ModelConfig (Triton ``ModelConfig`` with max_batch_size, inputs, outputs),
ModelStatistics (success count and time; the other fields zero) and
ModelInfer with ``raw_input_contents`` or typed contents. Outputs are always
returned as ``raw_output_contents``.

onnxruntime runs with intra_op_num_threads=1 and inter_op_num_threads=1, on
``--provider`` (default ``auto``: CUDA where onnxruntime offers it, as the
kernel's ``provider = "auto"`` does, so on a GPU machine both run on the GPU).

CLI::

    python -m bench.naive_server --model tiny_mlp.onnx --name tiny_mlp --port 8001 \
        [--max-batch-size 64] [--host 127.0.0.1] [--no-uvloop] [--provider auto|cpu|cuda]

Prints ``listening on HOST:PORT`` (flushed) once it accepts calls (``--port 0``
picks a free port and prints it) and stops cleanly on SIGTERM / SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
from dataclasses import dataclass

import grpc
import numpy as np
import onnxruntime as ort
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

MODEL_VERSION = "1"

# onnxruntime type string -> (KServe datatype, numpy dtype, Triton config type)
_ORT_TYPES = {
    "tensor(float)": ("FP32", np.float32, mc.TYPE_FP32),
    "tensor(float16)": ("FP16", np.float16, mc.TYPE_FP16),
    "tensor(double)": ("FP64", np.float64, mc.TYPE_FP64),
    "tensor(int8)": ("INT8", np.int8, mc.TYPE_INT8),
    "tensor(int16)": ("INT16", np.int16, mc.TYPE_INT16),
    "tensor(int32)": ("INT32", np.int32, mc.TYPE_INT32),
    "tensor(int64)": ("INT64", np.int64, mc.TYPE_INT64),
    "tensor(uint8)": ("UINT8", np.uint8, mc.TYPE_UINT8),
    "tensor(uint16)": ("UINT16", np.uint16, mc.TYPE_UINT16),
    "tensor(uint32)": ("UINT32", np.uint32, mc.TYPE_UINT32),
    "tensor(uint64)": ("UINT64", np.uint64, mc.TYPE_UINT64),
    "tensor(bool)": ("BOOL", np.bool_, mc.TYPE_BOOL),
}

# KServe datatype -> InferTensorContents field holding typed values
_CONTENTS_FIELD = {
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "BOOL": "bool_contents",
}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str  # KServe datatype, e.g. "FP32"
    dtype: type
    config_type: int
    shape: tuple[int, ...]  # full shape, -1 for dynamic dims (batch dim included)


def _tensor_specs(args) -> list[TensorSpec]:
    specs = []
    for arg in args:
        if arg.type not in _ORT_TYPES:
            raise ValueError(f"{arg.name}: unsupported onnxruntime type {arg.type}")
        datatype, dtype, config_type = _ORT_TYPES[arg.type]
        shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in arg.shape)
        specs.append(TensorSpec(arg.name, datatype, dtype, config_type, shape))
    return specs


CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"
PROVIDERS = ("auto", "cpu", "cuda")


def providers_for(preference: str) -> list:
    """onnxruntime providers for ``auto`` (CUDA first where offered), ``cpu`` or ``cuda``.

    CUDA with TF32 matrix products off, as the kernel runs it by default (``cuda_tf32 = false``): the
    same numerics on both sides of a comparison (TF32 differs from the CPU by up to ~2e-3 relative,
    ``python -m bench.gpu_probe``), and the same work."""
    available = ort.get_available_providers()
    if preference == "cuda" and CUDA not in available:
        raise SystemExit(f"naive_server: --provider cuda, but onnxruntime offers only {', '.join(available)}")
    if preference == "cpu" or CUDA not in available:
        return [CPU]
    return [(CUDA, {"use_tf32": "0"}), CPU]


class NaiveModel:
    """One onnxruntime session plus the metadata Triton clients ask for."""

    def __init__(self, path: str, name: str, max_batch_size: int = 64, provider: str = "auto"):
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(path, sess_options=options, providers=providers_for(provider))
        self.provider = self.session.get_providers()[0]
        self.name = name
        self.inputs = _tensor_specs(self.session.get_inputs())
        self.outputs = _tensor_specs(self.session.get_outputs())
        batchable = all(s.shape and s.shape[0] == -1 for s in self.inputs + self.outputs)
        self.max_batch_size = max_batch_size if batchable else 0
        self.input_by_name = {s.name: s for s in self.inputs}
        self.output_names = [s.name for s in self.outputs]
        self.output_by_name = {s.name: s for s in self.outputs}

    def config_dims(self, spec: TensorSpec) -> list[int]:
        return list(spec.shape[1:] if self.max_batch_size > 0 else spec.shape)

    def metadata(self) -> pb.ModelMetadataResponse:
        tm = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=self.name,
            versions=[MODEL_VERSION],
            platform="onnxruntime_onnx",
            inputs=[tm(name=s.name, datatype=s.datatype, shape=list(s.shape)) for s in self.inputs],
            outputs=[tm(name=s.name, datatype=s.datatype, shape=list(s.shape)) for s in self.outputs],
        )

    def config(self) -> mc.ModelConfig:
        return mc.ModelConfig(
            name=self.name,
            platform="onnxruntime_onnx",
            backend="onnxruntime",
            max_batch_size=self.max_batch_size,
            input=[mc.ModelInput(name=s.name, data_type=s.config_type, dims=self.config_dims(s)) for s in self.inputs],
            output=[mc.ModelOutput(name=s.name, data_type=s.config_type, dims=self.config_dims(s)) for s in self.outputs],
            instance_group=[mc.ModelInstanceGroup(count=1, kind=mc.ModelInstanceGroup.KIND_CPU)],
        )


class InvalidRequest(Exception):
    pass


class NaiveServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, model: NaiveModel):
        self.model = model
        self.success_count = 0
        self.inference_count = 0
        self.success_ns = 0
        self.fail_count = 0
        self.fail_ns = 0
        self.last_inference_ms = 0

    # --- health and metadata -------------------------------------------------
    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=True)

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name="aios-naive", version="0.1.0", extensions=["statistics"])

    async def _check_model(self, name: str, version: str, context) -> None:
        if name != self.model.name or version not in ("", MODEL_VERSION):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model '{name}' version '{version}'")

    async def ModelReady(self, request, context):
        ok = request.name == self.model.name and request.version in ("", MODEL_VERSION)
        return pb.ModelReadyResponse(ready=ok)

    async def ModelMetadata(self, request, context):
        await self._check_model(request.name, request.version, context)
        return self.model.metadata()

    async def ModelConfig(self, request, context):
        await self._check_model(request.name, request.version, context)
        return pb.ModelConfigResponse(config=self.model.config())

    async def ModelStatistics(self, request, context):
        if request.name and request.name != self.model.name:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model '{request.name}'")
        sd = pb.StatisticDuration
        stats = pb.ModelStatistics(
            name=self.model.name,
            version=MODEL_VERSION,
            last_inference=self.last_inference_ms,
            inference_count=self.inference_count,
            execution_count=self.success_count,
            inference_stats=pb.InferStatistics(
                success=sd(count=self.success_count, ns=self.success_ns),
                fail=sd(count=self.fail_count, ns=self.fail_ns),
                queue=sd(count=self.success_count, ns=0),
                compute_input=sd(count=self.success_count, ns=0),
                compute_infer=sd(count=self.success_count, ns=self.success_ns),
                compute_output=sd(count=self.success_count, ns=0),
            ),
        )
        return pb.ModelStatisticsResponse(model_stats=[stats])

    # --- inference -----------------------------------------------------------
    def _decode_inputs(self, request) -> dict[str, np.ndarray]:
        model = self.model
        raw = request.raw_input_contents
        if raw and len(raw) != len(request.inputs):
            raise InvalidRequest(f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs")
        feeds = {}
        for index, tensor in enumerate(request.inputs):
            spec = model.input_by_name.get(tensor.name)
            if spec is None:
                raise InvalidRequest(f"unexpected input '{tensor.name}'")
            if tensor.datatype != spec.datatype:
                raise InvalidRequest(f"input '{tensor.name}': datatype {tensor.datatype}, expected {spec.datatype}")
            shape = tuple(tensor.shape)
            if raw:
                array = np.frombuffer(raw[index], dtype=spec.dtype)
            else:
                field = _CONTENTS_FIELD.get(spec.datatype)
                if field is None:
                    raise InvalidRequest(f"input '{tensor.name}': {spec.datatype} needs raw_input_contents")
                array = np.asarray(getattr(tensor.contents, field), dtype=spec.dtype)
            try:
                feeds[tensor.name] = array.reshape(shape)
            except ValueError:
                raise InvalidRequest(f"input '{tensor.name}': {array.size} elements do not fit shape {list(shape)}") from None
            if model.max_batch_size and shape and shape[0] > model.max_batch_size:
                raise InvalidRequest(f"batch {shape[0]} exceeds max_batch_size {model.max_batch_size}")
        if len(feeds) != len(model.inputs):
            missing = sorted(set(model.input_by_name) - set(feeds))
            raise InvalidRequest(f"missing inputs {missing}")
        return feeds

    async def ModelInfer(self, request, context):
        start = time.perf_counter_ns()
        model = self.model
        if request.model_name != model.name or request.model_version not in ("", MODEL_VERSION):
            self.fail_count += 1
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model '{request.model_name}'")
        try:
            feeds = self._decode_inputs(request)
            if request.outputs:
                names = [o.name for o in request.outputs]
                unknown = [n for n in names if n not in model.output_by_name]
                if unknown:
                    raise InvalidRequest(f"unknown outputs {unknown}")
            else:
                names = model.output_names
            results = model.session.run(names, feeds)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a gRPC status
            self.fail_count += 1
            self.fail_ns += time.perf_counter_ns() - start
            code = grpc.StatusCode.INVALID_ARGUMENT if isinstance(exc, InvalidRequest) else grpc.StatusCode.INTERNAL
            await context.abort(code, str(exc))
        response = pb.ModelInferResponse(model_name=model.name, model_version=MODEL_VERSION, id=request.id)
        for name, value in zip(names, results):
            out = response.outputs.add()
            out.name = name
            out.datatype = model.output_by_name[name].datatype
            out.shape.extend(value.shape)
            response.raw_output_contents.append(value.tobytes())
        self.success_count += 1
        self.inference_count += int(request.inputs[0].shape[0]) if model.max_batch_size else 1
        self.success_ns += time.perf_counter_ns() - start
        self.last_inference_ms = int(time.time() * 1000)
        return response


async def serve(model_path: str, name: str, host: str, port: int, max_batch_size: int, ready_file=None,
                provider: str = "auto") -> None:
    model = NaiveModel(model_path, name, max_batch_size, provider)
    print(f"naive_server: {name} on {model.provider}", file=sys.stderr, flush=True)
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", -1),
            ("grpc.max_send_message_length", -1),
            ("grpc.so_reuseport", 0),
        ]
    )
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(NaiveServicer(model), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise SystemExit(f"naive_server: cannot bind {host}:{port}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"listening on {host}:{bound}", flush=True)
    await stop.wait()
    await server.stop(grace=1.0)
    print("naive_server: stopped", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.naive_server", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="path to an .onnx file")
    parser.add_argument("--name", required=True, help="model name served")
    parser.add_argument("--port", type=int, required=True, help="TCP port (0: pick a free one)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--uvloop", action=argparse.BooleanOptionalAction, default=True, help="run on uvloop (default on)")
    parser.add_argument("--provider", choices=PROVIDERS, default="auto",
                        help="onnxruntime provider (default auto: CUDA where offered, like the kernel)")
    args = parser.parse_args(argv)
    coro = serve(args.model, args.name, args.host, args.port, args.max_batch_size, provider=args.provider)
    if args.uvloop:
        import uvloop

        uvloop.run(coro)
    else:
        asyncio.run(coro)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
