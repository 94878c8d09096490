"""One measured run on a fresh server: start/stop a pinned ``python -m kernel serve`` (with its bookkeeping),
drive the loads, compute the statistics, print the progress line and keep the raw arrays."""

from __future__ import annotations

import argparse
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from bench import procs
from bench.frontends import server_env, wait_idle
from bench.openloop.driver import drive
from bench.openloop.stats import client_flags, record_stats
from bench.openloop.streams import ClosedLoad, make_stream

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Ctx:
    """One invocation: its options and output paths, and every run, server and raw array so far."""

    args: argparse.Namespace
    out: Path
    stamp: str
    code_root: Path | None
    logs: Path
    runs: list = field(default_factory=list)
    servers: list = field(default_factory=list)
    raw: dict = field(default_factory=dict)
    seq: int = 0


def start(ctx: Ctx, label: str, repo: Path, extra_args: tuple[str, ...] = (), nice: int = 0) -> procs.ServerProc:
    args = ctx.args
    entry = {"label": label, "repo": str(repo)}
    ctx.servers.append(entry)
    if args.wait_idle > 0:
        entry["idle_wait_s"], entry["busy_before_start"] = wait_idle(args.wait_idle)
        if entry["busy_before_start"] >= 0.3:
            print(f"   note: machine busy ({entry['busy_before_start']:.2f} cores used by others) after "
                  f"{entry['idle_wait_s']:.0f} s; starting anyway", flush=True)
    argv = [*(("nice", "-n", str(nice)) if nice else ()), procs.python(), "-m", "kernel", "serve", "--models", repo, "--port", "0", "--log-level", "WARNING",
            "--front-end", args.front_end, *extra_args]
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
    run = drive(server.url, opens, closeds, warmup_s, window_s, server, args.channel_per_stream,
                closed_process=scenario == "priority" and args.neighbour_process)
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


def stream_stats(r: dict, name: str) -> dict:
    return next(s for s in r["streams"] if s["stream"] == name)


def measure_saturation(ctx: Ctx, server, model: str, rnd: int, scenario: str, window_s: float | None = None) -> float:
    stream = make_stream(f"{model}-sat", model)
    r = measure(ctx, server, scenario, "saturation(closed)", rnd, [],
                [ClosedLoad(stream, ctx.args.sat_concurrency)], window_s=window_s or ctx.args.sat_seconds)
    return stream_stats(r, f"{model}-sat[closed]")["throughput_rps"]
