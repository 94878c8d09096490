"""Decide vs bare ModelInfer on the same model, and Decide with the audit log on vs off — one run.

Protocol (BENCHMARKING.md): every configuration is a *fresh* kernel
subprocess pinned to core 0 (``taskset -c 0``) with a fresh data directory;
the load (``bench/decide_load.py``, grpc.aio, closed loop) is pinned to
core 1. Configurations alternate A B C A B C ... for ``--rounds`` rounds;
the code under test is frozen first (``bench.frontends.snapshot_code``).

Configurations (all serve the claims pipeline from ``examples/claims``, on ``claims_triage`` or,
with ``--model claims_triage_large``, on its MLP sibling):

* ``infer``           ModelInfer with the encoded feature row (the baseline)
* ``decide``          Decide with the claims pipeline, audit ``fsync`` (the default)
* ``decide-noaudit``  the same with ``--audit-mode off``
* ``decide-async``    the same with ``--audit-mode async`` (each record written to the OS before its
  answer, fsynced before every checkpoint: no fsync per group)
* ``decide-stream``   DecideStream, one decision in flight per stream (``--stream``)
* ``decide-pipelined`` one DecideStream with ``--concurrency`` decisions in flight on it

Reported per configuration: median throughput and p50/p99 over rounds and
server CPU µs per call; ratios of medians decide/infer and decide/decide-noaudit
with the spread of per-round ratios. ``--baseline REV`` also runs every chosen
configuration on the kernel as of git revision REV (its extensions built) in the
same alternation, named e.g. ``decide@REV``/``infer@REV``: before/after in one run.
``--concurrency 16,64,128`` sweeps the calls in flight: every configuration
runs at every level (named ``decide c64`` ...), ratios are reported per level,
and ``peak`` ratios compare each configuration's best level with the other's
(per round: the best of that round's levels), since both amortize more per
call as more calls are in flight (decisions finish in larger groups, batches
fill) and each reaches its own peak at its own level.
Results: ``OUT/decide-<stamp>.json`` and ``.md``.

    python -m bench.decide_bench [--rounds 3] [--seconds 5] [--concurrency 16[,64,...]] [--stream] [--baseline REV] [--out bench/out]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import procs
from bench.frontends import machine_facts, server_env, snapshot_code, snapshot_revision, wait_idle

REPO_ROOT = Path(__file__).resolve().parents[1]
READY = re.compile(r"AIOS kernel ready on ([\d.]+):(\d+)")
CONFIGS = {
    "infer": ("infer", ()),
    "decide": ("decide", ()),
    "decide-noaudit": ("decide", ("--audit-mode", "off")),
    "decide-async": ("decide", ("--audit-mode", "async")),  # records written before each answer, fsynced per checkpoint
    "decide-stream": ("decide-stream", ()),
    "decide-pipelined": ("decide-pipelined", ()),
}
RATIOS = (("decide", "infer"), ("decide-async", "infer"), ("decide", "decide-noaudit"), ("decide-stream", "infer"),
          ("decide-pipelined", "infer"))
_LEVEL = re.compile(r" c(\d+)$")  # "decide c64": the configuration at 64 calls in flight (a sweep)


def _split_level(name: str, default: int) -> tuple[str, int]:
    found = _LEVEL.search(name)
    return (name[:found.start()], int(found.group(1))) if found else (name, default)


def build_models(out: Path, model: str) -> Path:
    sys.path.insert(0, str(REPO_ROOT))
    from examples.claims import build_models as builder

    folder = out / f"decide-models-{model}"
    builder.build(folder, models=[m for m in builder.MODELS if m.name == model], log=lambda line: None)
    return folder


def pipelines_for(model: str, out: Path) -> Path:
    """The claims pipelines, pointed at ``model`` (the same features and classes; another network)."""
    source = REPO_ROOT / "examples" / "claims" / "pipelines"
    if model == "claims_triage":
        return source
    folder = out / f"decide-pipelines-{model}"
    folder.mkdir(parents=True, exist_ok=True)
    for path in source.glob("*.toml"):
        text = path.read_text()
        if path.name == "claims_triage.toml":
            text = text.replace('name = "claims_triage"\nversion = ""', f'name = "{model}"\nversion = ""', 1)
            if f'name = "{model}"' not in text:
                raise SystemExit(f"could not point {path} at {model}")
        (folder / path.name).write_text(text)
    return folder


def run_one(name: str, models: Path, args, code_root: Path, out: Path, stamp: str, round_no: int) -> dict:
    config, concurrency = _split_level(name, args.concurrency[0])
    mode, extra = CONFIGS[config.split("@")[0]]  # "decide@3fb1190": the same configuration on the baseline code
    data_dir = Path(tempfile.mkdtemp(prefix="aios-bench-data-", dir=args.data_parent))
    argv = [procs.python(), "-m", "kernel", "serve", "--models", str(models), "--pipelines",
            str(pipelines_for(args.model, args.out)), "--data-dir", str(data_dir), "--port", "0",
            "--log-level", "WARNING", *extra]
    wait_idle(args.wait_idle)
    server = procs.start_server(name, argv, READY, out / "logs" / f"decide-{stamp}-{round_no}-{name}.log",
                                cpu="0", env=server_env(code_root), cwd=code_root)
    try:
        load = [procs.python(), "-m", "bench.decide_load", "--address", server.url, "--mode", mode, "--model", args.model,
                "--concurrency", str(concurrency), "--seconds", str(args.seconds), "--warmup", str(args.warmup)]
        cpu0, t0 = server.cpu_seconds(), time.perf_counter()
        proc = subprocess.run(procs.taskset_prefix("1") + load, capture_output=True, text=True, cwd=REPO_ROOT,
                              timeout=args.seconds + args.warmup + 120)
        cpu1, t1 = server.cpu_seconds(), time.perf_counter()
        if proc.returncode != 0:
            return {"config": name, "error": proc.stderr.strip()[-800:]}
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        # The server also worked during warm-up: charge CPU by the share of the load's wall time measured.
        busy = (cpu1 - cpu0) / (t1 - t0)
        result["server_cpu_us_per_call"] = round(busy / result["throughput"] * 1e6, 1) if result["throughput"] else None
        result["config"] = name
        result["server_errors"] = server.error_lines(5)
        return result
    finally:
        server.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


def summarise(runs: list[dict], configs: list[str]) -> dict:
    table = {}
    for name in configs:
        ok = [r for r in runs if r.get("config") == name and "error" not in r]
        if not ok:
            continue
        table[name] = {
            "throughput": statistics.median(r["throughput"] for r in ok),
            "p50_ms": statistics.median(r["p50_ms"] for r in ok),
            "p99_ms": statistics.median(r["p99_ms"] for r in ok),
            "cpu_us": statistics.median(r["server_cpu_us_per_call"] or 0 for r in ok),
            "rounds": len(ok),
        }
    ratios = {}
    levels = sorted({_split_level(name, 0)[1] for name in table} - {0})
    suffixes = [f" c{level}" for level in levels] or [""]
    pairs = [(a + s, b + s) for a, b in RATIOS for s in suffixes]
    pairs += [(a, b) for a in table for b in table if "@" in b and a == b.split("@")[0]]  # after / before
    pairs += [(a, b) for a in table for b in table if "@" in a and "@" in b and (a.split("@")[0], b.split("@")[0])
              in RATIOS and a.split("@")[1] == b.split("@")[1]]  # the baseline's own decide/infer
    for a, b in pairs:
        if a in table and b in table:
            per_round = [ra["throughput"] / rb["throughput"] for ra, rb in zip(
                [r for r in runs if r.get("config") == a and "error" not in r],
                [r for r in runs if r.get("config") == b and "error" not in r])]
            ratios[f"{a}/{b}"] = {"median_of_medians": table[a]["throughput"] / table[b]["throughput"],
                                  "min": min(per_round), "max": max(per_round)}
    if len(levels) > 1:  # each configuration at its best level against the other at its own
        for a, b in RATIOS:
            if all(a + s in table and b + s in table for s in suffixes):
                ratios[f"{a}/{b} peak"] = _peak_ratio(runs, table, a, b, suffixes)
    return {"table": table, "ratios": ratios}


def _peak_ratio(runs: list[dict], table: dict, a: str, b: str, suffixes: list[str]) -> dict:
    best_a = max(table[a + s]["throughput"] for s in suffixes)
    best_b = max(table[b + s]["throughput"] for s in suffixes)

    def best_per_round(config: str) -> dict[int, float]:
        best: dict[int, float] = {}
        for r in runs:
            if "error" not in r and _split_level(r["config"], 0)[0] == config:
                best[r["round"]] = max(best.get(r["round"], 0.0), r["throughput"])
        return best

    rounds_a, rounds_b = best_per_round(a), best_per_round(b)
    per_round = [rounds_a[k] / rounds_b[k] for k in rounds_a if k in rounds_b]
    level_a = next(s for s in suffixes if table[a + s]["throughput"] == best_a).strip()
    level_b = next(s for s in suffixes if table[b + s]["throughput"] == best_b).strip()
    return {"median_of_medians": best_a / best_b, "min": min(per_round), "max": max(per_round),
            "levels": f"{level_a} vs {level_b}"}


def markdown(summary: dict) -> str:
    lines = ["| configuration | calls/s | p50 ms | p99 ms | server CPU µs/call | rounds |", "|---|---|---|---|---|---|"]
    for name, row in summary["table"].items():
        lines.append(f"| {name} | {row['throughput']:,.0f} | {row['p50_ms']:.2f} | {row['p99_ms']:.2f} | "
                     f"{row['cpu_us']:.0f} | {row['rounds']} |")
    lines += ["", "| ratio (throughput) | median | per-round min–max |", "|---|---|---|"]
    for name, r in summary["ratios"].items():
        levels = f" ({r['levels']})" if "levels" in r else ""
        lines.append(f"| {name}{levels} | **{r['median_of_medians']:.2f}×** | {r['min']:.2f}–{r['max']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.decide_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--concurrency", default="16", help="calls in flight: one level, or a comma list to sweep")
    parser.add_argument("--stream", action="store_true", help="also measure DecideStream")
    parser.add_argument("--configs", default="", help=f"comma list of {', '.join(CONFIGS)} "
                        "(default: infer,decide,decide-noaudit[,decide-stream])")
    parser.add_argument("--wait-idle", dest="wait_idle", type=float, default=10.0)
    parser.add_argument("--data-parent", dest="data_parent", default=None, help="where fresh data dirs go (disk for fsync)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "out")
    parser.add_argument("--model", default="claims_triage", choices=("claims_triage", "claims_triage_large"),
                        help="the claims model behind the pipeline (claims_triage_large: its 3x384 MLP sibling)")
    parser.add_argument("--baseline", default="", metavar="REV",
                        help="also run every chosen configuration on the kernel as of this git revision (before/after)")
    args = parser.parse_args(argv)
    configs = args.configs.split(",") if args.configs else ["infer", "decide", "decide-noaudit"] + (
        ["decide-stream"] if args.stream else [])
    try:
        args.concurrency = [int(level) for level in str(args.concurrency).split(",")]
    except ValueError:
        parser.error(f"--concurrency takes calls in flight, one level or a comma list, got {args.concurrency!r}")
    if min(args.concurrency) < 1:
        parser.error("--concurrency levels must be >= 1")
    if len(args.concurrency) > 1 and args.baseline:
        parser.error("--baseline compares two code trees at one --concurrency level; sweep levels without it")
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    args.out.mkdir(parents=True, exist_ok=True)
    code_root = snapshot_code(args.out, stamp)
    if len(args.concurrency) > 1:
        configs = [f"{name} c{level}" for level in args.concurrency for name in configs]
    roots = {name: code_root for name in configs}
    if args.baseline:
        baseline_root = snapshot_revision(args.out, stamp, args.baseline)
        rev = baseline_root.name.rsplit("-", 1)[1]
        for name in configs:  # every chosen configuration, on the baseline code too
            roots[f"{name}@{rev}"] = baseline_root
        configs = configs + [f"{name}@{rev}" for name in configs]
    models = build_models(args.out, args.model)
    command = "python -m bench.decide_bench " + " ".join(argv if argv is not None else sys.argv[1:])
    runs = []
    total = args.rounds * len(configs)
    for round_no in range(args.rounds):
        for name in configs:
            result = run_one(name, models, args, roots[name], args.out, stamp, round_no)
            result["round"] = round_no
            runs.append(result)
            shown = (f"{result['throughput']:,.0f}/s p50 {result['p50_ms']:.2f} ms cpu {result['server_cpu_us_per_call']} µs"
                     f" client cpu {result['client_cpu']:.2f}"
                     + ("  WARNING: client-bound" if result["client_cpu"] > 0.9 else "")
                     if "error" not in result else f"ERROR {result['error'][:200]}")
            print(f"[{len(runs)}/{total}] round {round_no + 1} {name:20} {shown}", flush=True)
    summary = summarise(runs, configs)
    report = {"command": command, "machine": machine_facts(command), "runs": runs, "summary": summary}
    (args.out / f"decide-{stamp}.json").write_text(json.dumps(report, indent=2))
    text = markdown(summary)
    (args.out / f"decide-{stamp}.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(procs.run_main("decide_bench", main))
