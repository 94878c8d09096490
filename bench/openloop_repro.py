"""Minimal reproductions of kernel misbehaviour found by ``bench/openloop/`` (see bench/RESULTS.md).

``python -m bench.openloop_repro lane``
    ``Lane.run_blocking`` returns an item that another thread is still running in a batch once the item's
    deadline passes (``_expire_locked`` is a no-op for a BATCHED item, and the loop ``break``s anyway). The
    gRPC front end then encodes ``item.outputs`` = None: ``TypeError: object of type 'NoneType' has no len()``
    in ``tensors.encode_outputs`` -> INTERNAL "internal error (request id ...)". Deterministic, in-process,
    reference scheduler, no server.

``python -m bench.openloop_repro timeout [--requests 400]``
    Starts ``python -m kernel serve`` (live tree, large_mlp, core 0) and sends a burst of requests carrying
    Triton's ``timeout`` parameter = 100 ms and no gRPC deadline: many come back OK well after 100 ms,
    because the kernel starts a request's deadline clock when a handler thread prepares it, not when the
    call arrives.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import threading
import time
from pathlib import Path


def lane() -> int:
    from kernel.scheduling.lane import Lane
    from kernel.scheduling.policy import ModelSchedule
    from kernel.scheduling.reference import ReferenceScheduler
    from kernel.scheduling.types import ITEM_BATCHED, PyWorkItem

    def execute(batch):  # a 50 ms model call
        time.sleep(0.05)
        for item in batch.items:
            item.outputs, item.error = ["out"], None
        return 50_000_000

    lane_ = Lane(ReferenceScheduler(), execute, slots=1)
    model = object()
    lane_.add_model(model, ModelSchedule(max_batch_size=2, max_queue_delay_ns=10_000_000))  # static 10 ms window
    b = PyWorkItem(model, 1, (), None, "b", deadline_ns=time.monotonic_ns() + 15_000_000)  # 15 ms deadline
    tb = threading.Thread(target=lane_.run_blocking, args=(b,))
    tb.start()
    time.sleep(0.003)
    a = PyWorkItem(model, 1, (), None, "a")  # fills the batch: thread A runs [b, a] for 50 ms
    ta = threading.Thread(target=lane_.run_blocking, args=(a,))
    ta.start()
    tb.join()
    state, outputs, error = b.state, b.outputs, b.error
    print(f"run_blocking(b) returned with b.state={state} (BATCHED={ITEM_BATCHED}: still running in A's batch), "
          f"outputs={outputs}, error={error!r}")
    ta.join()
    print(f"after A's batch: b.state={b.state}, outputs={b.outputs}, error={b.error!r}")
    bad = state == ITEM_BATCHED and outputs is None and error is None
    print("REPRODUCED" if bad else "not reproduced")
    return 1 if bad else 0


def timeout(requests: int) -> int:
    import grpc

    from bench import procs
    from bench.openloop import INFER_METHOD, build_repo, model_toml, payload

    os.sched_setaffinity(0, {1})
    out = Path(tempfile.mkdtemp(prefix="openloop-repro-"))
    repo = build_repo(out, "large", {"large_mlp": model_toml("large_mlp", 64)})
    server = procs.start_server("kernel", [procs.python(), "-m", "kernel", "serve", "--models", repo, "--port", "0",
                                           "--log-level", "WARNING"], procs.READY_KERNEL, out / "server.log", cpu="0")
    data = payload("large_mlp", timeout_us=100_000)  # Triton timeout parameter 100 ms; no gRPC deadline

    async def burst():
        async with grpc.aio.insecure_channel(server.url) as channel:
            call = channel.unary_unary(INFER_METHOD)

            async def one():
                t0 = time.perf_counter()
                try:
                    await call(data)
                    return "OK", time.perf_counter() - t0
                except grpc.aio.AioRpcError as exc:
                    return exc.code().name, time.perf_counter() - t0

            return await asyncio.gather(*[one() for _ in range(requests)])

    try:
        results = asyncio.run(burst())
    finally:
        server.stop()
    ok = [dt for code, dt in results if code == "OK"]
    late = [dt for dt in ok if dt > 0.1]
    codes = {c: sum(1 for x, _ in results if x == c) for c in sorted({c for c, _ in results})}
    print(f"{requests} requests with timeout=100 ms at once: {codes}; {len(late)} of {len(ok)} OK answers came after "
          f"100 ms (worst {max(late, default=0) * 1000:.0f} ms); server log {out / 'server.log'}")
    return 1 if late else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.openloop_repro", description=__doc__.splitlines()[0])
    parser.add_argument("case", choices=("lane", "timeout"))
    parser.add_argument("--requests", type=int, default=400)
    args = parser.parse_args(argv)
    return lane() if args.case == "lane" else timeout(args.requests)


if __name__ == "__main__":
    raise SystemExit(main())
