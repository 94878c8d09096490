"""The open-loop generator: sends each request of a precomputed schedule at its scheduled time over one
grpc.aio channel, or one per stream with ``--channel-per-stream`` (closed-loop workers share the loop),
records per-request send/done/status, and measures its own core, the server's CPU and the kernel's
scheduler counters over the run."""

from __future__ import annotations

import asyncio
import os
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import grpc.aio
import numpy as np

from bench import procs
from bench.openloop.codes import ERROR_DETAILS, INTERNAL, OK, OTHER, PENDING, UNAVAILABLE, classify_error
from bench.openloop.streams import ClosedLoad, OpenLoad, Stream

INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"
LIST_MODELS_METHOD = "/aios.kernel.v1.AdminService/ListModels"
MODEL_STATISTICS_METHOD = "/inference.GRPCInferenceService/ModelStatistics"
MAX_REQUESTS_PER_RUN = 250_000


@dataclass
class Record:
    """Per-request results of one load (arrays of equal length)."""

    stream: str
    sched: np.ndarray  # s from the run's start (closed loop: the actual send)
    sent: np.ndarray
    done: np.ndarray
    code: np.ndarray
    retry_ms: np.ndarray

    def window(self, start: float, end: float) -> np.ndarray:
        return (self.sched >= start) & (self.sched < end)


@dataclass
class RunData:
    records: list[Record]
    window: tuple[float, float]
    client_cpu: float  # cores, over the window
    server_cpu: float | None
    cpu_busy: dict  # per-CPU busy cores over the window (all processes)
    counters: dict  # per-model ListModels counters, delta over the whole run
    wall_s: float
    drained: bool
    loop: str
    extra: dict = field(default_factory=dict)


def _per_cpu_busy() -> list[float]:
    """Busy CPU seconds per CPU since boot."""
    out = []
    tck = os.sysconf("SC_CLK_TCK")
    for line in Path("/proc/stat").read_text().splitlines()[1:]:
        if not line.startswith("cpu"):
            break
        f = [int(x) for x in line.split()[1:9]]
        out.append((f[0] + f[1] + f[2] + f[5] + f[6] + f[7]) / tck)
    return out


def _cpu_self() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def _list_models(channel) -> dict:
    from kernel._proto.aios.kernel.v1 import kernel_pb2 as kpb

    call = channel.unary_unary(LIST_MODELS_METHOD, request_serializer=kpb.ListModelsRequest.SerializeToString,
                               response_deserializer=kpb.ListModelsResponse.FromString)
    try:
        response = await call(kpb.ListModelsRequest(), timeout=5)
    except grpc.aio.AioRpcError:
        return {}
    out = {}
    for m in response.models:
        s = m.scheduler
        out[m.name] = {field.name: getattr(s, field.name) for field in s.DESCRIPTOR.fields}  # every counter
    # Time inside the kernel (queue + batch, from the scheduler's submit to the result) per model, from
    # Triton's ModelStatistics: what the scheduler controls, apart from gRPC and the Python front end.
    from kernel._proto.inference import grpc_service_pb2 as pb

    stats_call = channel.unary_unary(MODEL_STATISTICS_METHOD, request_serializer=pb.ModelStatisticsRequest.SerializeToString,
                                     response_deserializer=pb.ModelStatisticsResponse.FromString)
    try:
        stats = await stats_call(pb.ModelStatisticsRequest(), timeout=5)
    except grpc.aio.AioRpcError:
        return out
    for m in stats.model_stats:
        if m.name in out:
            success = m.inference_stats.success
            out[m.name].update(kernel_ok=success.count, kernel_ok_ns=success.ns, kernel_queue_ns=m.inference_stats.queue.ns)
    return out


_LEVELS = ("fit_ns_per_row", "fit_ns_fixed", "service_stretch")  # read as they are at the end, not as deltas


def _counter_delta(before: dict, after: dict) -> dict:
    out = {}
    for model, a in after.items():
        b = before.get(model, {})
        d = {k: (v - b.get(k, 0) if k not in _LEVELS else v) for k, v in a.items()}
        d["rows_per_batch"] = round(d["rows"] / d["batches"], 2) if d.get("batches") else None
        d["kernel_ms_per_request"] = (round(d["kernel_ok_ns"] / d["kernel_ok"] / 1e6, 3)
                                      if d.get("kernel_ok") else None)
        out[model] = d
    return out


def _channel(url: str, own_connection: bool = False):
    options = [("grpc.max_receive_message_length", 64 << 20)]
    if own_connection:  # channels to one target otherwise share one connection (the global subchannel pool)
        options.append(("grpc.use_local_subchannel_pool", 1))
    return grpc.aio.insecure_channel(url, options=options)


