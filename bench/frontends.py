"""Kernel front ends (sync vs aio) against the naive server, measured with perf_analyzer.

Protocol (/work/shared/BENCHMARKING.md): one command runs every system alternately,
A B C A B C ... for ``--pairs`` rounds, each server a *fresh* subprocess pinned to core 0
(``taskset -c 0``) and perf_analyzer pinned to core 1. Per round and model, each system is
started, warmed up (one short perf_analyzer run at the highest concurrency, discarded), measured
at every concurrency (closed loop, batch 1 per request, KServe v2 gRPC), then stopped with
SIGTERM. The systems:

* ``kernel-sync``: ``python -m kernel serve --front-end sync``
* ``kernel-aio``:  ``python -m kernel serve --front-end aio``
* ``naive``:       ``python -m bench.naive_server`` (grpc.aio on uvloop, onnxruntime inline)
* ``kernel-sync-std`` (only when asked for): ``kernel-sync`` with ``eager_receive = false``, grpc's
  standard unary path (a handler thread per call from its start): the before/after of that setting
* ``kernel-sync-block`` (only when asked for): ``kernel-sync`` with ``answer_later = false``: each
  ModelInfer's handler thread sleeps until its answer is ready instead of handing the call on
* ``kernel-sync-handoff`` (only when asked for): ``kernel-sync`` with ``poller_inline = false``: a call
  that arrives to an idle server is handed to a handler thread instead of running on gRPC's poller
* ``kernel-sync-iomgr`` (only when asked for): ``kernel-sync`` with ``grpc_iomgr = true``: gRPC core's
  iomgr I/O path instead of its EventEngine threads (kernel/grpc_io.py)

Other engineers commit to kernel/ while a run goes on, so by default the code under test is
frozen first: ``kernel/`` and the server modules of ``bench/`` are copied to
``OUT/snapshots/<stamp>/`` (with ``kernel-uncommitted.diff``) and every server runs from there
(cwd and PYTHONPATH), so all rounds measure the same code (``--no-snapshot`` runs the live tree).
On this shared box the script waits (``--wait-idle``, default 20 s) for the machine to go idle
before each server start, and records per run the CPU that *other* processes used.

Every server serves one model (the kernel gets a one-model repository under ``OUT/repos/``;
the full repository with all models is ``OUT/repo/``). Reported per (system, model,
concurrency): the median over rounds of throughput, p50 and p99 with the min-max spread, and
the ratios of medians against the naive server measured in the same run (kernel-sync/naive,
kernel-aio/naive, sync/aio) with the spread of the per-round ratios and a 95 % bootstrap interval
of their median (``bench/intervals.py``: whether the median could as well sit on the other side
of a target, given how the rounds scatter). Server CPU per inference
is estimated from /proc (CPU seconds over the perf_analyzer run / its throughput); rows per
batch from the server's ModelStatistics (inference_count / execution_count over the run).

A run whose client core was > 90 % busy is flagged (it measures the client). A perf_analyzer
failure, a server that dies or a server log with error lines is recorded and shown, and the
run goes on. Results: ``OUT/frontends-<UTC date>.json`` (every run, machine facts, command),
``OUT/frontends-<UTC date>.md`` (the tables as Markdown), server logs in ``OUT/logs/``.

CLI::

    python -m bench.frontends [--quick] [--pairs 3] [--window-ms 2000] [--models tiny,large]
                              [--systems kernel-sync,kernel-aio,naive] [--out bench/out]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench import procs
from bench.intervals import median_interval
from bench.perf_analyzer import (PerfAnalyzerError, PerfAnalyzerUnavailable, ensure_perf_analyzer,
                                 run_perf_analyzer)
from bench.tiny_models import MODELS, write_model

REPO_ROOT = Path(__file__).resolve().parents[1]
SHORT_NAMES = {"tiny": "tiny_mlp", "medium": "medium_mlp", "large": "large_mlp"}
#: concurrency levels per model (64 only where batching can pay)
CONCURRENCY = {"tiny_mlp": [1, 16], "medium_mlp": [1, 16, 64], "large_mlp": [1, 16, 64]}
SYSTEMS = ("kernel-sync", "kernel-aio", "naive")
OPTIONAL_SYSTEMS = ("kernel-sync-std", "kernel-sync-block", "kernel-sync-handoff", "kernel-sync-iomgr")
BASELINE = "naive"
RATIOS = (("kernel-sync", "naive"), ("kernel-aio", "naive"), ("kernel-sync", "kernel-aio"),
          ("kernel-sync-std", "naive"), ("kernel-sync", "kernel-sync-std"),
          ("kernel-sync-block", "naive"), ("kernel-sync", "kernel-sync-block"),
          ("kernel-sync-handoff", "naive"), ("kernel-sync", "kernel-sync-handoff"),
          ("kernel-sync-iomgr", "naive"), ("kernel-sync-iomgr", "kernel-sync"))


# --------------------------------------------------------------------------- setup
def machine_facts(command: str) -> dict:
    from importlib import metadata

    def version(pkg: str) -> str:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return "not installed"

    def sh(cmd: list[str]) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=30, cwd=REPO_ROOT).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    model_name = next((line.split(":", 1)[1].strip() for line in sh(["lscpu"]).splitlines()
                       if line.startswith("Model name:")), "unknown")
    try:
        os_name = next(line.split("=", 1)[1].strip().strip('"') for line in Path("/etc/os-release").read_text().splitlines()
                       if line.startswith("PRETTY_NAME="))
    except (OSError, StopIteration):
        os_name = "unknown"
    return {
        "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "cpu_model": model_name,
        "cpus_online": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "os": os_name,
        "linux": os.uname().release,
        "glibc": os.confstr("CS_GNU_LIBC_VERSION"),
        "python": sys.version.split()[0],
        "versions": {pkg: version(pkg) for pkg in ("aios-kernel", "grpcio", "onnxruntime", "onnxruntime-gpu", "numpy",
                                                   "protobuf", "uvloop", "tritonclient")},
        # the module that imports can differ from the distributions installed (a GPU build on PYTHONPATH)
        "onnxruntime_imported": _onnxruntime_facts(),
        "gpus": sh(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]).splitlines(),
        "openblas_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("OPENBLAS")},
        "thread_env": {k: v for k, v in sorted(os.environ.items()) if k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")},
        "git_commit": sh(["git", "rev-parse", "--short", "HEAD"]),
        "git_dirty_kernel": sh(["git", "status", "--porcelain", "--", "kernel"]).splitlines(),
        "loadavg_start": Path("/proc/loadavg").read_text().split()[:3],
    }


def _onnxruntime_facts() -> dict:
    import onnxruntime as ort

    return {"version": ort.__version__, "providers": ort.get_available_providers(), "file": ort.__file__}


def build_repos(out: Path, models: list[str]) -> dict[str, Path]:
    """Write ``out/repo/<model>/1/model.onnx`` for every model and a one-model view
    ``out/repos/<model>/<model>/1/model.onnx`` (hard link) per model; return model -> view root."""
    onnx_dir = out / "onnx"
    onnx_dir.mkdir(parents=True, exist_ok=True)
    views = {}
    for name in models:
        src = write_model(name, onnx_dir)
        for root in (out / "repo", out / "repos" / name):
            dst = root / name / "1" / "model.onnx"
            dst.parent.mkdir(parents=True, exist_ok=True)
            if dst.exists() and dst.stat().st_size == src.stat().st_size and dst.read_bytes() == src.read_bytes():
                continue
            tmp = dst.with_name("model.onnx.tmp")
            tmp.unlink(missing_ok=True)
            try:
                os.link(src, tmp)
            except OSError:
                shutil.copyfile(src, tmp)
            tmp.replace(dst)
        views[name] = out / "repos" / name
    return views


def snapshot_code(out: Path, stamp: str) -> Path:
    """Copy ``kernel/`` and the bench server modules to ``out/snapshots/<stamp>/``; return that folder."""
    root = out / "snapshots" / stamp
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.c", "*.html")
    shutil.copytree(REPO_ROOT / "kernel", root / "kernel", ignore=ignore)
    (root / "bench").mkdir(parents=True)
    for name in ("__init__.py", "naive_server.py"):
        shutil.copy2(REPO_ROOT / "bench" / name, root / "bench" / name)
    diff = subprocess.run(["git", "diff", "HEAD", "--", "kernel"], capture_output=True, text=True, cwd=REPO_ROOT)
    (root / "kernel-uncommitted.diff").write_text(diff.stdout)  # what the snapshot adds to the commit
    return root


def snapshot_revision(out: Path, stamp: str, revision: str) -> Path:
    """``kernel/`` (with its extensions built) as of git ``revision``, in ``out/snapshots/<stamp>-<rev>/``:
    a baseline measured in the same run as the code under test."""
    sha = subprocess.run(["git", "rev-parse", "--short", revision], capture_output=True, text=True, cwd=REPO_ROOT,
                         check=True).stdout.strip()
    root = out / "snapshots" / f"{stamp}-{sha}"
    root.mkdir(parents=True)
    paths = [p for p in ("kernel", "ext", "setup.py", "pyproject.toml", "bench/__init__.py", "bench/naive_server.py")
             if subprocess.run(["git", "cat-file", "-e", f"{sha}:{p}"], cwd=REPO_ROOT).returncode == 0]
    archive = subprocess.run(["git", "archive", sha, *paths], capture_output=True, cwd=REPO_ROOT, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(root)], input=archive, check=True)
    if (root / "setup.py").exists():
        build = subprocess.run([procs.python(), "setup.py", "build_ext", "--inplace"], capture_output=True, text=True,
                               cwd=root)
        if build.returncode != 0:
            raise SystemExit(f"building the extensions of {sha} failed: {build.stderr.strip()[-800:]}")
    return root


def server_env(code_root: Path | None) -> dict | None:
    if code_root is None:
        return None
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(code_root)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def check_imports(code_root: Path) -> str:
    """Make sure a server started from ``code_root`` imports the snapshot, not the live tree."""
    proc = subprocess.run([procs.python(), "-c", "import kernel, bench.naive_server; print(kernel.__file__)"],
                          capture_output=True, text=True, cwd=code_root, env=server_env(code_root), timeout=60)
    where = proc.stdout.strip()
    if proc.returncode != 0 or not where.startswith(str(code_root)):
        raise SystemExit(f"frontends: the snapshot in {code_root} does not import as expected: "
                         f"{where or proc.stderr.strip()[-500:]}")
    return where


def server_argv(system: str, model: str, views: dict[str, Path], onnx_dir: Path,
                workers: int | None) -> tuple[list, object]:
    py = procs.python()
    if system == "naive":
        return ([py, "-m", "bench.naive_server", "--model", onnx_dir / f"{model}.onnx", "--name", model,
                 "--port", "0"], procs.READY_NAIVE)
    front_end = system.split("-")[1]
    # (the optional systems: the setting through its AIOS_* variable, the way a deployment would set it)
    prefix = {"kernel-sync-std": ["env", "AIOS_EAGER_RECEIVE=false"],
              "kernel-sync-block": ["env", "AIOS_ANSWER_LATER=false"],
              "kernel-sync-handoff": ["env", "AIOS_POLLER_INLINE=false"],
              "kernel-sync-iomgr": ["env", "AIOS_GRPC_IOMGR=true"]}.get(system, [])
    argv = [*prefix, py, "-m", "kernel", "serve", "--models", views[model], "--port", "0", "--front-end", front_end,
            "--log-level", "WARNING"]
    if workers and front_end == "sync":
        argv += ["--workers", str(workers)]
    return argv, procs.READY_KERNEL


# --------------------------------------------------------------------------- measuring
_CLK_TCK = os.sysconf("SC_CLK_TCK")


def busy_seconds() -> float:
    """CPU seconds all cores spent busy since boot (user+nice+system+irq+softirq+steal), from /proc/stat."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / _CLK_TCK


