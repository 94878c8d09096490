"""A soak: one kernel under a steady mixed load for minutes or hours, its memory sampled as it goes.

The question it answers: does the kernel's resident size keep rising under a long load, or level off?
(bench/RESULTS.md, "Session 24": RSS still rose after 22 minutes; ``MALLOC_ARENA_MAX=2`` seemed to stop it.)
Run two at once, one with ``--env MALLOC_ARENA_MAX=2``, so both see the same host noise.

The kernel is ``python -m kernel serve`` on the claims demo (``examples/claims``; its models are built into
the temp dir when ``make models`` has not run) in a fresh data dir, with ``AIOS_AUDIT_STREAM_ENABLED=true``
(StreamAudit is off by default) and every ``--env KEY=VALUE``. One process drives it open-loop: ``--rate``
call slots a second are filled on a schedule, whatever the answers take, from a small thread pool, through
the repository's own clients (``kernel/decision_client.py``, ``kernel/oip_client.py``). The mix, per 20 slots:
8 Decide, 5 ModelInfer (each model served in turn, the encoded row), 1 DecideStream of 5 decisions,
2 ListReviews, 2 StartTask and 2 GetTask of a recent task; every 15 s a StreamAudit read of the newest ~100
records. About half the demo's claims are escalated, and reviewers keep the queue short: while more than 10
reviews are open (the last ListReviews page, plus escalations since), the next slot goes to a reviewer, who
makes two calls (ClaimNextReview, then ResolveReview with one of the case's actions).

Expected refusals, counted apart from failures: ClaimNextReview's NOT_FOUND (no review open: another
reviewer call took the last). Any other non-OK status, and a DecideStream answer's ``error_code``, is a
failure, shown by code. A call slot that finds 64 calls still in flight is skipped and counted.

Every ``--interval`` s (60) one line: elapsed, calls ok/failed by code, the kernel's VmRSS (and peak), threads,
open fds, the data dir's size on disk, the CPU the kernel and this process used. At the end the kernel gets
SIGTERM; its exit status and its log's WARNING/ERROR lines are printed, with a summary line, and the samples go to
``OUT/soak-<stamp>-<label>.json``. Exit status 0 only when no call failed, the kernel exited 0 and its log
has no WARNING or ERROR line.

    python -m bench.soak --minutes 60 --rate 35 --env MALLOC_ARENA_MAX=2 --label arena2 --port 21001
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import itertools
import json
import os
import random
import re
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np

from bench import procs
from bench.frontends import machine_facts

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # (examples.claims, when run from elsewhere)
    sys.path.insert(0, str(REPO_ROOT))

from examples.claims import build_models, data, features  # noqa: E402
from kernel._proto.aios.kernel.v1 import kernel_pb2 as kpb  # noqa: E402
from kernel.decision_client import DecisionClient, make_request  # noqa: E402
from kernel.oip_client import OipClient  # noqa: E402

READY = re.compile(r"AIOS kernel ready on ([\d.]+):(\d+)")
LOG_PROBLEM = re.compile(r"\b(WARNING|ERROR|CRITICAL)\b|Traceback")
MIX = ["decide"] * 8 + ["infer"] * 5 + ["stream"] + ["list-reviews"] * 2 + ["start-task"] * 2 + ["get-task"] * 2
STREAM_DECISIONS = 5
AUDIT_EVERY_S = 15.0
REVIEW_BACKLOG = 10  # open reviews above which a reviewer takes the next slot
MAX_IN_FLIGHT = 64
EXPECTED = {("claim-next", "NOT_FOUND")}


def proc_status(pid: int) -> dict:
    """VmRSS, VmHWM (peak), RssAnon, RssFile in MiB and Threads, from /proc/PID/status."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = round(int(value.split()[0]) / 1024, 1)  # kB
        elif key == "Threads":
            out[key] = int(value)
    return out


def disk_mb(folder: Path) -> float:
    """Space the data dir takes on disk (blocks, as du: audit segments are preallocated with zeros)."""
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                pass  # (a SQLite journal gone between the listing and the stat)
    return round(total / 1e6, 1)


