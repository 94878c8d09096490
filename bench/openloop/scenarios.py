"""The three scenarios (bursty goodput, overload with deadlines, priority isolation): which servers, which
loads, in which order; each returns its facts (trace, rates) for the report."""

from __future__ import annotations

import numpy as np

from bench.openloop.repos import build_repo, model_toml
from bench.openloop.runs import Ctx, measure, measure_saturation, start, stop, stream_stats
from bench.openloop.streams import ClosedLoad, OpenLoad, make_stream
from bench.openloop.traces import bursty_trace, poisson

# the static batching grid of the bursty scenario (max_batch_size x max_queue_delay_us)
STATIC_BATCH = (8, 16, 32, 64)
STATIC_DELAY_US = (500, 2000, 8000)


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
        screen[arm] = stream_stats(one(arm, 0, "screen"), "large")["goodput_rps"]
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
            cap = stream_stats(r, f"{model}-sat[closed]")["throughput_rps"]
        finally:
            stop(server)
        if rate is None:
            # --overload-rps: the same offered load for two builds whose saturation differs (an A/B)
            rate = args.overload_rps or args.overload_factor * cap
            times = poisson(np.random.default_rng(args.seed + 1), rate, 0.0, args.warmup + args.seconds)
            print(f"overload: saturation {cap:.0f} requests/s ({rows} rows each) -> offered {rate:.0f}/s "
                  f"({rate / cap:.2g}x) with {args.deadline_ms:.0f} ms deadlines, {len(times)} requests per run",
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
    # (--neighbour-kernel: the neighbour's own kernel process, pinned to the same core, serving large_mlp alone)
    large_only = build_repo(ctx.out, "large-only", {"large_mlp": model_toml("large_mlp", 64)}) if args.neighbour_kernel else None
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
            if args.neighbour_kernel:
                # (the whole process niced as the kernel's batch_nice lowers a batch: the neighbour is the bulk)
                other = start(ctx, f"priority-neighbour-r{rnd}", large_only,
                              ("--data-dir", str(ctx.out / f"neighbour-data-r{rnd}")), nice=10)
                try:
                    apart = make_stream("large-p2-apart", "large_mlp", priority=2, url=other.url)
                    measure(ctx, server, "priority", "neighbour-p2(own kernel)", rnd, [OpenLoad(tiny, tiny_times)],
                            [ClosedLoad(apart, args.neighbour_concurrency)])
                finally:
                    stop(other)
            if args.open_neighbour:
                if open_rate is None:
                    open_rate = args.open_neighbour * stream_stats(b, "large-p2[closed]")["throughput_rps"]
                    info["open_neighbour_rps"] = open_rate
                large_open = make_stream("large-p2-open", "large_mlp", priority=2, deadline_ms=1000,
                                         deadline_via="grpc")
                times = poisson(np.random.default_rng(args.seed + 3), open_rate, 0.0, args.warmup + args.seconds)
                measure(ctx, server, "priority", "neighbour-p2(open)", rnd,
                        [OpenLoad(tiny, tiny_times), OpenLoad(large_open, times)], deadline_s=None)
        finally:
            stop(server)
    return info