def wait_idle(max_wait_s: float, below_cores: float = 0.3, sample_s: float = 1.0) -> tuple[float, float]:
    """Wait (up to ``max_wait_s``) until the machine used < ``below_cores`` over ``sample_s``.

    Nothing of ours runs then, so what is busy belongs to other users of the box.
    Returns (seconds waited, cores busy in the last sample)."""
    start = time.perf_counter()
    while True:
        b0, t0 = busy_seconds(), time.perf_counter()
        time.sleep(sample_s)
        cores = (busy_seconds() - b0) / (time.perf_counter() - t0)
        waited = time.perf_counter() - start
        if cores < below_cores or waited >= max_wait_s:
            return round(waited, 1), round(cores, 2)


def add_undisturbed_options(parser, wait_idle_s: float = 20.0) -> None:
    """The options ``undisturbed`` takes: --wait-idle, --max-others, --retries."""
    parser.add_argument("--wait-idle", type=float, default=wait_idle_s,
                        help="before each pair, wait up to this many s for other processes to go quiet (0: don't)")
    parser.add_argument("--max-others", type=float, default=0.3,
                        help="a pair during which other processes used more CPU cores than this is rerun")
    parser.add_argument("--retries", type=int, default=3, help="reruns of a disturbed pair (the last is kept)")