class Load:
    """The calls, their counts and the state they share (recent tasks, the reviews waiting, the log's end)."""

    def __init__(self, address: str, models: list[str]):
        self.client = DecisionClient(address, timeout=10.0, stream_timeout=30.0)
        self.oip = OipClient(address, timeout=10.0)
        cases = data.generate_cases(1000, seed=23)
        self.requests = [{k: c[k] for k in data.REQUEST_FIELDS} for c in cases]
        self.rows = features.encode(cases)
        self.models = models
        self.lock = threading.Lock()
        self.counts: collections.Counter = collections.Counter()  # (call, code name)
        self.decisions = collections.Counter()  # outcome name
        self.waiting_reviews = 0  # open reviews: the last ListReviews page's, plus escalations since
        self.tasks: collections.deque = collections.deque(maxlen=50)
        self.last_sequence = 0
        self.seq = itertools.count()

    def count(self, call: str, code: str) -> None:
        with self.lock:
            self.counts[(call, code)] += 1

    def decided(self, decision) -> None:
        with self.lock:
            self.decisions[kpb.Outcome.Name(decision.outcome)] += 1
            if decision.review_id:
                self.waiting_reviews += 1
            self.last_sequence = max(self.last_sequence, decision.audit_sequence)

    def run(self, call: str) -> None:
        n = next(self.seq)
        try:
            if getattr(self, "_" + call.replace("-", "_"))(n) is not False:  # (False: no call was made)
                self.count(call, "OK")
        except grpc.RpcError as error:
            self.count(call, error.code().name)
        except Exception as error:  # (a bug in the load, not the kernel's: counted, never silent)
            self.count(call, f"client {type(error).__name__}")

    def _decide(self, n: int) -> None:
        self.decided(self.client.decide("claims_triage", self.requests[n % 1000], tenant="soak"))

    def _infer(self, n: int) -> None:
        model = self.models[n % len(self.models)]
        self.oip.infer(model, {"features": self.rows[n % 1000:n % 1000 + 1]})

    def _stream(self, n: int) -> None:
        sent = [make_request("claims_triage", self.requests[(n + k) % 1000], tenant="soak", request_id=f"s{n}-{k}")
                for k in range(STREAM_DECISIONS)]
        with self.client.decide_stream(sent) as answers:
            for answer in answers:
                if answer.error_code:  # (the stream goes on; that decision failed)
                    self.count("stream-decision", answer.error_code)
                else:
                    self.decided(answer)

    def _list_reviews(self, n: int) -> None:
        page = self.client.reviews.ListReviews(kpb.ListReviewsRequest(state="UNRESOLVED", page_size=20), timeout=10)
        with self.lock:  # (the kernel's own count, oldest first: it also sees the reviews tasks opened)
            self.waiting_reviews = sum(review.state == "OPEN" for review in page.reviews)

    def _start_task(self, n: int) -> None:
        request = make_request("claims_triage", self.requests[(n * 7) % 1000], tenant="soak",
                               idempotency_key=f"soak-task-{n}")
        task = self.client.tasks.StartTask(kpb.StartTaskRequest(request=request), timeout=10)
        with self.lock:
            self.tasks.append(task.task_id)

    def _get_task(self, n: int) -> bool | None:
        with self.lock:
            task_id = self.tasks[n % len(self.tasks)] if self.tasks else None
        if task_id is None:
            return False  # (no task yet: the first second or so)
        self.client.tasks.GetTask(kpb.TaskRef(task_id=task_id), timeout=10)

    def _resolve(self, n: int) -> bool | None:
        with self.lock:
            self.waiting_reviews = max(0, self.waiting_reviews - 1)
        try:
            review = self.client.reviews.ClaimNextReview(
                kpb.ClaimNextReviewRequest(reviewer=f"soak-{n % 3}", lease_seconds=300), timeout=10)
        except grpc.RpcError as error:
            self.count("claim-next", error.code().name)
            return False  # (nothing to resolve: not counted as a resolve)
        self.count("claim-next", "OK")
        action = review.actions[n % len(review.actions)] if review.actions else "approve"
        self.client.reviews.ResolveReview(kpb.ResolveReviewRequest(
            review_id=review.review_id, reviewer=review.claimed_by, action=action, comment="soak"), timeout=10)
        # (counted by run() as "resolve": claim-next is counted here)

    def _audit(self, n: int) -> None:
        with self.lock:
            start = max(0, self.last_sequence - 100)
        call = self.client.audit.StreamAudit(kpb.StreamAuditRequest(from_sequence=start), timeout=10)
        try:
            for read, _ in enumerate(call, 1):
                if read >= 200:
                    break  # (the log grows while it is read: a read that does not follow ends, but stop it early)
        finally:
            call.cancel()  # (a no-op once it has ended)

    def close(self) -> None:
        self.client.close()
        self.oip.close()


