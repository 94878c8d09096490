"""Where a call's server CPU goes, thread by thread: Decide vs ModelInfer on the claims model.

Same setup as ``bench/decide_bench.py`` (a fresh kernel pinned to core 0,
``bench/decide_load.py`` closed-loop on core 1), but instead of one CPU
figure per call it reads every server thread's CPU from
``/proc/<pid>/task/*/stat`` before and after a window of the load and groups
it by the thread's OS name (the kernel names its threads:
``kernel/threads.py``; gRPC's poller thread keeps the process name,
``python``, and gRPC core's own threads have theirs). Voluntary context
switches per call are counted the same way.

    python -m bench.thread_cpu [--modes infer,decide] [--seconds 4] [--rounds 3] [--audit-mode async] [--out bench/out]

Prints one table per mode (median over rounds of µs of CPU per call per thread
group, and how much of it ran in the OS kernel: system calls, fdatasync, page
faults) and writes ``OUT/thread-cpu-<stamp>.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import procs
from bench.decide_bench import READY, REPO_ROOT, build_models, pipelines_for
from bench.frontends import machine_facts, wait_idle

_TICK = os.sysconf("SC_CLK_TCK")


def _threads(pid: int) -> dict[str, tuple[str, int, int, int]]:
    """tid -> (OS name, CPU ticks, voluntary switches, system-mode ticks)."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            name = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
            fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
            status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
        except FileNotFoundError:  # the thread ended
            continue
        switches = int(re.search(r"^voluntary_ctxt_switches:\s+(\d+)", status, re.M).group(1))
        out[tid] = (name, int(fields[11]) + int(fields[12]), switches, int(fields[12]))
    return out


def _group(name: str) -> str:
    return re.sub(r"[-_]?\d+$", "", name)  # aios-grpc_12 -> aios-grpc


def measure(mode: str, args, models: Path, stamp: str, round_no: int) -> dict:
    data_dir = Path(tempfile.mkdtemp(prefix="aios-bench-data-", dir=args.data_parent))
    argv = [procs.python(), "-m", "kernel", "serve", "--models", str(models), "--pipelines",
            str(pipelines_for(args.model, args.out)), "--data-dir", str(data_dir), "--port", "0",
            "--log-level", "WARNING", "--audit-mode", args.audit_mode]
    wait_idle(args.wait_idle)
    server = procs.start_server(mode, argv, READY, args.out / "logs" / f"thread-cpu-{stamp}-{round_no}-{mode}.log",
                                cpu="0", cwd=REPO_ROOT)
    try:
        load = subprocess.Popen(procs.taskset_prefix("1") + [
            procs.python(), "-m", "bench.decide_load", "--address", server.url, "--mode", mode, "--model", args.model,
            "--concurrency", str(args.concurrency), "--seconds", str(args.seconds + 2), "--warmup", "1"],
            stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT)
        time.sleep(2)  # warm-up and the first second of the load's own window
        before, t0 = _threads(server.pid), time.perf_counter()
        time.sleep(args.seconds)
        after, t1 = _threads(server.pid), time.perf_counter()
        result = json.loads(load.communicate(timeout=args.seconds + 120)[0].strip().splitlines()[-1])
    finally:
        server.stop()
        shutil.rmtree(data_dir, ignore_errors=True)
    calls = result["throughput"] * (t1 - t0)
    groups: dict[str, list[float]] = {}
    for tid, (name, ticks, switches, system) in after.items():
        base = before.get(tid, (name, 0, 0, 0))
        entry = groups.setdefault(_group(name), [0.0, 0.0, 0.0])  # CPU µs, switches, of the CPU: system µs
        entry[0] += (ticks - base[1]) / _TICK / calls * 1e6
        entry[1] += (switches - base[2]) / calls
        entry[2] += (system - base[3]) / _TICK / calls * 1e6
    return {"mode": mode, "throughput": result["throughput"], "groups": groups}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.thread_cpu", description=__doc__.splitlines()[0])
    parser.add_argument("--modes", default="infer,decide")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--wait-idle", dest="wait_idle", type=float, default=10.0)
    parser.add_argument("--data-parent", dest="data_parent", default=None)
    parser.add_argument("--model", default="claims_triage", choices=("claims_triage", "claims_triage_large"))
    parser.add_argument("--audit-mode", dest="audit_mode", default="fsync", choices=("fsync", "async", "off"),
                        help="the kernel's audit mode for decide (fsync: the default)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "out")
    args = parser.parse_args(argv)
    modes = args.modes.split(",")
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    args.out.mkdir(parents=True, exist_ok=True)
    models = build_models(args.out, args.model)
    command = "python -m bench.thread_cpu " + " ".join(argv if argv is not None else sys.argv[1:])
    runs = []
    for round_no in range(args.rounds):
        for mode in modes:
            run = measure(mode, args, models, stamp, round_no)
            runs.append(run)
            total = sum(entry[0] for entry in run["groups"].values())
            print(f"round {round_no + 1} {mode:8} {run['throughput']:,.0f}/s  {total:.0f} µs/call", flush=True)
    lines = []
    for mode in modes:
        mine = [r for r in runs if r["mode"] == mode]
        names = sorted({g for r in mine for g in r["groups"]},
                       key=lambda g: -statistics.median(r["groups"].get(g, [0, 0, 0])[0] for r in mine))
        lines += [f"\n{mode}: {statistics.median(r['throughput'] for r in mine):,.0f} calls/s (median of {len(mine)})",
                  "| thread (OS name) | CPU µs/call | of it in the OS kernel | voluntary switches/call |",
                  "|---|---|---|---|"]

        def median_of(column: int, group: str | None = None) -> float:
            return statistics.median(r["groups"].get(group, [0, 0, 0])[column] if group is not None
                                     else sum(entry[column] for entry in r["groups"].values()) for r in mine)

        for g in names:
            if median_of(0, g) < 0.05:
                continue
            lines.append(f"| {g} | {median_of(0, g):.1f} | {median_of(2, g):.1f} | {median_of(1, g):.2f} |")
        lines.append(f"| total | {median_of(0):.0f} | {median_of(2):.0f} | {median_of(1):.2f} |")
    text = "\n".join(lines)
    print(text)
    (args.out / f"thread-cpu-{stamp}.json").write_text(json.dumps(
        {"command": command, "machine": machine_facts(command), "runs": runs}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(procs.run_main("thread_cpu", main))