def undisturbed(measure, wait_idle_s: float, max_others: float, retries: int):
    """``measure()`` once the machine is idle, again while other processes used more than ``max_others``
    cores during it (up to ``retries`` more times). Returns (its result, others' cores, attempts).

    /proc/stat counts in 10 ms ticks, so the share of others is taken over the whole measurement."""
    for attempt in range(1, retries + 2):
        if wait_idle_s > 0:
            wait_idle(wait_idle_s)
        busy0, cpu0, wall0 = busy_seconds(), time.process_time(), time.perf_counter()
        values = measure()
        wall = time.perf_counter() - wall0
        others = max(0.0, (busy_seconds() - busy0 - (time.process_time() - cpu0)) / wall)
        if others <= max_others:
            break
    return values, others, attempt


def model_counts(url: str, model: str) -> tuple[int, int] | None:
    """(inference_count, execution_count) from the server's ModelStatistics, or None."""
    try:
        import tritonclient.grpc as grpcclient

        client = grpcclient.InferenceServerClient(url)
        try:
            stats = client.get_inference_statistics(model).model_stats[0]
        finally:
            client.close()
        return int(stats.inference_count), int(stats.execution_count)
    except Exception:  # noqa: BLE001 - a diagnostic, never a reason to fail a run
        return None