def slope_mib_per_h(samples: list[dict], since_s: float) -> float | None:
    """Least-squares slope of VmRSS over the samples taken at or after ``since_s``, in MiB per hour."""
    points = [(s["elapsed_s"], s["VmRSS"]) for s in samples if s["elapsed_s"] >= since_s]
    if len(points) < 3:
        return None
    t, rss = np.array(points).T
    return round(float(np.polyfit(t, rss, 1)[0]) * 3600, 1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--seconds", type=float, default=None, help="the run's length in seconds instead (tests)")
    parser.add_argument("--rate", type=float, default=40.0,
                        help="call slots a second (default 40; a reviewer's slot makes two calls, claim and resolve)")
    parser.add_argument("--interval", type=float, default=60.0, help="seconds between samples (default 60)")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="put into the kernel's environment (repeatable), e.g. MALLOC_ARENA_MAX=2")
    parser.add_argument("--front-end", dest="front_end", choices=("auto", "sync", "aio"), default="auto")
    parser.add_argument("--label", default="soak", help="names the result file and the log")
    parser.add_argument("--port", type=int, default=0, help="the kernel's port (default 0: any free one)")
    parser.add_argument("--models", type=Path, default=None,
                        help="model repository (default examples/claims/models if built, else built into the temp dir)")
    parser.add_argument("--data-parent", dest="data_parent", default=None, help="where the temp data dir goes")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "out")
    args = parser.parse_args(argv)
    extra_env = {}
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            parser.error(f"--env takes KEY=VALUE, got {item!r}")
        extra_env[key] = value
    if not re.fullmatch(r"[\w.-]+", args.label):
        parser.error("--label: letters, digits, '.', '_' and '-' only (it names files)")
    duration = args.seconds if args.seconds is not None else args.minutes * 60
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    args.out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="aios-soak-", dir=args.data_parent))
    models = args.models or REPO_ROOT / "examples" / "claims" / "models"
    if args.models is None and not (models / "claims_triage" / "1" / "model.onnx").is_file():
        models = scratch / "models"  # (the small model only: built in about a second)
        build_models.build(models, models=build_models.MODELS[:1], log=lambda line: None)
    served = sorted(p.name for p in models.iterdir() if (p / "1" / "model.onnx").is_file())
    data_dir = scratch / "data"
    env = {**os.environ, "AIOS_AUDIT_STREAM_ENABLED": "true", **extra_env}
    argv_kernel = [procs.python(), "-m", "kernel", "serve", "--models", str(models),
                   "--pipelines", str(REPO_ROOT / "examples" / "claims" / "pipelines"), "--data-dir", str(data_dir),
                   "--port", str(args.port), "--front-end", args.front_end]
    log_path = args.out / "logs" / f"soak-{stamp}-{args.label}.log"
    command = "python -m bench.soak " + " ".join(argv if argv is not None else sys.argv[1:])
    server = procs.start_server(args.label, argv_kernel, READY, log_path, cpu=None, env=env, cwd=REPO_ROOT)
    # What the kernel really runs with (an inherited MALLOC_ARENA_MAX would spoil an A/B without a word).
    environ = dict(item.split("=", 1) for item in Path(f"/proc/{server.pid}/environ").read_text().split("\0")
                   if "=" in item)
    kernel_env = {k: v for k, v in sorted(environ.items()) if k.startswith(("MALLOC_", "AIOS_", "GLIBC_"))}
    start_line = next((line for line in server.log_text().splitlines() if "listening on" in line), "")
    print(f"soak {args.label}: kernel pid {server.pid} on {server.url}, {duration:.0f} s at {args.rate:g} call slots/s, "
          f"env {kernel_env}, log {log_path}\n  {start_line.strip()}", flush=True)
    load = None
    pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="soak")
    in_flight = threading.Semaphore(MAX_IN_FLIGHT)
    rng = random.Random(7)  # (the same sequence of calls every run)
    samples: list[dict] = []
    skipped = 0
    exit_code = None
    started = time.monotonic()
    cpu_kernel0, cpu_self0 = server.cpu_seconds(), time.process_time()

    def submit(call: str) -> bool:
        if not in_flight.acquire(blocking=False):
            return False

        def task() -> None:
            try:
                load.run(call)
            finally:
                in_flight.release()
        pool.submit(task)
        return True

    def sample(now: float) -> dict:
        status = proc_status(server.pid)
        with load.lock:
            counts = dict(load.counts)
            decisions = dict(load.decisions)
        ok = sum(v for (_, code), v in counts.items() if code == "OK")
        expected = {f"{c} {code}": v for (c, code), v in counts.items() if (c, code) in EXPECTED}
        failed = collections.Counter()
        for (call, code), v in counts.items():
            if code != "OK" and (call, code) not in EXPECTED:
                failed[code] += v
        elapsed = now - started
        per_s = 1 / elapsed if elapsed > 0.5 else 0.0  # (the idle sample at 0 has no rate)
        row = {"elapsed_s": round(elapsed, 1), **status, "fds": len(os.listdir(f"/proc/{server.pid}/fd")),
               "data_mb": disk_mb(data_dir), "ok": ok, "failed": dict(failed), "expected": expected,
               "skipped": skipped, "decisions": decisions,
               "kernel_cpu_cores": round((server.cpu_seconds() - cpu_kernel0) * per_s, 3),
               "soak_cpu_cores": round((time.process_time() - cpu_self0) * per_s, 3)}
        samples.append(row)
        print(f"[{elapsed / 60:6.1f} min] ok {ok:,} failed {sum(failed.values())} {dict(failed) or ''}"
              f"| rss {row['VmRSS']:.1f} MiB (peak {row['VmHWM']:.1f}, anon {row['RssAnon']:.1f}) "
              f"threads {row['Threads']} fds {row['fds']} data {row['data_mb']:,.1f} MB | cpu kernel "
              f"{row['kernel_cpu_cores']:.2f} soak {row['soak_cpu_cores']:.2f} cores", flush=True)
        return row

    try:
        load = Load(server.url, served)
        sample(started)  # (the idle kernel, before any call)
        tick = 1.0 / args.rate
        # (a run shorter than AUDIT_EVERY_S reads the log once too, half-way)
        next_call, next_sample = started, started + args.interval
        next_audit = started + min(AUDIT_EVERY_S, duration / 2)
        end = started + duration
        while True:
            now = time.monotonic()
            if now >= end or not server.alive():
                break
            if now >= next_sample:
                sample(now)
                next_sample += args.interval
            if now >= next_call:
                if now >= next_audit:
                    call, next_audit = "audit", next_audit + AUDIT_EVERY_S
                elif load.waiting_reviews > REVIEW_BACKLOG:
                    call = "resolve"
                else:
                    call = rng.choice(MIX)
                skipped += not submit(call)
                next_call += tick
                continue
            time.sleep(min(next_call, next_sample, end) - now)  # (until the next call or sample is due)
        pool.shutdown(wait=True)  # (the calls in flight finish and are counted)
        alive = server.alive()
        if alive:
            sample(time.monotonic())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        if load is not None:
            load.close()
        exit_code = server.stop(timeout=120)
    problems = [line for line in server.log_text().splitlines() if LOG_PROBLEM.search(line)]
    final = samples[-1]
    failures = sum(final["failed"].values())
    by_call = collections.defaultdict(dict)
    for (call, code), v in sorted(load.counts.items()):
        by_call[call][code] = v
    report = {
        "command": command, "machine": machine_facts(command), "label": args.label, "rate": args.rate,
        "seconds": duration, "front_end": args.front_end, "start_line": start_line.strip(), "kernel_env": kernel_env,
        "extra_env": extra_env, "kernel_pid": server.pid, "kernel_alive_at_end": alive, "kernel_exit": exit_code,
        "log": str(log_path), "log_problems": problems[:200], "calls": by_call, "samples": samples,
        "rss_slope_last_half_mib_per_h": slope_mib_per_h(samples, duration / 2),
    }
    path = args.out / f"soak-{stamp}-{args.label}.json"
    path.write_text(json.dumps(report, indent=2))
    shutil.rmtree(scratch, ignore_errors=True)
    first = samples[0]
    print(f"soak {args.label} done: {duration / 60:.1f} min, ok {final['ok']:,}, failed {failures} "
          f"{final['failed'] if failures else ''}, expected {final['expected'] or '{}'}, skipped {final['skipped']}; rss "
          f"{first['VmRSS']:.1f} -> {final['VmRSS']:.1f} MiB (peak {final['VmHWM']:.1f}), slope over the last half "
          f"{report['rss_slope_last_half_mib_per_h']} MiB/h; threads {first['Threads']} -> {final['Threads']}, fds "
          f"{first['fds']} -> {final['fds']}; kernel exit {exit_code}, {len(problems)} WARNING/ERROR lines; {path}")
    for line in problems[:20]:
        print(f"  log: {line}")
    return 0 if failures == 0 and exit_code == 0 and not problems and alive else 1


if __name__ == "__main__":
    sys.exit(procs.run_main("soak", main))
