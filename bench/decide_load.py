"""Closed-loop load for the decision benchmark: ``Decide`` or ``ModelInfer`` on the claims model.

Both send the same claims (``examples/claims`` synthetic cases): ``Decide``
as request fields, ``ModelInfer`` as the already-encoded feature row (so
the model call is identical and ``Decide``'s extra work — validation,
encoding, policy, review, audit — is what the ratio shows). ``concurrency``
coroutines on one grpc.aio channel each keep one call in flight
(``decide-stream``: each on a DecideStream of its own); ``decide-pipelined``
keeps ``concurrency`` decisions in flight on one DecideStream.

    python -m bench.decide_load --address HOST:PORT --mode decide --concurrency 16 --seconds 5

Prints one JSON line: completed calls, errors by code, throughput, p50/p99 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MODES = ("decide", "infer", "decide-stream", "decide-pipelined")


def _requests(mode: str, n: int = 1000, model: str = "claims_triage") -> list:
    from examples.claims import data, features
    from kernel._proto.inference import grpc_service_pb2 as pb
    from kernel.decision_client import make_request

    cases = data.generate_cases(n, seed=17)
    if mode.startswith("decide"):
        return [make_request("claims_triage", {k: c[k] for k in data.REQUEST_FIELDS}, tenant="bench") for c in cases]
    rows = features.encode(cases)
    out = []
    for i in range(n):
        request = pb.ModelInferRequest(model_name=model)
        request.inputs.add(name="features", datatype="FP32", shape=[1, rows.shape[1]])
        request.raw_input_contents.append(rows[i:i + 1].tobytes())
        out.append(request)
    return out


async def _run(address: str, mode: str, concurrency: int, seconds: float, warmup: float,
               model: str = "claims_triage") -> dict:
    import grpc

    from kernel._proto.aios.kernel.v1 import kernel_pb2_grpc as kgrpc
    from kernel._proto.inference import grpc_service_pb2_grpc as pb_grpc

    requests = _requests(mode, model=model)
    latencies: list[float] = []
    errors: dict[str, int] = {}
    state = {"measuring": False, "stop": False}
    async with grpc.aio.insecure_channel(address) as channel:
        if mode.startswith("decide"):
            stub = kgrpc.DecisionServiceStub(channel)
            call = stub.Decide
        else:
            call = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer

        async def unary(k: int) -> None:
            i = k
            while not state["stop"]:
                started = time.perf_counter()
                try:
                    await call(requests[i % len(requests)], timeout=30)
                except grpc.aio.AioRpcError as exc:
                    errors[exc.code().name] = errors.get(exc.code().name, 0) + 1
                    continue
                finally:
                    i += concurrency
                if state["measuring"]:
                    latencies.append(time.perf_counter() - started)

        async def streamed(k: int) -> None:
            # One stream per coroutine, one decision in flight on it at a time: closed loop, like unary.
            stream = stub.DecideStream()
            i = k
            while not state["stop"]:
                started = time.perf_counter()
                await stream.write(requests[i % len(requests)])
                answer = await stream.read()
                i += concurrency
                if answer.error_code:
                    errors[answer.error_code] = errors.get(answer.error_code, 0) + 1
                elif state["measuring"]:
                    latencies.append(time.perf_counter() - started)
            await stream.done_writing()

        async def pipelined() -> None:
            # One stream with `concurrency` decisions in flight on it: how a high-throughput caller uses
            # DecideStream (answers come in completion order, matched by request id).
            stream = stub.DecideStream()
            window = asyncio.Semaphore(concurrency)
            sent: dict[str, float] = {}

            async def write() -> None:
                seq = 0
                while not state["stop"]:
                    await window.acquire()
                    request = requests[seq % len(requests)]
                    request.request_id = f"p{seq}"  # (serialized by the write before the next one changes it)
                    sent[request.request_id] = time.perf_counter()
                    await stream.write(request)
                    seq += 1
                await stream.done_writing()

            writer = asyncio.create_task(write())
            while True:
                answer = await stream.read()
                if answer is grpc.aio.EOF:
                    break
                started = sent.pop(answer.request_id, None)
                window.release()
                if answer.error_code:
                    errors[answer.error_code] = errors.get(answer.error_code, 0) + 1
                elif state["measuring"] and started is not None:
                    latencies.append(time.perf_counter() - started)
            await writer

        if mode == "decide-pipelined":
            tasks = [asyncio.create_task(pipelined())]
        else:
            worker = streamed if mode == "decide-stream" else unary
            tasks = [asyncio.create_task(worker(k)) for k in range(concurrency)]
        await asyncio.sleep(warmup)
        state["measuring"] = True
        started, cpu_started = time.perf_counter(), time.process_time()
        await asyncio.sleep(seconds)
        state["measuring"] = False
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
        state["stop"] = True
        await asyncio.gather(*tasks, return_exceptions=True)
    lat = np.array(latencies) * 1e3 if latencies else np.array([float("nan")])
    return {
        "mode": mode, "concurrency": concurrency, "seconds": round(elapsed, 3), "completed": len(latencies),
        "throughput": len(latencies) / elapsed, "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)), "errors": errors,
        # Above ~0.9 the load generator, not the server, sets the pace: the point measures the client.
        "client_cpu": round(cpu / elapsed, 3),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.decide_load", description=__doc__.splitlines()[0])
    parser.add_argument("--address", required=True)
    parser.add_argument("--mode", choices=MODES, required=True)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--model", default="claims_triage", help="the model ModelInfer calls (Decide: the pipeline's)")
    args = parser.parse_args(argv)
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    print(json.dumps(runner(_run(args.address, args.mode, args.concurrency, args.seconds, args.warmup, args.model))),
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