async def _drive(url: str, opens: list[OpenLoad], closeds: list[ClosedLoad], warmup_s: float, window_s: float,
                 server: procs.ServerProc | None, channel_per_stream: bool = False,
                 start_at: float | None = None) -> RunData:
    """``start_at``: the wall-clock instant (``time.time()``) the run starts, to line up with a run driven
    by another process (``closed_process``); default: now."""
    loop = asyncio.get_running_loop()
    channel = _channel(url)
    await asyncio.wait_for(channel.channel_ready(), 10)
    calls = {}
    own_channels = []

    async def open_channels() -> None:
        # A connection of its own per stream, as separate client services would have.
        for stream in [o.stream for o in opens] + [c.stream for c in closeds]:
            if stream.name not in calls:
                own = _channel(stream.url or url, own_connection=True)
                await asyncio.wait_for(own.channel_ready(), 10)
                own_channels.append(own)
                calls[stream.name] = own.unary_unary(INFER_METHOD, request_serializer=None, response_deserializer=None)

    if channel_per_stream or any(load.stream.url for load in [*opens, *closeds]):
        await open_channels()  # (a stream to another server needs a channel of its own)

    def multicallable(stream: Stream):
        if stream.name not in calls:
            calls[stream.name] = channel.unary_unary(INFER_METHOD, request_serializer=None,
                                                     response_deserializer=None)
        return calls[stream.name]

    # One schedule for all open loads, merged by time.
    n_total = sum(len(o.times) for o in opens)
    if n_total > MAX_REQUESTS_PER_RUN:
        raise ValueError(f"{n_total} requests in one run exceeds the bound {MAX_REQUESTS_PER_RUN}")
    if opens:
        all_t = np.concatenate([o.times for o in opens])
        all_k = np.concatenate([np.full(len(o.times), k, np.int32) for k, o in enumerate(opens)])
        all_j = np.concatenate([np.arange(len(o.times)) for o in opens])
        order = np.argsort(all_t, kind="stable")
        all_t, all_k, all_j = all_t[order].tolist(), all_k[order].tolist(), all_j[order].tolist()
    else:
        all_t, all_k, all_j = [], [], []
    recs = [dict(sent=np.full(len(o.times), np.nan), done=np.full(len(o.times), np.nan),
                 code=np.full(len(o.times), PENDING, np.int8), retry=np.full(len(o.times), np.nan)) for o in opens]
    end_s = warmup_s + window_s
    if all_t:
        end_s = max(end_s, all_t[-1])
    closed_out = [([], [], [], []) for _ in closeds]  # sent, done, code, retry
    counters0 = await _list_models(channel)

    t0 = time.perf_counter() + (0.05 if start_at is None else max(0.0, start_at - time.time()))
    probes = {}

    async def sample(tag: str, at: float) -> None:
        await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
        probes[tag] = (time.perf_counter(), _cpu_self(), server.cpu_seconds() if server else None, _per_cpu_busy())

    async def one(rec: dict, j: int, mc, stream: Stream) -> None:
        try:
            await mc(stream.data, timeout=stream.grpc_timeout)
            code, retry = OK, np.nan
        except grpc.aio.AioRpcError as exc:
            code, retry = classify_error(exc)
        rec["done"][j] = time.perf_counter() - t0
        rec["code"][j] = code
        rec["retry"][j] = retry

    stop_closed = asyncio.Event()

    async def closed_worker(load: ClosedLoad, out) -> None:
        mc = multicallable(load.stream)
        await asyncio.sleep(max(0.0, t0 - time.perf_counter()))
        while not stop_closed.is_set():
            s = time.perf_counter() - t0
            try:
                await mc(load.stream.data, timeout=load.stream.grpc_timeout)
                code, retry = OK, np.nan
            except grpc.aio.AioRpcError as exc:
                code, retry = classify_error(exc)
                if code in (UNAVAILABLE, INTERNAL, OTHER):
                    await asyncio.sleep(0.001)  # do not spin on a broken server
            out[0].append(s)
            out[1].append(time.perf_counter() - t0)
            out[2].append(code)
            out[3].append(retry)

    samplers = [loop.create_task(sample("start", warmup_s)), loop.create_task(sample("end", warmup_s + window_s))]
    workers = [loop.create_task(closed_worker(c, closed_out[k])) for k, c in enumerate(closeds)
               for _ in range(c.concurrency)]
    pending: set = set()
    mcs = [multicallable(o.stream) for o in opens]
    streams = [o.stream for o in opens]
    i, n = 0, len(all_t)
    perf = time.perf_counter
    while i < n:
        now = perf() - t0
        while i < n and all_t[i] <= now:
            k, j = all_k[i], all_j[i]
            recs[k]["sent"][j] = perf() - t0
            task = loop.create_task(one(recs[k], j, mcs[k], streams[k]))
            pending.add(task)
            task.add_done_callback(pending.discard)
            i += 1
        if i < n:
            delay = all_t[i] - (perf() - t0)
            await asyncio.sleep(delay if delay > 0 else 0)
    # closed loads run until the window ends
    await asyncio.sleep(max(0.0, t0 + end_s - perf()))
    await asyncio.gather(*samplers)
    stop_closed.set()
    longest = max([o.stream.grpc_timeout for o in opens] + [c.stream.grpc_timeout for c in closeds] + [1.0])
    drained = True
    waiting = list(pending) + workers
    if waiting:
        _, still = await asyncio.wait(waiting, timeout=longest + 5.0)
        if still:
            drained = False
            for task in still:
                task.cancel()
            await asyncio.gather(*still, return_exceptions=True)
    wall = perf() - t0
    counters1 = await _list_models(channel)
    for own in own_channels:
        await own.close()
    await channel.close()

    records = [Record(o.stream.name, np.asarray(o.times, float), r["sent"], r["done"], r["code"], r["retry"])
               for o, r in zip(opens, recs)]
    for c, out in zip(closeds, closed_out):
        sent = np.asarray(out[0], float)
        records.append(Record(c.stream.name + "[closed]", sent.copy(), sent, np.asarray(out[1], float),
                              np.asarray(out[2], np.int8), np.asarray(out[3], float)))
    (ta, ca, sa, pa), (tb, cb, sb, pb) = probes["start"], probes["end"]
    dt_w = tb - ta
    return RunData(
        records=records, window=(warmup_s, warmup_s + window_s),
        client_cpu=(cb - ca) / dt_w,
        server_cpu=(sb - sa) / dt_w if sa is not None and sb is not None else None,
        cpu_busy={f"cpu{k}": round((b - a) / dt_w, 3) for k, (a, b) in enumerate(zip(pa, pb))},
        counters=_counter_delta(counters0, counters1), wall_s=wall, drained=drained, loop=type(loop).__module__,
        extra={"error_details": [{"status": k[0], "details": k[1], "count": v} for k, v in ERROR_DETAILS.items()]})


