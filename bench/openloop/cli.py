"""Command line: parse the options, pin the generator, take the code snapshot, run the chosen scenarios,
write ``openloop-<stamp>.json``/``.md``/``-raw.npz`` and decide the exit status."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import signal
import sys
import time
from pathlib import Path

import numpy as np

from bench.frontends import check_imports, machine_facts, snapshot_code
from bench.openloop.report import summarise
from bench.openloop.runs import REPO_ROOT, Ctx
from bench.openloop.scenarios import STATIC_BATCH, STATIC_DELAY_US, scenario_bursty, scenario_overload, scenario_priority


def parse_args(argv=None):
    # the description is the first line of the package docstring (bench/openloop/__init__.py)
    description = sys.modules[__package__].__doc__.splitlines()[0]
    p = argparse.ArgumentParser(prog="python -m bench.openloop", description=description)
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
    p.add_argument("--overload-rps", type=float, default=0.0,
                   help="offer this many requests/s instead of --overload-factor x the measured saturation "
                        "(to compare two builds at one load)")
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
    p.add_argument("--neighbour-process", action="store_true",
                   help="drive the closed-loop neighbour from a process of its own, as a separate client service "
                        "would (default: one event loop drives both streams)")
    p.add_argument("--neighbour-kernel", action="store_true",
                   help="also run the neighbour (priority 2) against a kernel process of its own on the same core: "
                        "what two processes sharing the core give, the bound of isolation inside one process")
    # machinery
    p.add_argument("--wait-idle", type=float, help="before each server start wait up to S s for an idle machine "
                                                    "(default 10; 0 with --quick)")
    p.add_argument("--channel-per-stream", action="store_true",
                   help="a connection of its own per stream (tiny and its neighbour, say), as separate client "
                        "services would have; default: every stream shares one channel")
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