def measure_point(server: procs.ServerProc, model: str, conc: int, args) -> dict:
    counts0 = model_counts(server.url, model)
    cpu0, busy0, t0 = server.cpu_seconds(), busy_seconds(), time.perf_counter()
    try:
        res = run_perf_analyzer(server.url, model, conc, args.window_ms, cpu=args.client_cpu, quiet=True)
    except PerfAnalyzerError as exc:
        return {"error": str(exc), "server_alive": server.alive()}
    cpu1, busy1, t1 = server.cpu_seconds(), busy_seconds(), time.perf_counter()
    res.pop("command", None)
    if cpu0 is not None and cpu1 is not None and t1 > t0:
        cores = (cpu1 - cpu0) / (t1 - t0)
        res["server_cpu_cores"] = round(cores, 3)
        res["server_cpu_us_per_inf"] = round(cores / res["throughput"] * 1e6, 1) if res["throughput"] else None
        # what the whole machine did minus the server and perf_analyzer: other users' load (noise)
        client = res["client_cpu"] * res["wall_s"] / (t1 - t0)
        res["other_cpu_cores"] = round(max(0.0, (busy1 - busy0) / (t1 - t0) - cores - client), 3)
    counts1 = model_counts(server.url, model)
    if counts0 and counts1 and counts1[1] > counts0[1]:
        # rows per model execution over the whole perf_analyzer run (1.0 = no batching)
        res["rows_per_batch"] = round((counts1[0] - counts0[0]) / (counts1[1] - counts0[1]), 2)
    return res


