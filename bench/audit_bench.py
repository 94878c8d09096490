"""Audit log durability cost: group-commit fsync vs one fsync per record, in one run.

    python -m bench.audit_bench [--rounds 5] [--seconds 2] [--cpu 0] [--threads 64] [--paced 2000,10000]

Contenders (the same ``AuditLog`` code, fsync mode, default settings except):

- ``group``:  group commit (group_max 4096, group_ms 1): one fdatasync per group.
- ``single``: group_max 1: one fdatasync per record (the baseline).

Workloads, each run in a fresh subprocess pinned to one core (``--cpu``), on a
new log directory under ``bench/out/`` (the work disk), records of ~700 bytes
shaped like a decision's (provenance, inputs, class scores):

- ``bulk``:  one thread appends chunks of 1,000 records without waiting per
  record and waits for each chunk's last ticket (how the decision engine
  audits a group). Records/s over the window.
- ``threads``: ``--threads`` (64) threads, each ``append_and_wait`` in a loop
  (closed loop: the unary front end with that many callers). Records/s and
  the latency of each call (append -> durable), p50/p99/p99.9.
- ``paced``: open loop at each ``--paced`` rate: one thread appends each
  record at its scheduled time, another waits on the tickets in order.
  Latency from the scheduled time (no coordinated omission) and from the
  append itself: the latency auditing adds to one decision.
- ``verify``: ``verify_directory`` over the bulk ``group`` log of the round:
  records/s.
- ``floor``: the ``threads`` hand-offs without the log: each of the threads
  queues a held lock and blocks on it, one thread fdatasyncs per drained
  group and releases them. The ceiling for ``threads`` on one core.

Rounds alternate the contenders (group, single, group, single, ...) per
workload; the report gives medians, min-max and the median of per-round
ratios. Results: ``bench/out/audit-<UTC stamp>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
OUT = REPO_ROOT / "bench" / "out"
CONTENDERS = {"group": {"group_max": 4096, "group_ms": 1.0}, "single": {"group_max": 1, "group_ms": 1.0}}
CHUNK = 1000  # records per bulk chunk


# --------------------------------------------------------------------------- one run (in a subprocess)
def make_record():
    from kernel._proto.aios.kernel.v1 import kernel_pb2 as pb

    record = pb.AuditRecord(kind=pb.DECISION, principal="svc-claims", tenant="acme", request_id="req-0123456789",
                            idempotency_key="idem-0123456789", pipeline="claims_triage",
                            pipeline_version="3f2a9c0d11aa4b5e")
    decision = record.decision
    decision.request_id = "req-0123456789"
    decision.action = "approve"
    decision.outcome = pb.AUTOMATED
    decision.input_hash = "ab" * 32
    decision.policy_name = "claims"
    decision.policy_hash = "cd" * 32
    decision.reasons.add(rule_id="low_amount", description="amount under 1,000")
    decision.model.model_name = "claims_triage"
    decision.model.model_version = "1"
    decision.model.confidence = 0.93
    for label in ("approve", "review", "deny", "fraud"):
        decision.model.class_scores[label] = 0.25
        record.model_outputs[label] = 0.25
    for phase in ("validate", "queue", "model", "policy"):
        decision.phase_timings_ns[phase] = 123_456
    record.inputs["amount"].number_value = 812.5
    record.inputs["age_days"].int_value = 17
    record.inputs["text:description"].string_value = "sha256:" + "ef" * 32
    return record


def percentile(sorted_values: list[int], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))] / 1e6  # ms


def run_bulk(log, seconds: float) -> dict:
    pools = [[make_record() for _ in range(CHUNK)] for _ in range(2)]  # reused once durable
    count, turn = 0, 0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        pool = pools[turn & 1]
        turn += 1
        last = None
        for record in pool:
            record.time_unix_ns = 0
            last = log.append(record)
        last.wait(60)
        count += CHUNK
    elapsed = time.perf_counter() - started
    return {"records": count, "elapsed_s": elapsed, "records_per_s": count / elapsed}


def run_threads(log, seconds: float, threads: int) -> dict:
    latencies: list[list[int]] = [[] for _ in range(threads)]
    stop_at = time.perf_counter() + seconds
    start = threading.Barrier(threads + 1)

    def worker(index: int) -> None:
        record = make_record()
        mine = latencies[index]
        clock = time.perf_counter_ns
        start.wait()
        while time.perf_counter() < stop_at:
            record.time_unix_ns = 0
            begun = clock()
            log.append_and_wait(record, 60)
            mine.append(clock() - begun)

    workers = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for thread in workers:
        thread.start()
    start.wait()
    started = time.perf_counter()
    for thread in workers:
        thread.join()
    elapsed = time.perf_counter() - started
    merged = sorted(value for mine in latencies for value in mine)
    return {"records": len(merged), "elapsed_s": elapsed, "records_per_s": len(merged) / elapsed,
            "p50_ms": percentile(merged, 0.5), "p99_ms": percentile(merged, 0.99),
            "p999_ms": percentile(merged, 0.999), "max_ms": merged[-1] / 1e6 if merged else float("nan")}


def run_paced(log, seconds: float, rate: float) -> dict:
    """Open loop: one sender appends each record at its scheduled time (append never blocks); one
    collector waits on the tickets in order (they complete in order) and stamps each completion.
    Latency from the scheduled time covers any lateness of the sender (no coordinated omission);
    latency from the actual append is the log's own added latency."""
    pool = [make_record() for _ in range(4096)]
    tickets = [None] * len(pool)
    pending: deque = deque()
    more = threading.Condition()
    finished = []
    interval_ns = int(1e9 / rate)
    clock = time.perf_counter_ns
    t0 = clock() + 50_000_000
    count = int(seconds * rate)

    def send() -> None:
        for k in range(count):
            scheduled = t0 + k * interval_ns
            now = clock()
            if now < scheduled:
                time.sleep((scheduled - now) / 1e9)
            slot = k % len(pool)
            if tickets[slot] is not None:
                tickets[slot].wait(60)  # never reuse a record the log has not finished with
            record = pool[slot]
            record.time_unix_ns = 0
            begun = clock()
            tickets[slot] = ticket = log.append(record)
            with more:
                pending.append((scheduled, begun, ticket))
                more.notify()

    def collect() -> None:
        for _ in range(count):
            with more:
                more.wait_for(lambda: pending)
                scheduled, begun, ticket = pending.popleft()
            ticket.wait(60)
            done = clock()
            finished.append((done - scheduled, done - begun, begun - scheduled))

    threads = [threading.Thread(target=send), threading.Thread(target=collect)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    from_schedule = sorted(entry[0] for entry in finished)
    from_send = sorted(entry[1] for entry in finished)
    return {"records": len(finished), "offered_per_s": rate, "records_per_s": len(finished) / seconds,
            "p50_ms": percentile(from_schedule, 0.5), "p90_ms": percentile(from_schedule, 0.9),
            "p99_ms": percentile(from_schedule, 0.99), "p999_ms": percentile(from_schedule, 0.999),
            "max_ms": from_schedule[-1] / 1e6,
            "send_p50_ms": percentile(from_send, 0.5), "send_p99_ms": percentile(from_send, 0.99),
            "send_p999_ms": percentile(from_send, 0.999),
            "max_send_lag_ms": max(entry[2] for entry in finished) / 1e6}


def run_floor(directory: Path, seconds: float, threads: int) -> dict:
    """The same thread hand-offs as ``threads`` with no record work: each caller queues a held lock and
    blocks on it; one writer thread drains the queue, appends a byte and fdatasyncs, releases the locks.
    What one core can do at all with that many Python threads waking per fsync group."""
    directory.mkdir(parents=True)
    fd = os.open(directory / "floor", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    queue: deque = deque()
    work = threading.Event()
    stop_at = time.perf_counter() + seconds
    done = [0] * threads
    running = [True]

    def writer() -> None:
        while running[0]:
            work.wait(0.01)
            work.clear()
            group = []
            while queue:
                group.append(queue.popleft())
            if group:
                os.write(fd, b"x")
                os.fdatasync(fd)
                for waiter in group:
                    waiter.release()

    def caller(index: int) -> None:
        count = 0
        while time.perf_counter() < stop_at:
            waiter = threading.Lock()
            waiter.acquire()
            queue.append(waiter)
            work.set()
            waiter.acquire()
            count += 1
        done[index] = count

    background = threading.Thread(target=writer)
    background.start()
    callers = [threading.Thread(target=caller, args=(i,)) for i in range(threads)]
    started = time.perf_counter()
    for thread in callers:
        thread.start()
    for thread in callers:
        thread.join()
    elapsed = time.perf_counter() - started
    running[0] = False
    background.join()
    os.close(fd)
    return {"records": sum(done), "elapsed_s": elapsed, "records_per_s": sum(done) / elapsed}


def one_run(args) -> dict:
    os.sched_setaffinity(0, {args.cpu})
    from kernel.audit import AuditLog, verify_directory

    directory = Path(args.dir)
    if args.workload == "floor":
        return run_floor(directory, args.seconds, args.threads)
    if args.workload == "verify":
        result = verify_directory(directory)
        if not result.ok:
            raise SystemExit(f"verify failed: {result.describe()}")
        return {"records": result.records, "elapsed_s": result.elapsed_s,
                "records_per_s": result.records / result.elapsed_s}
    log = AuditLog.open(directory, **CONTENDERS[args.contender])
    cpu_started = time.process_time()
    try:
        if args.workload == "bulk":
            result = run_bulk(log, args.seconds)
        elif args.workload == "threads":
            result = run_threads(log, args.seconds, args.threads)
        else:
            result = run_paced(log, args.seconds, args.rate)
        stats = log.stats()
    finally:
        log.close()
    result["cpu_s"] = time.process_time() - cpu_started
    result["groups"] = stats["groups"]
    result["records_per_group"] = stats["size"] / max(stats["groups"], 1)
    result["checkpoints"] = stats["checkpoints"]
    result["slowest_fsync_ms"] = stats["slowest_sync_ns"] / 1e6
    return result


# --------------------------------------------------------------------------- driver
def spawn(workload: str, contender: str, directory: Path, args, rate: float = 0.0) -> dict:
    command = [sys.executable, "-m", "bench.audit_bench", "--run", workload, "--contender", contender,
               "--dir", str(directory), "--seconds", str(args.seconds), "--cpu", str(args.cpu),
               "--threads", str(args.threads), "--rate", str(rate)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def fsync_probe(directory: Path, count: int = 300) -> dict:
    """fdatasync latency of this disk, appending 512 bytes each time (the single contender's pattern)."""
    path = directory / "fsync-probe"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    samples = []
    try:
        for _ in range(count):
            os.write(fd, b"x" * 512)
            begun = time.perf_counter_ns()
            os.fdatasync(fd)
            samples.append(time.perf_counter_ns() - begun)
    finally:
        os.close(fd)
        path.unlink()
    samples.sort()
    return {"p50_ms": percentile(samples, 0.5), "p99_ms": percentile(samples, 0.99)}


def summarize(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=2.0, help="measurement window per run")
    parser.add_argument("--cpu", type=int, default=0, help="the core every run is pinned to")
    parser.add_argument("--threads", type=int, default=64, help="closed-loop appender threads")
    parser.add_argument("--paced", default="500,2000,10000",
                        help="open-loop rates (records/s), comma-separated; the baseline runs at the lowest only")
    parser.add_argument("--run", choices=("bulk", "threads", "paced", "verify", "floor"), help=argparse.SUPPRESS)
    parser.add_argument("--contender", choices=tuple(CONTENDERS), default="group", help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    parser.add_argument("--rate", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run:
        args.workload = args.run
        print(json.dumps(one_run(args)))
        return 0

    from bench.frontends import machine_facts

    command = "python -m bench.audit_bench " + " ".join(argv if argv is not None else sys.argv[1:])
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    work = OUT / f"audit-{stamp}"
    work.mkdir(parents=True)
    facts = machine_facts(command)
    facts["versions"]["cryptography"] = _version("cryptography")
    facts["fsync_probe_start"] = fsync_probe(work)
    print(f"fdatasync probe (512 B appends): {facts['fsync_probe_start']}", flush=True)
    rates = [float(rate) for rate in args.paced.split(",") if rate]
    runs: list[dict] = []
    try:
        for round_number in range(args.rounds):
            for workload in ("bulk", "threads"):
                for contender in ("group", "single"):
                    directory = work / f"r{round_number}-{workload}-{contender}"
                    result = spawn(workload, contender, directory, args)
                    runs.append({"round": round_number, "workload": workload, "contender": contender, **result})
                    print(f"round {round_number} {workload:8} {contender:7} {result['records_per_s']:>10,.0f} rec/s "
                          f"({result['records_per_group']:.1f} rec/group, slowest fsync "
                          f"{result['slowest_fsync_ms']:.1f} ms)"
                          + (f" p99 {result['p99_ms']:.2f} ms" if "p99_ms" in result else ""), flush=True)
                    if workload == "threads" and contender == "single":
                        floor_dir = work / f"r{round_number}-floor"
                        floor = spawn("floor", "group", floor_dir, args)
                        runs.append({"round": round_number, "workload": "floor", "contender": "floor", **floor})
                        print(f"round {round_number} floor    {args.threads} threads, lock hand-offs + fdatasync only: "
                              f"{floor['records_per_s']:>10,.0f} /s", flush=True)
                        shutil.rmtree(floor_dir)
                    if workload == "bulk" and contender == "group":
                        verified = spawn("verify", "group", directory, args)
                        runs.append({"round": round_number, "workload": "verify", "contender": "verify", **verified})
                        print(f"round {round_number} verify   {verified['records']:>10,} records "
                              f"{verified['records_per_s']:>10,.0f} rec/s", flush=True)
                    shutil.rmtree(directory)
            for rate in rates:
                # One fsync per record saturates near 2-4k records/s here: it is paced only at the lowest rate.
                for contender in ("group", "single") if rate == min(rates) else ("group",):
                    directory = work / f"r{round_number}-paced{int(rate)}-{contender}"
                    result = spawn("paced", contender, directory, args, rate)
                    runs.append({"round": round_number, "workload": f"paced{int(rate)}", "contender": contender,
                                 **result})
                    print(f"round {round_number} paced {int(rate):>6}/s {contender:7} {result['records_per_s']:>8,.0f} "
                          f"rec/s p50 {result['p50_ms']:.2f} p99 {result['p99_ms']:.2f} p99.9 {result['p999_ms']:.2f}"
                          f" ms; from the actual send p50 {result['send_p50_ms']:.2f} p99 {result['send_p99_ms']:.2f} ms"
                          f" (send lag max {result['max_send_lag_ms']:.1f} ms, slowest fsync "
                          f"{result['slowest_fsync_ms']:.1f} ms)", flush=True)
                    shutil.rmtree(directory)
    finally:
        facts["fsync_probe_end"] = fsync_probe(work)
        print(f"fdatasync probe at the end: {facts['fsync_probe_end']}", flush=True)
        facts["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
        report = {"facts": facts, "runs": runs, "summary": report_tables(runs, rates)}
        out = OUT / f"audit-{stamp}.json"
        out.write_text(json.dumps(report, indent=1))
        shutil.rmtree(work, ignore_errors=True)
        print(f"\nresults: {out}")
    return 0


def report_tables(runs: list[dict], rates: list[float]) -> dict:
    def pick(workload: str, contender: str, key: str) -> dict[int, float]:
        return {r["round"]: r[key] for r in runs
                if r["workload"] == workload and r["contender"] == contender and key in r}

    summary = {}
    print("\n| workload | contender | records/s median (min-max) | rec/group | p50 ms | p99 ms | p99.9 ms "
          "| from the append: p50 ms | p99 ms |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    workloads = ["bulk", "threads"] + [f"paced{int(rate)}" for rate in rates]
    for workload in workloads:
        for contender in ("group", "single"):
            rate = pick(workload, contender, "records_per_s")
            if not rate:
                continue
            entry = {"records_per_s": summarize(list(rate.values())),
                     "records_per_group": summarize(list(pick(workload, contender, "records_per_group").values()))}
            cells = ["", "", "", "", ""]
            for index, key in enumerate(("p50_ms", "p99_ms", "p999_ms", "send_p50_ms", "send_p99_ms")):
                values = pick(workload, contender, key)
                if values:
                    entry[key] = summarize(list(values.values()))
                    cells[index] = f"{entry[key]['median']:.2f} ({entry[key]['min']:.2f}-{entry[key]['max']:.2f})"
            summary[f"{workload}/{contender}"] = entry
            r = entry["records_per_s"]
            print(f"| {workload} | {contender} | {r['median']:,.0f} ({r['min']:,.0f}-{r['max']:,.0f}) | "
                  f"{entry['records_per_group']['median']:.1f} | {' | '.join(cells)} |")
    print("\n| workload | group / single, median of per-round ratios (min-max) |")
    print("|---|---|")
    for workload in ("bulk", "threads"):
        group, single = pick(workload, "group", "records_per_s"), pick(workload, "single", "records_per_s")
        ratios = [group[r] / single[r] for r in group if r in single]
        if ratios:
            summary[f"{workload}/ratio"] = summarize(ratios)
            print(f"| {workload} | {statistics.median(ratios):.1f}x ({min(ratios):.1f}-{max(ratios):.1f}) |")
    floor = pick("floor", "floor", "records_per_s")
    if floor:
        summary["floor"] = summarize(list(floor.values()))
        group = pick("threads", "group", "records_per_s")
        shares = [group[r] / floor[r] for r in floor if r in group]
        summary["threads/floor"] = summarize(shares)
        print(f"\nfloor (thread hand-offs + fdatasync, no records): {summary['floor']['median']:,.0f}/s "
              f"({summary['floor']['min']:,.0f}-{summary['floor']['max']:,.0f}); threads/group reaches "
              f"{statistics.median(shares):.2f} of it ({min(shares):.2f}-{max(shares):.2f})")
    verify = pick("verify", "verify", "records_per_s")
    if verify:
        summary["verify"] = summarize(list(verify.values()))
        print(f"\nverify: {summary['verify']['median']:,.0f} records/s "
              f"({summary['verify']['min']:,.0f}-{summary['verify']['max']:,.0f})")
    return summary


def _version(package: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


if __name__ == "__main__":
    from bench import procs

    raise SystemExit(procs.run_main("audit_bench", main))