def drive(url: str, opens: list[OpenLoad], closeds: list[ClosedLoad] = (), warmup_s: float = 2.0,
          window_s: float = 10.0, server: procs.ServerProc | None = None, channel_per_stream: bool = False,
          closed_process: bool = False) -> RunData:
    """Run the loads against ``url`` on a fresh event loop (uvloop when installed).

    ``channel_per_stream``: each stream gets a connection of its own (default: all share one).
    ``closed_process``: the closed loads run in a process of their own (on the same cores), as a separate
    client service would, so that the open streams' answers do not wait behind the closed loads' in one
    event loop. Measured, it changes nothing beyond this machine's spread (bench/RESULTS.md, "Priority
    isolation: not the generator's event loop, not the handler threads").
    """
    if closed_process and closeds and opens:
        return _drive_with_closed_process(url, list(opens), list(closeds), warmup_s, window_s, server,
                                          channel_per_stream)
    return _run_loop(_drive(url, list(opens), list(closeds), warmup_s, window_s, server, channel_per_stream))


def _run_loop(coro) -> RunData:
    import gc

    ERROR_DETAILS.clear()
    # A collection of the older generations among tens of thousands of calls and tasks stalls the loop for
    # 10-25 ms (measured: the sends of a burst then fall that far behind); collect between runs instead.
    gc.collect()
    gc.disable()
    try:
        try:
            import uvloop
        except ImportError:
            return asyncio.run(coro)
        return uvloop.run(coro)
    finally:
        gc.enable()
        gc.collect()


def _closed_child(conn, url: str, closeds: list[ClosedLoad], warmup_s: float, window_s: float,
                  channel_per_stream: bool) -> None:
    """The closed loads' process: ready → wait for the start instant → drive → send the RunData back."""
    conn.send("ready")
    start_at = conn.recv()
    run = _run_loop(_drive(url, [], closeds, warmup_s, window_s, None, channel_per_stream, start_at))
    conn.send((run, dict(ERROR_DETAILS)))
    conn.close()


def _drive_with_closed_process(url, opens, closeds, warmup_s, window_s, server, channel_per_stream) -> RunData:
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")  # (never fork a process that has used gRPC)
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_closed_child, args=(child, url, closeds, warmup_s, window_s, channel_per_stream),
                       name="openloop-closed", daemon=True)
    proc.start()
    try:
        if not parent.poll(60) or parent.recv() != "ready":
            raise RuntimeError("the closed-loop load process did not start")
        start_at = time.time() + 0.5  # both connect first; then both start at this instant
        parent.send(start_at)
        run = _run_loop(_drive(url, opens, [], warmup_s, window_s, server, channel_per_stream, start_at))
        if not parent.poll(window_s + warmup_s + 120):
            raise RuntimeError("the closed-loop load process sent no result")
        closed_run, details = parent.recv()
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.kill()
    for key, count in details.items():
        ERROR_DETAILS[key] = ERROR_DETAILS.get(key, 0) + count
    run.records.extend(closed_run.records)
    run.client_cpu += closed_run.client_cpu
    run.drained = run.drained and closed_run.drained
    run.extra = {"error_details": [{"status": k[0], "details": k[1], "count": v} for k, v in ERROR_DETAILS.items()],
                 "closed_process": True}
    return run