def run_benchmark(args, views: dict[str, Path], out: Path, stamp: str, code_root: Path | None) -> tuple[list, list]:
    runs, servers = [], []
    logs = out / "logs" / f"frontends-{stamp}"
    total = args.pairs * sum(len(args.systems) * len(args.conc[m]) for m in args.models)
    done = 0
    for rnd in range(1, args.pairs + 1):
        for model in args.models:
            for system in args.systems:
                argv, ready = server_argv(system, model, views, out / "onnx", args.workers)
                log_path = logs / f"r{rnd}-{model}-{system}.log"
                entry = {"round": rnd, "model": model, "system": system, "log": str(log_path)}
                servers.append(entry)
                if args.wait_idle > 0:
                    entry["idle_wait_s"], entry["busy_before_start"] = wait_idle(args.wait_idle)
                    if entry["busy_before_start"] >= 0.3:
                        print(f"   note: machine still busy ({entry['busy_before_start']:.2f} cores used by others) "
                              f"after {entry['idle_wait_s']:.0f} s; starting {system} anyway", flush=True)
                try:
                    server = procs.start_server(system, argv, ready, log_path, cpu=args.server_cpu,
                                                cwd=code_root or REPO_ROOT, env=server_env(code_root))
                except procs.ServerStartError as exc:
                    entry["start_error"] = str(exc)
                    print(f"!! round {rnd} {model} {system}: server did not start: {exc}", flush=True)
                    for conc in args.conc[model]:
                        done += 1
                        runs.append({"round": rnd, "model": model, "system": system, "concurrency": conc,
                                     "error": f"server did not start: {exc}"})
                    continue
                entry["command"] = shlex.join(map(str, server.command))
                try:
                    if args.warmup_ms > 0:
                        try:
                            run_perf_analyzer(server.url, model, max(args.conc[model]), args.warmup_ms,
                                              cpu=args.client_cpu, quiet=True, max_trials=3)
                        except PerfAnalyzerError as exc:  # an unstable warm-up is fine; a dead server is not
                            entry["warmup_error"] = str(exc).splitlines()[-2:]
                    for conc in args.conc[model]:
                        res = measure_point(server, model, conc, args)
                        res.update({"round": rnd, "model": model, "system": system, "concurrency": conc})
                        runs.append(res)
                        done += 1
                        print(progress_line(done, total, res), flush=True)
                        if "error" in res:
                            print(f"   perf_analyzer error: {res['error']}", flush=True)
                            if not server.alive():
                                break
                finally:
                    entry["died_during_run"] = not server.alive()
                    entry["exit_status"] = server.stop()
                    entry["log_errors"] = server.error_lines()
                    if entry["died_during_run"] or entry["exit_status"] != 0:
                        how = "died during the run" if entry["died_during_run"] else "did not stop cleanly"
                        print(f"!! {system} ({model}, round {rnd}) {how}: exit status {entry['exit_status']}", flush=True)
                    if entry["log_errors"]:
                        print(f"!! {system} ({model}, round {rnd}) logged errors:", flush=True)
                        for line in entry["log_errors"][:10]:
                            print(f"     {line}", flush=True)
    return runs, servers


def progress_line(done: int, total: int, r: dict) -> str:
    head = f"[{done:3d}/{total}] r{r['round']} {r['model']:10} {r['system']:11} c{r['concurrency']:<3d}"
    if "error" in r:
        return f"{head} ERROR"
    line = (f"{head} {r['throughput']:8.0f} inf/s  p50 {r['p50_us'] / 1000:7.3f} ms  p99 {r['p99_us'] / 1000:7.3f} ms"
            f"  n={int(r['request_count'] or 0)}  client {r['client_cpu']:.2f} cores")
    if r.get("server_cpu_us_per_inf") is not None:
        line += f"  server {r['server_cpu_cores']:.2f} cores, {r['server_cpu_us_per_inf']:.0f} us/inf"
    if r.get("rows_per_batch") is not None:
        line += f"  {r['rows_per_batch']:.1f} rows/batch"
    if r.get("other_cpu_cores") is not None:
        line += f"  others {r['other_cpu_cores']:.2f} cores"
    if r.get("client_saturated"):
        line += "  WARNING: client saturated (>90% of its core): this measures the client"
    return line


