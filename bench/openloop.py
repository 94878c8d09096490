"""Open-loop load generator and three scheduler scenarios: bursty goodput, overload with deadlines, priority isolation.

Protocol (/work/shared/BENCHMARKING.md): every claim is a ratio measured in one command, the arms
alternating (A B A B ...), each server a *fresh* ``python -m kernel serve`` subprocess pinned to core 0
(``taskset -c 0``) and running a frozen snapshot of ``kernel/`` (``bench.frontends.snapshot_code``), the
generator pinned to core 1 (this process sets its own affinity). Loopback only.

The generator (``drive``) is open loop: one asyncio event loop (uvloop when installed) sends each request
of a precomputed schedule at its *scheduled* time, with as many in flight as the schedule implies, over one
grpc.aio channel with pre-serialised ``ModelInferRequest`` bytes (no protobuf work per request on the
client). Latency is measured from the scheduled send time, not the actual one, so a late client does not
hide queueing (coordinated omission). Per run it measures its own core (CPU time of this process over the
window) and its lag behind schedule, and warns when the core was > 90 % busy or when sends fell behind by
more than ``LAG_WARN_P99_MS`` (p99) / ``LAG_WARN_MAX_MS`` (max). The cyclic garbage collector is off during a
run (a collection among tens of thousands of calls stalled the loop 10-25 ms, enough to smear a burst).
Closed-loop workers (a fixed number of requests in flight) share the loop: they measure saturation
throughput and act as a saturating neighbour. Measured capacity of this client on one core: ~4k unary
calls/s (about 200-250 µs of client CPU per call), so scenarios keep the offered rate under ~3k/s.

Deadlines. A deadline is sent either as Triton's ``timeout`` parameter (µs) with a gRPC deadline
``GUARD_S`` later only as a guard, so that an OK answer arriving after the deadline is *visible* to the
client (``timeout``), or as the plain gRPC deadline (``grpc``), where a call the server did not answer in
time shows up as a *client-side* DEADLINE_EXCEEDED (details ``Deadline Exceeded``), told apart from the
kernel's own DEADLINE_EXCEEDED by its message. In ``grpc`` mode an "OK after the deadline" can only be the
client's timestamp taken late, and is reported as such. Every non-OK answer's status and message (numbers
masked) is counted per run.

Scenarios (``--scenario``):

1. ``bursty``: a Poisson trace (fixed seed) at ``--base-frac`` (0.4) of the saturation throughput C measured
   at the start, with bursts of ``--burst-factor`` (10) × base lasting ``--burst-ms`` (50) starting on
   average every ``--burst-gap-s`` (1.0) s, every request carrying the SLO (``--slo-ms``, 50) as its
   deadline (gRPC deadline by default, ``--bursty-deadline-via``), against large_mlp. Phase 1 screens
   adaptive batching (model.toml: max_batch_size 64, no window) and the static grid (max_batch_size
   {8,16,32,64} × max_queue_delay_us {500,2000,8000}) once each on the same trace; phase 2 runs adaptive and the two best static points alternately for ``--pairs``
   rounds. Goodput = OK answers within the SLO of their scheduled send time, per second. Ratio:
   adaptive / best static (median over rounds).
2. ``overload``: saturation throughput C (closed loop, ``--sat-concurrency`` in flight, no deadline), then
   Poisson at ``--overload-factor`` (2) × C with a ``--deadline-ms`` (100) deadline on every request, as the
   ``timeout`` parameter and as a gRPC deadline; rounds of [saturation, overload/timeout, overload/grpc],
   each arm on a fresh server. Requests carry ``--overload-rows`` (4) rows so that 2 × C stays within what
   the client sends on one core. Counts OK answers that arrived after their deadline (measured from the
   actual send; target 0), p99 of OK, goodput, refusals vs expiries. Ratio: overload goodput / saturation.
3. ``priority``: tiny_mlp at priority 1, Poisson ``--tiny-rps`` (200), with large_mlp on the same lane as
   neighbour: arms solo | closed-loop neighbour (``--neighbour-concurrency`` 32 in flight) at priority 2 |
   the same neighbour at priority 1 (control: what priority buys) | an open-loop neighbour at 1.5 × its
   closed-loop throughput with 1 s gRPC deadlines at priority 2. Ratio: tiny p99 with the priority-2
   neighbour / solo p99.

Output: a progress line per run, the tables, ``OUT/openloop-<UTC stamp>.json`` (per-run statistics,
machine facts, command) and ``.md``, per-run raw arrays in ``OUT/openloop-<stamp>-raw.npz``, server logs
in ``OUT/logs/openloop-<stamp>/``. Exit status 1 if a server failed, logged errors, or the kernel answered
OK after a deadline or with an unexpected status.

CLI::

    python -m bench.openloop [--quick] [--scenario bursty|overload|priority|all] [--seconds N] [--pairs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import re
import resource
import shlex
import signal
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import grpc.aio
import numpy as np

from bench import procs
from bench.frontends import busy_seconds, check_imports, machine_facts, server_env, snapshot_code, wait_idle
from bench.tiny_models import MODELS, write_model

REPO_ROOT = Path(__file__).resolve().parents[1]
INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"
LIST_MODELS_METHOD = "/aios.kernel.v1.AdminService/ListModels"
GUARD_S = 1.0  # gRPC deadline beyond the request's own deadline ("timeout" mode): only ends stuck calls
NO_DEADLINE_TIMEOUT_S = 30.0  # gRPC deadline of requests without a deadline
LAG_WARN_P99_MS = 2.0
LAG_WARN_MAX_MS = 10.0
CLIENT_CPU_WARN = 0.90
CLIENT_DEADLINE_DETAILS = "Deadline Exceeded"  # what the client's own gRPC says when its deadline passes
MAX_REQUESTS_PER_RUN = 250_000

# status codes as small ints in the per-request arrays
OK, REFUSED, EXPIRED, CLIENT_DEADLINE, CANCELLED, UNAVAILABLE, INTERNAL, OTHER, PENDING = range(9)
CODE_NAMES = ["OK", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED(kernel)", "DEADLINE_EXCEEDED(client)", "CANCELLED",
              "UNAVAILABLE", "INTERNAL", "OTHER", "NO_ANSWER"]
_GRPC_TO_CODE = {grpc.StatusCode.RESOURCE_EXHAUSTED: REFUSED, grpc.StatusCode.CANCELLED: CANCELLED,
                 grpc.StatusCode.UNAVAILABLE: UNAVAILABLE, grpc.StatusCode.INTERNAL: INTERNAL}

STATIC_BATCH = (8, 16, 32, 64)
STATIC_DELAY_US = (500, 2000, 8000)


# --------------------------------------------------------------------------- models, repositories, payloads
def model_toml(model: str, max_batch_size: int = 64, max_queue_delay_us: int = 0,
               preferred_batch_sizes: tuple[int, ...] = ()) -> str:
    widths = MODELS[model]
    lines = [f"max_batch_size = {max_batch_size}"]
    if max_queue_delay_us:
        lines.append(f"max_queue_delay_us = {max_queue_delay_us}")
    if preferred_batch_sizes:
        lines.append(f"preferred_batch_sizes = [{', '.join(map(str, preferred_batch_sizes))}]")
    lines += ["", "[[input]]", 'name = "INPUT0"', 'datatype = "FP32"', f"dims = [{widths[0]}]",
              "", "[[output]]", 'name = "OUTPUT0"', 'datatype = "FP32"', f"dims = [{widths[-1]}]", ""]
    return "\n".join(lines)


def build_repo(out: Path, name: str, models: dict[str, str]) -> Path:
    """``out/repos-openloop/<name>/<model>/1/{model.onnx,model.toml}``; ``models``: model -> toml text."""
    onnx_dir = out / "onnx"
    onnx_dir.mkdir(parents=True, exist_ok=True)
    root = out / "repos-openloop" / name
    for model, toml in models.items():
        src = write_model(model, onnx_dir)
        folder = root / model / "1"
        folder.mkdir(parents=True, exist_ok=True)
        dst = folder / "model.onnx"
        if not dst.exists() or dst.stat().st_size != src.stat().st_size:
            dst.unlink(missing_ok=True)
            try:
                os.link(src, dst)
            except OSError:
                dst.write_bytes(src.read_bytes())
        (folder / "model.toml").write_text(toml)
    return root


def payload(model: str, rows: int = 1, priority: int | None = None, timeout_us: int | None = None,
            seed: int = 0) -> bytes:
    """A serialised ModelInferRequest for ``model`` (FP32 INPUT0 [rows, width])."""
    from kernel._proto.inference import grpc_service_pb2 as pb

    width = MODELS[model][0]
    request = pb.ModelInferRequest(model_name=model)
    tensor = request.inputs.add()
    tensor.name, tensor.datatype = "INPUT0", "FP32"
    tensor.shape.extend([rows, width])
    request.raw_input_contents.append(
        np.random.default_rng(seed).standard_normal((rows, width), dtype=np.float32).tobytes())
    if priority is not None:
        request.parameters["priority"].int64_param = priority
    if timeout_us is not None:
        request.parameters["timeout"].int64_param = timeout_us
    return request.SerializeToString()


# --------------------------------------------------------------------------- traces
def poisson(rng: np.random.Generator, rate: float, start: float, end: float) -> np.ndarray:
    """Arrival times of a Poisson process of ``rate``/s on [start, end)."""
    if rate <= 0 or end <= start:
        return np.empty(0)
    n = rng.poisson(rate * (end - start))
    return np.sort(rng.uniform(start, end, n))


def bursty_trace(seed: int, base_rps: float, factor: float, burst_s: float, gap_s: float, warmup_s: float,
                 window_s: float) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """Poisson at ``base_rps`` over warm-up + window, plus bursts (window only) in which the rate is
    ``factor`` × base: burst starts are ``burst_s`` + Exp(``gap_s``) apart. Returns (times, bursts)."""
    rng = np.random.default_rng(seed)
    end = warmup_s + window_s
    bursts = []
    t = warmup_s + rng.exponential(gap_s)
    while t + burst_s <= end:
        bursts.append((t, t + burst_s))
        t += burst_s + rng.exponential(gap_s)
    parts = [poisson(rng, base_rps, 0.0, end)]
    parts += [poisson(rng, (factor - 1) * base_rps, a, b) for a, b in bursts]
    return np.sort(np.concatenate(parts)), bursts


# --------------------------------------------------------------------------- the generator
@dataclass
class Stream:
    """One kind of request: a model, pre-serialised bytes, a deadline (None = none) and how it is sent."""

    name: str
    model: str
    data: bytes
    deadline_s: float | None = None
    deadline_via: str = "timeout"  # "timeout": Triton parameter (+ GUARD_S gRPC guard); "grpc": gRPC deadline

    @property
    def grpc_timeout(self) -> float:
        if self.deadline_s is None:
            return NO_DEADLINE_TIMEOUT_S
        return self.deadline_s + (GUARD_S if self.deadline_via == "timeout" else 0.0)


def make_stream(name: str, model: str, *, priority: int | None = None, deadline_ms: float | None = None,
                deadline_via: str = "timeout", rows: int = 1) -> Stream:
    deadline_s = deadline_ms / 1000 if deadline_ms else None
    timeout_us = int(deadline_ms * 1000) if deadline_ms and deadline_via == "timeout" else None
    return Stream(name, model, payload(model, rows, priority, timeout_us), deadline_s, deadline_via)


@dataclass
class OpenLoad:
    stream: Stream
    times: np.ndarray  # scheduled send offsets (s) from the run's start


@dataclass
class ClosedLoad:
    stream: Stream
    concurrency: int


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


_DETAILS: dict = {}  # (status, details with numbers masked) -> count: what the non-OK answers said


def _status(exc: grpc.aio.AioRpcError) -> tuple[int, float]:
    code = exc.code()
    key = (code.name, re.sub(r"[0-9a-f]{16}|\d+(\.\d+)?", "N", exc.details() or "")[:160])
    if key not in _DETAILS and len(_DETAILS) >= 40:
        key = (code.name, "(other details)")
    _DETAILS[key] = _DETAILS.get(key, 0) + 1
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return (CLIENT_DEADLINE if (exc.details() or "") == CLIENT_DEADLINE_DETAILS else EXPIRED), np.nan
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        retry = np.nan
        for key, value in exc.trailing_metadata() or ():
            if key == "retry-after-ms":
                try:
                    retry = float(value)
                except ValueError:
                    pass
        return REFUSED, retry
    return _GRPC_TO_CODE.get(code, OTHER), np.nan


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
        out[m.name] = {k: getattr(s, k) for k in ("submitted", "rejected_queue_full", "rejected_tenant_full",
                                                   "rejected_deadline", "expired", "cancelled", "batches", "rows",
                                                   "fit_ns_per_row", "fit_ns_fixed")}
    return out


def _counter_delta(before: dict, after: dict) -> dict:
    out = {}
    for model, a in after.items():
        b = before.get(model, {})
        d = {k: (v - b.get(k, 0) if not k.startswith("fit_") else v) for k, v in a.items()}
        d["rows_per_batch"] = round(d["rows"] / d["batches"], 2) if d.get("batches") else None
        out[model] = d
    return out


async def _drive(url: str, opens: list[OpenLoad], closeds: list[ClosedLoad], warmup_s: float, window_s: float,
                 server: procs.ServerProc | None) -> RunData:
    loop = asyncio.get_running_loop()
    channel = grpc.aio.insecure_channel(url, options=[("grpc.max_receive_message_length", 64 << 20)])
    await asyncio.wait_for(channel.channel_ready(), 10)
    calls = {}

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

    t0 = time.perf_counter() + 0.05
    probes = {}

    async def sample(tag: str, at: float) -> None:
        await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
        probes[tag] = (time.perf_counter(), _cpu_self(), server.cpu_seconds() if server else None, _per_cpu_busy())

    async def one(rec: dict, j: int, mc, stream: Stream) -> None:
        try:
            await mc(stream.data, timeout=stream.grpc_timeout)
            code, retry = OK, np.nan
        except grpc.aio.AioRpcError as exc:
            code, retry = _status(exc)
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
                code, retry = _status(exc)
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
        extra={"error_details": [{"status": k[0], "details": k[1], "count": v} for k, v in _DETAILS.items()]})


def drive(url: str, opens: list[OpenLoad], closeds: list[ClosedLoad] = (), warmup_s: float = 2.0,
          window_s: float = 10.0, server: procs.ServerProc | None = None) -> RunData:
    """Run the loads against ``url`` on a fresh event loop (uvloop when installed)."""
    import gc

    _DETAILS.clear()
    coro = _drive(url, list(opens), list(closeds), warmup_s, window_s, server)
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


# --------------------------------------------------------------------------- statistics
def pct(values: np.ndarray, q: float) -> float | None:
    """Nearest-rank percentile (the value below which q % of the samples lie), None without samples."""
    if len(values) == 0:
        return None
    s = np.sort(values)
    rank = max(1, int(np.ceil(q / 100 * len(s))))
    return float(s[rank - 1])


def latency_stats(lat_s: np.ndarray) -> dict:
    ms = lat_s * 1000
    return {"n": int(len(ms)), "p50_ms": pct(ms, 50), "p90_ms": pct(ms, 90), "p99_ms": pct(ms, 99),
            "p999_ms": pct(ms, 99.9), "max_ms": float(ms.max()) if len(ms) else None}


def record_stats(rec: Record, window: tuple[float, float], slo_s: float | None, deadline_s: float | None,
                 deadline_via: str = "timeout") -> dict:
    """Statistics of the requests of ``rec`` scheduled in ``window``."""
    w0, w1 = window
    span = w1 - w0
    m = rec.window(w0, w1)
    code = rec.code[m]
    sched, sent, done = rec.sched[m], rec.sent[m], rec.done[m]
    ok = code == OK
    lat_sched = done - sched  # from the scheduled send time
    lat_sent = done - sent  # from the actual send time
    lag = (sent - sched) * 1000
    out = {
        "stream": rec.stream, "requests": int(m.sum()), "offered_rps": float(m.sum()) / span,
        "codes": {CODE_NAMES[c]: int((code == c).sum()) for c in range(len(CODE_NAMES)) if (code == c).any()},
        "ok": int(ok.sum()), "throughput_rps": float(ok.sum()) / span,
        "latency_ok": latency_stats(lat_sched[ok]),
        "latency_ok_from_send": latency_stats(lat_sent[ok]),
        "refused": int((code == REFUSED).sum()), "expired": int((code == EXPIRED).sum()),
        "client_deadline": int((code == CLIENT_DEADLINE).sum()),
        "cancelled": int((code == CANCELLED).sum()),  # we never cancel: the server's side of a passed gRPC deadline
        "errors": int(np.isin(code, [UNAVAILABLE, INTERNAL, OTHER, PENDING]).sum()),
        "lag_ms": {"p50": pct(lag, 50), "p99": pct(lag, 99), "max": float(lag.max()) if len(lag) else None,
                   "late_over_5ms": int((lag > 5).sum())},
    }
    retry = rec.retry_ms[m][code == REFUSED]
    retry = retry[~np.isnan(retry)]
    if len(retry):
        out["retry_after_ms"] = {"p50": pct(retry, 50), "p90": pct(retry, 90), "max": float(retry.max())}
    if slo_s is not None:
        good = ok & (lat_sched <= slo_s)
        out["slo_ms"] = slo_s * 1000
        out["good"] = int(good.sum())
        out["goodput_rps"] = float(good.sum()) / span
    if deadline_s is not None:
        late = lat_sent[ok] - deadline_s
        out["deadline_ms"] = deadline_s * 1000
        out["deadline_via"] = deadline_via
        # With a gRPC deadline the client's own gRPC fails a call whose answer has not come by then, so an OK
        # "after the deadline" there is only the client's timestamp taken late (a busy loop), not the server.
        out["ok_after_deadline_kind"] = "server" if deadline_via == "timeout" else "client timestamp"
        out["ok_after_deadline"] = int((late > 0).sum())  # from the actual send: the server's side of it
        out["ok_after_deadline_plus_5ms"] = int((late > 0.005).sum())
        out["ok_after_deadline_max_over_ms"] = float(late.max() * 1000) if (late > 0).any() else 0.0
        out["ok_after_deadline_from_sched"] = int((lat_sched[ok] > deadline_s).sum())
    return out


def client_flags(run: RunData, stats: list[dict]) -> list[str]:
    flags = []
    if run.client_cpu > CLIENT_CPU_WARN:
        flags.append(f"client core saturated ({run.client_cpu:.2f} of core 1)")
    lags = [s["lag_ms"] for s in stats if s["requests"]]
    if lags:
        p99 = max(l["p99"] for l in lags)
        mx = max(l["max"] for l in lags)
        if p99 > LAG_WARN_P99_MS or mx > LAG_WARN_MAX_MS:
            flags.append(f"generator behind schedule (lag p99 {p99:.1f} ms, max {mx:.1f} ms)")
    if not run.drained:
        flags.append("some calls never finished (cancelled after the guard timeout)")
    return flags


# --------------------------------------------------------------------------- server runs
@dataclass
class Ctx:
    args: argparse.Namespace
    out: Path
    stamp: str
    code_root: Path | None
    logs: Path
    runs: list = field(default_factory=list)
    servers: list = field(default_factory=list)
    raw: dict = field(default_factory=dict)
    seq: int = 0


def start(ctx: Ctx, label: str, repo: Path) -> procs.ServerProc:
    args = ctx.args
    entry = {"label": label, "repo": str(repo)}
    ctx.servers.append(entry)
    if args.wait_idle > 0:
        entry["idle_wait_s"], entry["busy_before_start"] = wait_idle(args.wait_idle)
        if entry["busy_before_start"] >= 0.3:
            print(f"   note: machine busy ({entry['busy_before_start']:.2f} cores used by others) after "
                  f"{entry['idle_wait_s']:.0f} s; starting anyway", flush=True)
    argv = [procs.python(), "-m", "kernel", "serve", "--models", repo, "--port", "0", "--log-level", "WARNING",
            "--front-end", args.front_end]
    ctx.seq += 1
    log_path = ctx.logs / f"{ctx.seq:03d}-{label}.log"
    server = procs.start_server(label, argv, procs.READY_KERNEL, log_path, cpu=args.server_cpu,
                                cwd=ctx.code_root or REPO_ROOT, env=server_env(ctx.code_root))
    entry.update(command=shlex.join(map(str, server.command)), log=str(log_path))
    server._entry = entry  # noqa: SLF001 - bookkeeping for stop()
    return server


def stop(server: procs.ServerProc) -> dict:
    entry = server._entry  # noqa: SLF001
    entry["died_during_run"] = not server.alive()
    entry["exit_status"] = server.stop()
    entry["log_errors"] = server.error_lines()
    if entry["died_during_run"] or entry["exit_status"] != 0:
        print(f"!! server {entry['label']}: {'died during the run' if entry['died_during_run'] else 'exit status'} "
              f"{entry['exit_status']}", flush=True)
    if entry["log_errors"]:
        print(f"!! server {entry['label']} logged errors:", flush=True)
        for line in entry["log_errors"][:8]:
            print(f"     {line}", flush=True)
    return entry


def measure(ctx: Ctx, server: procs.ServerProc, scenario: str, arm: str, rnd: int, opens, closeds=(),
            slo_s=None, deadline_s=None, warmup_s=None, window_s=None, extra=None) -> dict:
    args = ctx.args
    warmup_s = args.warmup if warmup_s is None else warmup_s
    window_s = args.seconds if window_s is None else window_s
    run = drive(server.url, opens, closeds, warmup_s, window_s, server)
    via = {o.stream.name: o.stream.deadline_via for o in opens}
    stats = [record_stats(r, run.window, slo_s, deadline_s if not r.stream.endswith("[closed]") else None,
                          via.get(r.stream, "timeout")) for r in run.records]
    flags = client_flags(run, stats)
    cpu_server = run.cpu_busy.get(f"cpu{args.server_cpu}") if str(args.server_cpu).isdigit() else None
    cpu_client = run.cpu_busy.get(f"cpu{args.client_cpu}") if str(args.client_cpu).isdigit() else None
    result = {
        "scenario": scenario, "arm": arm, "round": rnd, "server": server._entry["label"],  # noqa: SLF001
        "window_s": window_s, "warmup_s": warmup_s, "streams": stats, "client_cpu": round(run.client_cpu, 3),
        "server_cpu": round(run.server_cpu, 3) if run.server_cpu is not None else None,
        "others_on_server_core": round(max(0.0, cpu_server - (run.server_cpu or 0)), 3) if cpu_server is not None else None,
        "others_on_client_core": round(max(0.0, cpu_client - run.client_cpu), 3) if cpu_client is not None else None,
        "cpu_busy": run.cpu_busy, "counters": run.counters, "wall_s": round(run.wall_s, 2), "drained": run.drained,
        "event_loop": run.loop, "client_flags": flags, **run.extra, **(extra or {}),
    }
    key = f"{len(ctx.runs):03d}-{scenario}-{arm}-r{rnd}"
    for r in run.records:
        for field_name in ("sched", "sent", "done", "code", "retry_ms"):
            ctx.raw[f"{key}/{r.stream}/{field_name}"] = getattr(r, field_name)
    ctx.runs.append(result)
    print(progress_line(result), flush=True)
    for flag in flags:
        print(f"   WARNING: {flag}", flush=True)
    return result


def progress_line(r: dict) -> str:
    parts = [f"{r['scenario']:8} r{r['round']} {r['arm']:22}"]
    for s in r["streams"]:
        lat = s["latency_ok"]
        p = f"{s['stream']}: offered {s['offered_rps']:6.0f}/s ok {s['throughput_rps']:6.0f}/s"
        if "goodput_rps" in s:
            p += f" good {s['goodput_rps']:6.0f}/s"
        if lat["n"]:
            p += f" p50 {lat['p50_ms']:.1f} p99 {lat['p99_ms']:.1f} ms"
        if s["refused"] or s["expired"] or s["client_deadline"] or s["cancelled"] or s["errors"]:
            p += (f" refused {s['refused']} expired {s['expired']} client-dl {s['client_deadline']} "
                  f"cancelled {s['cancelled']} err {s['errors']}")
        if s.get("ok_after_deadline"):
            p += (f" OK-LATE {s['ok_after_deadline']}" if s["ok_after_deadline_kind"] == "server"
                  else f" ok-late(client ts) {s['ok_after_deadline']}")
        parts.append(p)
    parts.append(f"client {r['client_cpu']:.2f} server {r['server_cpu'] or 0:.2f} cores")
    return " | ".join(parts)


def _stream(r: dict, name: str) -> dict:
    return next(s for s in r["streams"] if s["stream"] == name)


def measure_saturation(ctx: Ctx, server, model: str, rnd: int, scenario: str, window_s: float | None = None) -> float:
    stream = make_stream(f"{model}-sat", model)
    r = measure(ctx, server, scenario, "saturation(closed)", rnd, [],
                [ClosedLoad(stream, ctx.args.sat_concurrency)], window_s=window_s or ctx.args.sat_seconds)
    return _stream(r, f"{model}-sat[closed]")["throughput_rps"]


# --------------------------------------------------------------------------- scenarios
def scenario_bursty(ctx: Ctx) -> dict:
    args = ctx.args
    model = "large_mlp"
    adaptive = build_repo(ctx.out, "large-adaptive", {model: model_toml(model, 64)})
    grid = [(b, d) for b in args.grid_batch for d in args.grid_delay]
    static = {f"static-b{b}-d{d}": build_repo(ctx.out, f"large-b{b}-d{d}", {model: model_toml(model, b, d)})
              for b, d in grid}
    repos = {"adaptive": adaptive, **static}
    slo = args.slo_ms / 1000
    stream = make_stream("large", model, deadline_ms=args.slo_ms, deadline_via=args.bursty_deadline_via)

    server = start(ctx, "bursty-sat", adaptive)
    try:
        cap = measure_saturation(ctx, server, model, 0, "bursty")
    finally:
        stop(server)
    base = args.base_frac * cap
    times, bursts = bursty_trace(args.seed, base, args.burst_factor, args.burst_ms / 1000, args.burst_gap_s,
                                 args.warmup, args.seconds)
    in_window = times[times >= args.warmup]
    trace = {"capacity_rps": cap, "base_rps": base, "burst_rps": base * args.burst_factor, "bursts": len(bursts),
             "burst_ms": args.burst_ms, "mean_gap_s": args.burst_gap_s, "seed": args.seed,
             "requests": int(len(times)), "requests_in_window": int(len(in_window)),
             "mean_rps_in_window": len(in_window) / args.seconds, "slo_ms": args.slo_ms,
             "burst_requests_each": base * args.burst_factor * args.burst_ms / 1000}
    print(f"bursty: capacity {cap:.0f}/s -> base {base:.0f}/s, {len(bursts)} bursts of {args.burst_ms:.0f} ms at "
          f"{base * args.burst_factor:.0f}/s, {len(in_window)} requests in the {args.seconds:.0f} s window "
          f"(mean {len(in_window) / args.seconds:.0f}/s), SLO {args.slo_ms:.0f} ms", flush=True)

    def one(arm: str, rnd: int, phase: str) -> dict:
        server = start(ctx, f"bursty-{arm}-r{rnd}", repos[arm])
        try:
            return measure(ctx, server, "bursty", arm, rnd, [OpenLoad(stream, times)], slo_s=slo, deadline_s=slo,
                           extra={"phase": phase})
        finally:
            stop(server)

    # phase 1: screen every configuration once on the trace
    screen = {}
    for arm in ["adaptive", *static]:
        screen[arm] = _stream(one(arm, 0, "screen"), "large")["goodput_rps"]
    ranked = sorted(static, key=lambda a: screen[a], reverse=True)
    finalists = ranked[:args.finalists]
    print(f"bursty: screening goodput: adaptive {screen['adaptive']:.0f}/s; best static "
          + ", ".join(f"{a} {screen[a]:.0f}/s" for a in ranked[:4]), flush=True)
    # phase 2: adaptive vs the best static points, alternating
    for rnd in range(1, args.pairs + 1):
        for arm in ["adaptive", *finalists]:
            one(arm, rnd, "pairs")
    return {"trace": trace, "screen": screen, "finalists": finalists}


def scenario_overload(ctx: Ctx) -> dict:
    args = ctx.args
    model = "large_mlp"
    rows = args.overload_rows
    repo = build_repo(ctx.out, "large-adaptive", {model: model_toml(model, 64)})
    rate = times = None
    for rnd in range(1, args.pairs + 1):
        # every arm on a fresh server: calls left over from an overloaded arm must not load the next one
        server = start(ctx, f"overload-sat-r{rnd}", repo)
        try:
            sat = make_stream(f"{model}-sat", model, rows=rows)
            r = measure(ctx, server, "overload", "saturation(closed)", rnd, [],
                        [ClosedLoad(sat, args.sat_concurrency)], window_s=args.sat_seconds)
            cap = _stream(r, f"{model}-sat[closed]")["throughput_rps"]
        finally:
            stop(server)
        if rate is None:
            rate = args.overload_factor * cap
            times = poisson(np.random.default_rng(args.seed + 1), rate, 0.0, args.warmup + args.seconds)
            print(f"overload: saturation {cap:.0f} requests/s ({rows} rows each) -> offered {rate:.0f}/s "
                  f"({args.overload_factor:g}x) with {args.deadline_ms:.0f} ms deadlines, {len(times)} requests per run",
                  flush=True)
        for via in ("timeout", "grpc"):
            server = start(ctx, f"overload-{via}-r{rnd}", repo)
            try:
                stream = make_stream(f"large-{via}", model, deadline_ms=args.deadline_ms, deadline_via=via, rows=rows)
                measure(ctx, server, "overload", f"overload({via})", rnd, [OpenLoad(stream, times)],
                        slo_s=args.deadline_ms / 1000, deadline_s=args.deadline_ms / 1000,
                        extra={"offered_target_rps": rate, "saturation_rps_this_round": cap})
            finally:
                stop(server)
    return {"offered_rps": rate, "factor": args.overload_factor, "deadline_ms": args.deadline_ms, "rows": rows}


def scenario_priority(ctx: Ctx) -> dict:
    args = ctx.args
    repo = build_repo(ctx.out, "tiny-large", {"tiny_mlp": model_toml("tiny_mlp", 64),
                                              "large_mlp": model_toml("large_mlp", 64)})
    tiny = make_stream("tiny", "tiny_mlp", priority=1)
    tiny_times = poisson(np.random.default_rng(args.seed + 2), args.tiny_rps, 0.0, args.warmup + args.seconds)
    large_p2 = make_stream("large-p2", "large_mlp", priority=2)
    large_p1 = make_stream("large-p1", "large_mlp", priority=1)
    open_rate = None
    info = {"tiny_rps": args.tiny_rps, "neighbour_concurrency": args.neighbour_concurrency}
    for rnd in range(1, args.pairs + 1):
        server = start(ctx, f"priority-r{rnd}", repo)
        try:
            measure(ctx, server, "priority", "solo", rnd, [OpenLoad(tiny, tiny_times)])
            b = measure(ctx, server, "priority", "neighbour-p2(closed)", rnd, [OpenLoad(tiny, tiny_times)],
                        [ClosedLoad(large_p2, args.neighbour_concurrency)])
            if args.priority_control:
                measure(ctx, server, "priority", "neighbour-p1(closed)", rnd, [OpenLoad(tiny, tiny_times)],
                        [ClosedLoad(large_p1, args.neighbour_concurrency)])
            if args.open_neighbour:
                if open_rate is None:
                    open_rate = args.open_neighbour * _stream(b, "large-p2[closed]")["throughput_rps"]
                    info["open_neighbour_rps"] = open_rate
                large_open = make_stream("large-p2-open", "large_mlp", priority=2, deadline_ms=1000,
                                         deadline_via="grpc")
                times = poisson(np.random.default_rng(args.seed + 3), open_rate, 0.0, args.warmup + args.seconds)
                measure(ctx, server, "priority", "neighbour-p2(open)", rnd,
                        [OpenLoad(tiny, tiny_times), OpenLoad(large_open, times)], deadline_s=None)
        finally:
            stop(server)
    return info


# --------------------------------------------------------------------------- summary
def _spread(values: list[float]) -> dict | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def _f(s: dict | None, digits: int = 0) -> str:
    if not s:
        return "—"
    f = f"{{:,.{digits}f}}"
    if s["n"] == 1:
        return f.format(s["median"])
    return f"{f.format(s['median'])} ({f.format(s['min'])}–{f.format(s['max'])})"


def _n(v) -> str:
    return "—" if v is None else f"{v:,.1f}"


def summarise(ctx: Ctx, info: dict) -> tuple[dict, str]:
    runs = ctx.runs
    md: list[str] = []
    summary: dict = {}

    def arm_rows(scenario: str, stream: str, arms: list[str], phase: str | None = None) -> list[str]:
        rows = []
        for arm in arms:
            rs = [r for r in runs if r["scenario"] == scenario and r["arm"] == arm
                  and (phase is None or r.get("phase") == phase)]
            ss = [_stream(r, stream) for r in rs if any(s["stream"] == stream for s in r["streams"])]
            if not ss:
                continue
            med = lambda key: _spread([s.get(key) for s in ss])  # noqa: E731
            lat = lambda key: _spread([s["latency_ok"][key] for s in ss])  # noqa: E731
            counts = f"{sum(s['latency_ok']['n'] for s in ss):,} OK / {sum(s['requests'] for s in ss):,}"
            refused = sum(s["refused"] for s in ss)
            expired = sum(s["expired"] for s in ss)
            cdl = f"{sum(s['client_deadline'] for s in ss):,} / {sum(s['cancelled'] for s in ss):,}"
            errs = sum(s["errors"] for s in ss)
            late_n = sum(s.get("ok_after_deadline", 0) for s in ss)
            late = (f"{late_n:,}" if not ss[0].get("ok_after_deadline_kind") == "client timestamp"
                    else f"n/a ({late_n:,} client ts)")
            rpb = _spread([r["counters"].get(_model_of(stream), {}).get("rows_per_batch") for r in rs])
            flags = sum(1 for r in rs if r["client_flags"])
            rows.append(f"| {arm} | {len(ss)} | {_f(med('offered_rps'))} | {_f(med('throughput_rps'))} | "
                        f"{_f(med('goodput_rps')) if 'goodput_rps' in ss[0] else '—'} | {_f(lat('p50_ms'), 1)} | "
                        f"{_f(lat('p99_ms'), 1)} | {_f(lat('p999_ms'), 1)} | {_f(lat('max_ms'), 1)} | {counts} | "
                        f"{refused:,} | {expired:,} | {cdl} | {errs:,} | {late} | {_f(rpb, 1)} | "
                        f"{_f(_spread([r['client_cpu'] for r in rs]), 2)} | {flags} |")
        return rows

    header = ("| arm | runs | offered/s | OK/s | goodput/s | p50 ms | p99 ms | p99.9 ms | max ms | OK / sent (all runs) "
              "| refused | expired (kernel) | gRPC deadline passed (client DEADLINE_EXCEEDED / CANCELLED) | errors | OK after deadline | rows/batch "
              "| client cores | runs flagged |\n|---|---:|---|---|---|---|---|---|---|---|---:|---:|---:|---:|---:|---|---|---:|")

    if "bursty" in info:
        b = info["bursty"]
        t = b["trace"]
        md.append("### 1. Bursty goodput (large_mlp)\n")
        md.append(f"Trace: saturation C = {t['capacity_rps']:,.0f}/s (closed loop, {ctx.args.sat_concurrency} in flight); "
                  f"Poisson base {t['base_rps']:,.0f}/s ({ctx.args.base_frac:g}·C), {t['bursts']} bursts of "
                  f"{t['burst_ms']:.0f} ms at {t['burst_rps']:,.0f}/s (~{t['burst_requests_each']:.0f} requests each), "
                  f"{t['requests_in_window']:,} requests in the {ctx.args.seconds:g} s window (mean "
                  f"{t['mean_rps_in_window']:,.0f}/s), seed {t['seed']}; SLO = deadline = {t['slo_ms']:g} ms "
                  f"(sent as {'the gRPC deadline' if ctx.args.bursty_deadline_via == 'grpc' else 'the `timeout` parameter'}). "
                  "Latency from the scheduled send; percentiles of OK answers.\n")
        md.append("Screening (one run each, same trace):\n")
        md.append("| config | goodput/s |\n|---|---:|")
        for arm, g in sorted(b["screen"].items(), key=lambda kv: -kv[1]):
            md.append(f"| {arm} | {g:,.0f} |")
        md.append("")
        md.append(f"Alternating rounds (adaptive vs the {len(b['finalists'])} best static points), median (min–max):\n")
        md.append(header)
        md += arm_rows("bursty", "large", ["adaptive", *b["finalists"]], phase="pairs")
        ad = {r["round"]: _stream(r, "large")["goodput_rps"] for r in runs
              if r["scenario"] == "bursty" and r["arm"] == "adaptive" and r.get("phase") == "pairs"}
        ratios = {}
        for arm in b["finalists"]:
            st = {r["round"]: _stream(r, "large")["goodput_rps"] for r in runs
                  if r["scenario"] == "bursty" and r["arm"] == arm and r.get("phase") == "pairs"}
            common = sorted(set(ad) & set(st))
            if not common:
                continue
            ma, ms = statistics.median(ad[k] for k in common), statistics.median(st[k] for k in common)
            per = [ad[k] / st[k] for k in common if st[k]]
            ratios[arm] = {"ratio_of_medians": ma / ms if ms else None, "per_round": per,
                           "static_median_goodput": ms, "adaptive_median_goodput": ma}
        best = max(ratios, key=lambda a: ratios[a]["static_median_goodput"]) if ratios else None
        summary["bursty"] = {"ratios": ratios, "best_static": best, "target": 1.3}
        md.append("")
        for arm, r in ratios.items():
            pr = r["per_round"]
            md.append(f"- adaptive / {arm}: **{r['ratio_of_medians']:.2f}×** goodput (per round "
                      f"{min(pr):.2f}–{max(pr):.2f}){' ← best static' if arm == best else ''}")
        md.append("")

    if "overload" in info:
        o = info["overload"]
        md.append("### 2. Overload with deadlines (large_mlp)\n")
        md.append(f"Offered {o['offered_rps']:,.0f}/s Poisson = {o['factor']:g} × the saturation throughput of round 1; "
                  f"deadline {o['deadline_ms']:g} ms on every request, as Triton's `timeout` parameter (gRPC guard "
                  f"+{GUARD_S:g} s) or as the gRPC deadline. Goodput = OK within the deadline of the scheduled send. "
                  "\"OK after deadline\" = OK answers whose latency from the *actual* send exceeded the deadline.\n")
        md.append(header)
        md += arm_rows("overload", "large_mlp-sat[closed]", ["saturation(closed)"])
        md += arm_rows("overload", "large-timeout", ["overload(timeout)"])
        md += arm_rows("overload", "large-grpc", ["overload(grpc)"])
        sat = {r["round"]: _stream(r, "large_mlp-sat[closed]")["throughput_rps"] for r in runs
               if r["scenario"] == "overload" and r["arm"] == "saturation(closed)"}
        res = {}
        for via in ("timeout", "grpc"):
            ov = {r["round"]: _stream(r, f"large-{via}") for r in runs
                  if r["scenario"] == "overload" and r["arm"] == f"overload({via})"}
            common = sorted(set(sat) & set(ov))
            if not common:
                continue
            g = [ov[k]["goodput_rps"] for k in common]
            per = [ov[k]["goodput_rps"] / sat[k] for k in common if sat[k]]
            n_req = sum(ov[k]["requests"] for k in common)
            res[via] = {
                "goodput_over_saturation": statistics.median(g) / statistics.median(sat[k] for k in common),
                "per_round": per,
                "ok_after_deadline": sum(ov[k]["ok_after_deadline"] for k in common),
                "ok_after_deadline_plus_5ms": sum(ov[k]["ok_after_deadline_plus_5ms"] for k in common),
                "ok_after_deadline_max_over_ms": max(ov[k]["ok_after_deadline_max_over_ms"] for k in common),
                "ok": sum(ov[k]["ok"] for k in common),
                "p99_ok_ms": _spread([ov[k]["latency_ok"]["p99_ms"] for k in common]),
                "refused_share": sum(ov[k]["refused"] for k in common) / n_req if n_req else None,
                "expired_share": sum(ov[k]["expired"] for k in common) / n_req if n_req else None,
                "client_deadline_share": sum(ov[k]["client_deadline"] + ov[k]["cancelled"] for k in common) / n_req
                if n_req else None,
                "error_share": sum(ov[k]["errors"] for k in common) / n_req if n_req else None,
                "ok_share": sum(ov[k]["ok"] for k in common) / n_req if n_req else None,
            }
        summary["overload"] = res
        md.append("")
        md.append("| deadline via | goodput / saturation | per round | OK after deadline (> +5 ms; worst) | p99 of OK ms | "
                  "OK share | refused at admission | expired in queue (kernel) | no answer by the gRPC deadline | errors |")
        md.append("|---|---:|---|---|---|---:|---:|---:|---:|---:|")
        for via, r in res.items():
            pr = r["per_round"]
            late = (f"{r['ok_after_deadline']:,} of {r['ok']:,} ({r['ok_after_deadline_plus_5ms']:,}; "
                    f"{r['ok_after_deadline_max_over_ms']:.1f} ms)")
            if via == "grpc":
                late = f"n/a: gRPC enforces it on the client ({r['ok_after_deadline']:,} late client timestamps)"
            md.append(f"| {via} | **{r['goodput_over_saturation']:.2f}×** | {min(pr):.2f}–{max(pr):.2f} | "
                      f"{late} | {_f(r['p99_ok_ms'], 1)} | "
                      f"{r['ok_share']:.1%} | {r['refused_share']:.1%} | {r['expired_share']:.1%} | "
                      f"{r['client_deadline_share']:.1%} | {r['error_share']:.1%} |")
        md.append("")

    if "priority" in info:
        p = info["priority"]
        md.append("### 3. Priority isolation (tiny_mlp priority 1 next to large_mlp)\n")
        md.append(f"tiny_mlp: Poisson {p['tiny_rps']:g}/s, priority 1, no deadline. Neighbour large_mlp on the same lane: "
                  f"closed loop with {p['neighbour_concurrency']} in flight (priority 2, or 1 as a control), or open loop "
                  f"at {p.get('open_neighbour_rps', 0):,.0f}/s (1 s gRPC deadline, priority 2). Latency of tiny from its "
                  "scheduled send.\n")
        arms = ["solo", "neighbour-p2(closed)", "neighbour-p1(closed)", "neighbour-p2(open)"]
        md.append(header)
        md += arm_rows("priority", "tiny", arms)
        md.append("")
        md.append("Neighbour (large_mlp):\n")
        md.append(header)
        md += arm_rows("priority", "large-p2[closed]", ["neighbour-p2(closed)"])
        md += arm_rows("priority", "large-p1[closed]", ["neighbour-p1(closed)"])
        md += arm_rows("priority", "large-p2-open", ["neighbour-p2(open)"])
        res = {}
        for arm in arms[1:]:
            for basis, key in (("sched", "latency_ok"), ("send", "latency_ok_from_send")):
                solo = {r["round"]: _stream(r, "tiny")[key]["p99_ms"] for r in runs
                        if r["scenario"] == "priority" and r["arm"] == "solo"}
                nb = {r["round"]: _stream(r, "tiny")[key]["p99_ms"] for r in runs
                      if r["scenario"] == "priority" and r["arm"] == arm}
                common = sorted(k for k in set(solo) & set(nb) if solo[k] and nb[k] is not None)
                if not common:
                    continue
                entry = {"p99_ratio_of_medians": statistics.median(nb[k] for k in common)
                         / statistics.median(solo[k] for k in common),
                         "per_round": [nb[k] / solo[k] for k in common],
                         "solo_p99_ms": statistics.median(solo[k] for k in common),
                         "neighbour_p99_ms": statistics.median(nb[k] for k in common)}
                if basis == "sched":
                    res[arm] = entry
                else:
                    res.setdefault(arm, {})["from_send"] = entry
        summary["priority"] = {"ratios": res, "target": 1.2}
        md.append("")
        for arm, r in res.items():
            if "per_round" not in r:
                continue
            pr = r["per_round"]
            line = (f"- tiny p99 with {arm} / solo: **{r['p99_ratio_of_medians']:.2f}×** "
                    f"({r['neighbour_p99_ms']:.2f} vs {r['solo_p99_ms']:.2f} ms; per round {min(pr):.2f}–{max(pr):.2f})")
            fs = r.get("from_send")
            if fs:
                line += (f"; from the actual send {fs['p99_ratio_of_medians']:.2f}× ({fs['neighbour_p99_ms']:.2f} vs "
                         f"{fs['solo_p99_ms']:.2f} ms)")
            md.append(line)
        md.append("")
    details: dict = {}
    for r in runs:
        for e in r.get("error_details", []):
            key = (r["scenario"], e["status"], e["details"])
            details[key] = details.get(key, 0) + e["count"]
    if details:
        md.append("### Non-OK answers by status and message (numbers masked as N; all runs)\n")
        md.append("| scenario | status | details | count |\n|---|---|---|---:|")
        for (scenario, status, text), count in sorted(details.items(), key=lambda kv: (kv[0][0], -kv[1])):
            md.append(f"| {scenario} | {status} | {text.replace('|', '/')} | {count:,} |")
        md.append("")
    return summary, "\n".join(md) + "\n"


def _model_of(stream: str) -> str:
    return "tiny_mlp" if stream.startswith("tiny") else "large_mlp"


# --------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.openloop", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run (~2-3 min): 1 round, short windows, a reduced grid")
    p.add_argument("--scenario", default="all", choices=("bursty", "overload", "priority", "all"))
    p.add_argument("--seconds", type=float, help="measured window per run (default 10; 3 with --quick)")
    p.add_argument("--warmup", type=float, help="seconds sent before the window, not counted (default 2; 1 with --quick)")
    p.add_argument("--pairs", type=int, help="alternating rounds (default 3; 1 with --quick)")
    p.add_argument("--seed", type=int, default=20261125)
    p.add_argument("--front-end", default="sync", choices=("sync", "aio"), help="kernel front end (default sync)")
    p.add_argument("--sat-concurrency", type=int, default=64, help="closed-loop requests in flight for saturation")
    p.add_argument("--sat-seconds", type=float, help="saturation window (default 5; 2 with --quick)")
    # bursty
    p.add_argument("--slo-ms", type=float, default=50.0)
    p.add_argument("--bursty-deadline-via", default="grpc", choices=("grpc", "timeout"),
                   help="how bursty requests carry the SLO as deadline (default grpc: the kernel then also counts "
                        "the time a call waits for a handler thread)")
    p.add_argument("--base-frac", type=float, default=0.4)
    p.add_argument("--burst-factor", type=float, default=10.0)
    p.add_argument("--burst-ms", type=float, default=50.0)
    p.add_argument("--burst-gap-s", type=float, default=1.0, help="mean gap between bursts (exponential)")
    p.add_argument("--grid-batch", default=",".join(map(str, STATIC_BATCH)))
    p.add_argument("--grid-delay", default=",".join(map(str, STATIC_DELAY_US)))
    p.add_argument("--finalists", type=int, default=2, help="best static points re-run against adaptive")
    # overload
    p.add_argument("--overload-factor", type=float, default=2.0)
    p.add_argument("--deadline-ms", type=float, default=100.0)
    p.add_argument("--overload-rows", type=int, default=4,
                   help="rows per request in the overload scenario (default 4: 2x saturation at 1 row is ~4k "
                        "requests/s, more than a Python client keeps up with on one core)")
    # priority
    p.add_argument("--tiny-rps", type=float, default=200.0)
    p.add_argument("--neighbour-concurrency", type=int, default=32,
                   help="closed-loop neighbour requests in flight (below the sync front end's 64 handler threads)")
    p.add_argument("--open-neighbour", type=float, default=1.5,
                   help="open-loop neighbour arm at this × the closed neighbour's throughput (0 = off)")
    p.add_argument("--priority-control", action=argparse.BooleanOptionalAction, default=True,
                   help="also run the neighbour at priority 1 (control)")
    # machinery
    p.add_argument("--wait-idle", type=float, help="before each server start wait up to S s for an idle machine "
                                                    "(default 10; 0 with --quick)")
    p.add_argument("--server-cpu", default="0")
    p.add_argument("--client-cpu", default="1")
    p.add_argument("--snapshot", action=argparse.BooleanOptionalAction, default=True,
                   help="run the servers from a snapshot of kernel/ taken at the start (default on)")
    p.add_argument("--out", default=str(REPO_ROOT / "bench" / "out"))
    a = p.parse_args(argv)
    a.seconds = a.seconds or (3.0 if a.quick else 10.0)
    a.warmup = a.warmup if a.warmup is not None else (1.0 if a.quick else 2.0)
    a.pairs = a.pairs or (1 if a.quick else 3)
    a.sat_seconds = a.sat_seconds or (2.0 if a.quick else 5.0)
    a.wait_idle = a.wait_idle if a.wait_idle is not None else (0 if a.quick else 10)
    a.grid_batch = [int(x) for x in a.grid_batch.split(",")]
    a.grid_delay = [int(x) for x in a.grid_delay.split(",")]
    if a.quick and a.grid_batch == list(STATIC_BATCH) and a.grid_delay == list(STATIC_DELAY_US):
        a.grid_batch, a.grid_delay = [8, 64], [500, 8000]
    return a


def _terminate(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGINT, _terminate)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        os.sched_setaffinity(0, {int(args.client_cpu)})
    except (OSError, ValueError) as exc:
        print(f"openloop: could not pin the generator to cpu {args.client_cpu}: {exc}", file=sys.stderr)
    command = shlex.join([sys.executable, "-m", "bench.openloop", *(sys.argv[1:] if argv is None else argv)])
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    facts = machine_facts(command)
    facts["git_commit_full"] = _git("rev-parse", "HEAD")
    facts["git_dirty_tree"] = bool(_git("status", "--porcelain", "--untracked-files=no"))
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    logs = out / "logs" / f"openloop-{stamp}"
    code_root = None
    if args.snapshot:
        code_root = snapshot_code(out, stamp)
        facts["code_snapshot"] = {"path": str(code_root), "kernel_imported_from": check_imports(code_root)}
    ctx = Ctx(args, out, stamp, code_root, logs)
    print(f"openloop: {facts['cpu_model']}, {facts['cpus_online']} CPUs, Python {facts['python']}, grpcio "
          f"{facts['versions']['grpcio']}, onnxruntime {facts['versions']['onnxruntime']}, numpy "
          f"{facts['versions']['numpy']}; kernel {facts['git_commit']}"
          f"{' + uncommitted kernel/ changes' if facts['git_dirty_kernel'] else ''}"
          f"{' (snapshot ' + str(code_root) + ')' if code_root else ''}", flush=True)
    print(f"openloop: servers on cpu {args.server_cpu} ({args.front_end} front end), generator on cpu "
          f"{args.client_cpu}; {args.pairs} rounds; {args.seconds:g} s windows after {args.warmup:g} s warm-up", flush=True)
    started = time.perf_counter()
    info = {}
    scenarios = ["bursty", "overload", "priority"] if args.scenario == "all" else [args.scenario]
    for name in scenarios:
        info[name] = {"bursty": scenario_bursty, "overload": scenario_overload, "priority": scenario_priority}[name](ctx)
    facts["duration_s"] = round(time.perf_counter() - started, 1)
    facts["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
    facts["git_commit_end"] = _git("rev-parse", "HEAD")
    summary, tables = summarise(ctx, info)
    result = {"facts": facts, "args": {k: v for k, v in vars(args).items()}, "info": info, "summary": summary,
              "runs": ctx.runs, "servers": ctx.servers}
    json_path = out / f"openloop-{stamp}.json"
    json_path.write_text(json.dumps(result, indent=1, default=str) + "\n")
    (out / f"openloop-{stamp}.md").write_text(tables)
    np.savez_compressed(out / f"openloop-{stamp}-raw.npz", **ctx.raw)
    print("\n" + tables)
    bad_servers = [s for s in ctx.servers if s.get("log_errors") or s.get("died_during_run")
                   or s.get("exit_status", 0) != 0]
    late = sum(s.get("ok_after_deadline", 0) for r in ctx.runs for s in r["streams"]
               if s.get("ok_after_deadline_kind") == "server")
    errors = sum(s["errors"] for r in ctx.runs for s in r["streams"])
    flagged = [r for r in ctx.runs if r["client_flags"]]
    if flagged:
        print(f"WARNING: {len(flagged)} of {len(ctx.runs)} runs flagged the generator (saturated core or behind "
              "schedule): see client_flags in the JSON", flush=True)
    if late:
        print(f"WARNING: {late} OK answers arrived after their deadline (`timeout` parameter, measured from the "
              "actual send)", flush=True)
    if errors:
        print(f"WARNING: {errors} requests ended with CANCELLED/UNAVAILABLE/INTERNAL/other or no answer", flush=True)
    if bad_servers:
        print(f"WARNING: {len(bad_servers)} servers exited non-zero, died or logged errors", flush=True)
    print(f"openloop: {len(ctx.runs)} runs in {facts['duration_s']:.0f} s; results in {json_path}", flush=True)
    return 1 if bad_servers or late or errors else 0


def _git(*cmd: str) -> str:
    import subprocess

    try:
        return subprocess.run(["git", *cmd], capture_output=True, text=True, cwd=REPO_ROOT, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


if __name__ == "__main__":
    raise SystemExit(procs.run_main("openloop", main))