# --------------------------------------------------------------------------- summarising
def _spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def summarise(runs: list[dict], models: list[str], conc: dict, systems: list[str]) -> dict:
    ok = [r for r in runs if "error" not in r]
    points, ratios = [], []
    for model in models:
        for c in conc[model]:
            by_sys = {}
            for system in systems:
                rs = [r for r in ok if r["model"] == model and r["concurrency"] == c and r["system"] == system]
                failed = sum(1 for r in runs if r["model"] == model and r["concurrency"] == c
                             and r["system"] == system and "error" in r)
                point = {"model": model, "concurrency": c, "system": system, "failed_runs": failed,
                         "saturated_runs": sum(1 for r in rs if r.get("client_saturated"))}
                rows = [r["rows_per_batch"] for r in rs if r.get("rows_per_batch") is not None]
                if rows:
                    point["rows_per_batch"] = _spread(rows)
                other = [r["other_cpu_cores"] for r in rs if r.get("other_cpu_cores") is not None]
                if other:
                    point["other_cpu_cores"] = _spread(other)
                if rs:
                    point["throughput"] = _spread([r["throughput"] for r in rs])
                    point["p50_ms"] = _spread([r["p50_us"] / 1000 for r in rs])
                    point["p99_ms"] = _spread([r["p99_us"] / 1000 for r in rs])
                    cpu = [r["server_cpu_us_per_inf"] for r in rs if r.get("server_cpu_us_per_inf")]
                    if cpu:
                        point["server_cpu_us_per_inf"] = _spread(cpu)
                    by_sys[system] = {r["round"]: r for r in rs}
                points.append(point)
            for a, b in RATIOS:
                if a not in by_sys or b not in by_sys:
                    continue
                ma = statistics.median(r["throughput"] for r in by_sys[a].values())
                mb = statistics.median(r["throughput"] for r in by_sys[b].values())
                pa = statistics.median(r["p99_us"] for r in by_sys[a].values())
                pb = statistics.median(r["p99_us"] for r in by_sys[b].values())
                per_round = [by_sys[a][k]["throughput"] / by_sys[b][k]["throughput"]
                             for k in sorted(set(by_sys[a]) & set(by_sys[b])) if by_sys[b][k]["throughput"]]
                ratios.append({"model": model, "concurrency": c, "ratio": f"{a}/{b}",
                               "throughput_ratio_of_medians": ma / mb if mb else None,
                               "throughput_ratio_per_round": per_round,
                               "per_round_median_interval_95": median_interval(per_round),
                               "p99_ratio_of_medians": pa / pb if pb else None})
    return {"points": points, "ratios": ratios}


def _fmt(s: dict | None, digits: int = 0, scale: float = 1.0) -> str:
    if not s:
        return "—"
    f = f"{{:,.{digits}f}}"
    return f"{f.format(s['median'] * scale)} ({f.format(s['min'] * scale)}–{f.format(s['max'] * scale)})"


def _other(s: dict | None) -> str:
    return f"{s['median']:.2f} ({s['max']:.2f})" if s else "—"


def markdown_tables(summary: dict) -> str:
    lines = ["| model | conc | system | infer/s median (min–max) | p50 ms | p99 ms | server CPU µs/inf "
             "| rows/batch | others' CPU, cores (max) | notes |",
             "|---|---:|---|---|---|---|---|---|---|---|"]
    for p in summary["points"]:
        notes = []
        if p["failed_runs"]:
            notes.append(f"{p['failed_runs']} failed")
        if p["saturated_runs"]:
            notes.append(f"{p['saturated_runs']} client-saturated")
        n = p.get("throughput", {}).get("n", 0)
        lines.append(f"| {p['model']} | {p['concurrency']} | {p['system']} | {_fmt(p.get('throughput'))} | "
                     f"{_fmt(p.get('p50_ms'), 3)} | {_fmt(p.get('p99_ms'), 3)} | {_fmt(p.get('server_cpu_us_per_inf'))} | "
                     f"{_fmt(p.get('rows_per_batch'), 1)} | {_other(p.get('other_cpu_cores'))} | "
                     f"n={n}{'; ' + ', '.join(notes) if notes else ''} |")
    lines += ["", "| model | conc | ratio | throughput, ratio of medians | per-round ratios (min–max) "
              "| 95 % interval of their median | p99, ratio of medians |",
              "|---|---:|---|---:|---|---|---:|"]
    for r in summary["ratios"]:
        pr = r["throughput_ratio_per_round"]
        spread = f"{min(pr):.2f}–{max(pr):.2f}" if pr else "—"
        interval = r.get("per_round_median_interval_95")
        sure = f"{interval[0]:.2f}–{interval[1]:.2f}" if interval else "— (< 3 rounds)"
        tr = r["throughput_ratio_of_medians"]
        p99 = r["p99_ratio_of_medians"]
        lines.append(f"| {r['model']} | {r['concurrency']} | {r['ratio']} | {tr:.2f}× | {spread} | {sure} | "
                     f"{p99:.2f}× |" if tr is not None and p99 is not None else
                     f"| {r['model']} | {r['concurrency']} | {r['ratio']} | — | {spread} | {sure} | — |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.frontends", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run (~1 min): 1 round, 500 ms windows, 250 ms warm-up unless given")
    parser.add_argument("--pairs", type=int, help="rounds of A B C (default 3; 1 with --quick)")
    parser.add_argument("--window-ms", type=int, help="perf_analyzer window -p (default 2000; 500 with --quick)")
    parser.add_argument("--warmup-ms", type=int, help="warm-up window per server start (default window/4, min 250)")
    parser.add_argument("--models", default="tiny,large", help="comma list of tiny, medium, large")
    parser.add_argument("--concurrency", help="comma list overriding the per-model levels (tiny 1,16; large 1,16,64)")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma list of {', '.join(SYSTEMS)}")
    parser.add_argument("--workers", type=int, help="--workers for the kernel's sync front end (default: the kernel's)")
    parser.add_argument("--wait-idle", type=float, default=None,
                        help="before each server start wait up to S s for the machine to be idle (< 0.3 cores busy); "
                             "default 20, 0 with --quick")
    parser.add_argument("--server-cpu", default="0", help="taskset -c for the servers (default 0)")
    parser.add_argument("--client-cpu", default="1", help="taskset -c for perf_analyzer (default 1)")
    parser.add_argument("--snapshot", action=argparse.BooleanOptionalAction, default=True,
                        help="copy kernel/ and the bench server modules to OUT/snapshots/<stamp>/ and run the "
                             "servers from there, so commits made during the run do not change the code measured "
                             "(default on)")
    parser.add_argument("--out", default=str(REPO_ROOT / "bench" / "out"), help="output folder (default bench/out)")
    args = parser.parse_args(argv)
    args.pairs = args.pairs or (1 if args.quick else 3)
    args.window_ms = args.window_ms or (500 if args.quick else 2000)
    args.wait_idle = args.wait_idle if args.wait_idle is not None else (0 if args.quick else 20)
    args.warmup_ms = args.warmup_ms if args.warmup_ms is not None else max(250, args.window_ms // 4)
    try:
        args.models = [SHORT_NAMES.get(m.strip(), m.strip()) for m in args.models.split(",") if m.strip()]
    except AttributeError:
        parser.error("--models")
    for m in args.models:
        if m not in MODELS:
            parser.error(f"unknown model {m!r}; known: {', '.join(SHORT_NAMES)}")
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    for s in args.systems:
        if s not in SYSTEMS + OPTIONAL_SYSTEMS:
            parser.error(f"unknown system {s!r}; known: {', '.join(SYSTEMS + OPTIONAL_SYSTEMS)}")
    levels = [int(c) for c in args.concurrency.split(",")] if args.concurrency else None
    args.conc = {m: levels or CONCURRENCY[m] for m in args.models}
    return args


def _terminate(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")  # unwinds through the finally blocks that stop servers


def main(argv=None) -> int:
    args = parse_args(argv)
    # nohup/& start us with SIGINT ignored: make SIGINT and SIGTERM stop the run cleanly.
    signal.signal(signal.SIGINT, _terminate)
    signal.signal(signal.SIGTERM, _terminate)
    command = shlex.join([sys.executable, "-m", "bench.frontends", *(sys.argv[1:] if argv is None else argv)])
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    try:
        prefix = ensure_perf_analyzer()
    except PerfAnalyzerUnavailable as exc:
        print(f"perf_analyzer unavailable: {exc.reason}", file=sys.stderr)
        return 2
    facts = machine_facts(command)
    facts["perf_analyzer"] = {"prefix": prefix, "client_cpu": args.client_cpu, "server_cpu": args.server_cpu,
                              "window_ms": args.window_ms, "warmup_ms": args.warmup_ms, "stability_pct": 100,
                              "max_trials": 10}
    facts["wait_idle_s"] = args.wait_idle
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    print(f"frontends: {facts['cpu_model']}, {facts['cpus_online']} CPUs, Python {facts['python']}, "
          f"grpcio {facts['versions']['grpcio']}, onnxruntime {facts['versions']['onnxruntime']}, "
          f"numpy {facts['versions']['numpy']}; OPENBLAS env {facts['openblas_env'] or 'unset'}", flush=True)
    print(f"frontends: servers on cpu {args.server_cpu}, perf_analyzer on cpu {args.client_cpu}; {args.pairs} rounds of "
          f"{' '.join(args.systems)}; models {', '.join(args.models)}; {args.window_ms} ms windows", flush=True)
    if facts["git_dirty_kernel"]:
        print(f"frontends: note: kernel/ has uncommitted changes ({len(facts['git_dirty_kernel'])} paths); "
              "they are part of what is measured", flush=True)
    views = build_repos(out, args.models)
    code_root = None
    if args.snapshot:
        code_root = snapshot_code(out, stamp)
        facts["code_snapshot"] = {"path": str(code_root), "kernel_imported_from": check_imports(code_root)}
        print(f"frontends: servers run a snapshot of kernel/ at {facts['git_commit']}"
              f"{' + uncommitted changes' if facts['git_dirty_kernel'] else ''}: {code_root}", flush=True)
    started = time.perf_counter()
    runs, servers = run_benchmark(args, views, out, stamp, code_root)
    facts["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
    end = machine_facts(command)
    facts["git_commit_end"], facts["git_dirty_kernel_end"] = end["git_commit"], end["git_dirty_kernel"]
    if (facts["git_commit_end"], facts["git_dirty_kernel_end"]) != (facts["git_commit"], facts["git_dirty_kernel"]):
        print(f"frontends: note: kernel/ changed during the run (HEAD {facts['git_commit']} -> "
              f"{facts['git_commit_end']}); " + ("the servers ran the snapshot taken at the start" if code_root
                                                 else "servers started later ran the newer code"), flush=True)
    facts["duration_s"] = round(time.perf_counter() - started, 1)
    summary = summarise(runs, args.models, args.conc, args.systems)
    tables = markdown_tables(summary)
    result = {"facts": facts, "config": {"pairs": args.pairs, "window_ms": args.window_ms, "models": args.models,
                                         "concurrency": args.conc, "systems": args.systems, "quick": args.quick},
              "summary": summary, "runs": runs, "servers": servers}
    json_path = out / f"frontends-{stamp}.json"
    json_path.write_text(json.dumps(result, indent=1, default=str) + "\n")
    (out / f"frontends-{stamp}.md").write_text(tables)
    print("\n" + tables)
    failures = [r for r in runs if "error" in r]
    saturated = [r for r in runs if r.get("client_saturated")]
    bad_servers = [s for s in servers if s.get("start_error") or s.get("log_errors") or s.get("died_during_run")
                   or s.get("exit_status", 0) != 0]
    if saturated:
        print(f"WARNING: {len(saturated)} runs had the client core > 90% busy: those points measure perf_analyzer, "
              "not the server", flush=True)
    if failures:
        print(f"WARNING: {len(failures)} of {len(runs)} runs failed (see 'error' in the JSON)", flush=True)
    if bad_servers:
        print(f"WARNING: {len(bad_servers)} server starts failed, exited non-zero or logged errors "
              "(see 'servers' in the JSON and the logs)", flush=True)
    print(f"frontends: {len(runs)} runs in {facts['duration_s']:.0f} s; results in {json_path}", flush=True)
    return 1 if failures or bad_servers else 0


if __name__ == "__main__":
    raise SystemExit(procs.run_main("frontends", main))
