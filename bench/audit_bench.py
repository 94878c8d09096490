"""Audit log durability cost: group-commit fsync vs one fsync per record, preallocated vs append-only segments.

    python -m bench.audit_bench [--rounds 5] [--seconds 2] [--cpu 0] [--threads 64] [--paced 2000,10000]
                                [--wait-idle 10] [--max-others 0.5]

Contenders (the same ``AuditLog`` code, fsync mode, default settings except):

- ``group``:  group commit (group_max 4096, group_ms 1): one fdatasync per group, into
  preallocated segments (the default: zeros written and synced ahead, so the fdatasync
  overwrites allocated blocks and commits no file-size change).
- ``append``: the same with ``preallocate_bytes=0``: every group appends (grows the file),
  so every fdatasync also commits the new size through the journal (the baseline for preallocation).
- ``single``: group_max 1: one fdatasync per record (the baseline for group commit).

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
- ``small``: one thread appends groups of 8 records with ``append_many(...,
  write_here=True)`` and waits for the last (how the Decide finisher audits a
  batch of ~8 decisions): each group is one write and one fdatasync, so the
  per-group cost shows here.
- ``verify``: ``verify_directory`` over the bulk ``group`` log of the round:
  records/s.
- ``floor``: the ``threads`` hand-offs without the log: each of the threads
  queues a held lock and blocks on it, one thread fdatasyncs per drained
  group and releases them. The ceiling for ``threads`` on one core.

Rounds alternate the contenders (group, append, single, group, ...) per
workload; the report gives medians, min-max and the median of per-round
ratios, with the process's CPU (user + system) per record and per group.
Before each round the driver waits for the machine to go idle
(``--wait-idle``); each run records the CPU other processes used meanwhile
("others") and is rerun (twice at most) when that exceeds ``--max-others``
cores. Results: ``bench/out/audit-<UTC stamp>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
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
CONTENDERS = {"group": {"group_max": 4096, "group_ms": 1.0},
              "append": {"group_max": 4096, "group_ms": 1.0, "preallocate_bytes": 0},
              "single": {"group_max": 1, "group_ms": 1.0}}
CHUNK = 1000  # records per bulk chunk
SMALL_GROUP = 8  # records per append_many in the small workload (a Decide batch)


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


def run_small(log, seconds: float) -> dict:
    pools = [[make_record() for _ in range(SMALL_GROUP)] for _ in range(2)]
    count, turn = 0, 0
    latencies = []
    clock = time.perf_counter_ns
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        pool = pools[turn & 1]
        turn += 1
        for record in pool:
            record.time_unix_ns = 0
        begun = clock()
        log.append_many(pool, write_here=True)[-1].wait(60)
        latencies.append(clock() - begun)
        count += SMALL_GROUP
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {"records": count, "elapsed_s": elapsed, "records_per_s": count / elapsed,
            "p50_ms": percentile(latencies, 0.5), "p99_ms": percentile(latencies, 0.99),
            "p999_ms": percentile(latencies, 0.999), "max_ms": latencies[-1] / 1e6}


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
    usage = resource.getrusage(resource.RUSAGE_SELF)
    try:
        if args.workload == "bulk":
            result = run_bulk(log, args.seconds)
        elif args.workload == "small":
            result = run_small(log, args.seconds)
        elif args.workload == "threads":
            result = run_threads(log, args.seconds, args.threads)
        else:
            result = run_paced(log, args.seconds, args.rate)
        stats = log.stats()
    finally:
        log.close()
    ended = resource.getrusage(resource.RUSAGE_SELF)
    user, system = ended.ru_utime - usage.ru_utime, ended.ru_stime - usage.ru_stime
    result["cpu_s"], result["user_s"], result["system_s"] = user + system, user, system
    written = stats["size"]  # this run's records (each run starts a fresh log), including any close flush
    result["cpu_us_per_record"] = (user + system) / max(written, 1) * 1e6
    result["system_us_per_record"] = system / max(written, 1) * 1e6
    result["cpu_us_per_group"] = (user + system) / max(stats["groups"], 1) * 1e6
    result["system_us_per_group"] = system / max(stats["groups"], 1) * 1e6
    result["groups"] = stats["groups"]
    result["records_per_group"] = stats["size"] / max(stats["groups"], 1)
    result["checkpoints"] = stats["checkpoints"]
    result["slowest_fsync_ms"] = stats["slowest_sync_ns"] / 1e6
    return result


# --------------------------------------------------------------------------- driver
def spawn(workload: str, contender: str, directory: Path, args, rate: float = 0.0) -> dict:
    """One run in a fresh subprocess; rerun (on a fresh directory) while other processes used more than
    ``--max-others`` cores during it. The result carries ``others_cores`` and ``attempts``."""
    command = [sys.executable, "-m", "bench.audit_bench", "--run", workload, "--contender", contender,
               "--dir", str(directory), "--seconds", str(args.seconds), "--cpu", str(args.cpu),
               "--threads", str(args.threads), "--rate", str(rate)]
    from bench.frontends import busy_seconds

    for attempt in range(1, args.retries + 2):
        if directory.exists() and workload != "verify":
            shutil.rmtree(directory)
        children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        busy0, wall0 = busy_seconds(), time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, timeout=600)
        wall = time.perf_counter() - wall0
        children1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr}")
        ours = (children1.ru_utime - children0.ru_utime) + (children1.ru_stime - children0.ru_stime)
        others = max(0.0, (busy_seconds() - busy0 - ours) / wall)
        result = json.loads(done.stdout.strip().splitlines()[-1])
        result["others_cores"], result["attempts"] = round(others, 2), attempt
        if others <= args.max_others:
            break
    return result


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
    parser.add_argument("--wait-idle", type=float, default=10.0,
                        help="before each round, wait up to this many seconds for the machine to go idle (0: don't)")
    parser.add_argument("--max-others", type=float, default=0.5,
                        help="rerun a run during which other processes used more than this many cores")
    parser.add_argument("--retries", type=int, default=2, help="reruns of a disturbed run, at most")
    parser.add_argument("--run", choices=("bulk", "small", "threads", "paced", "verify", "floor"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--contender", choices=tuple(CONTENDERS), default="group", help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    parser.add_argument("--rate", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run:
        args.workload = args.run
        print(json.dumps(one_run(args)))
        return 0

    from bench.frontends import machine_facts, wait_idle

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

    def record(round_number: int, workload: str, contender: str, result: dict) -> None:
        runs.append({"round": round_number, "workload": workload, "contender": contender, **result})
        latency = f" p50 {result['p50_ms']:.2f} p99 {result['p99_ms']:.2f} p99.9 {result['p999_ms']:.2f} ms" \
            if "p50_ms" in result else ""
        print(f"round {round_number} {workload:10} {contender:7} {result['records_per_s']:>10,.0f} rec/s "
              f"({result['records_per_group']:.1f} rec/group, CPU {result['cpu_us_per_record']:.1f} us/rec "
              f"{result['cpu_us_per_group']:.0f} us/group (sys {result['system_us_per_group']:.0f}), slowest fsync "
              f"{result['slowest_fsync_ms']:.1f} ms, others {result['others_cores']:.2f} cores"
              f"{', attempt ' + str(result['attempts']) if result['attempts'] > 1 else ''}){latency}", flush=True)

    try:
        for round_number in range(args.rounds):
            if args.wait_idle > 0:
                wait_idle(args.wait_idle)
            for workload in ("bulk", "small", "threads"):
                for contender in ("group", "append", "single") if workload != "small" else ("group", "append"):
                    directory = work / f"r{round_number}-{workload}-{contender}"
                    record(round_number, workload, contender, spawn(workload, contender, directory, args))
                    if workload == "threads" and contender == "single":
                        floor_dir = work / f"r{round_number}-floor"
                        floor = spawn("floor", "group", floor_dir, args)
                        runs.append({"round": round_number, "workload": "floor", "contender": "floor", **floor})
                        print(f"round {round_number} floor      {args.threads} threads, lock hand-offs + fdatasync "
                              f"only: {floor['records_per_s']:>10,.0f} /s", flush=True)
                        shutil.rmtree(floor_dir)
                    if workload == "bulk" and contender == "group":
                        verified = spawn("verify", "group", directory, args)
                        runs.append({"round": round_number, "workload": "verify", "contender": "verify", **verified})
                        print(f"round {round_number} verify     {verified['records']:>10,} records "
                              f"{verified['records_per_s']:>10,.0f} rec/s", flush=True)
                    shutil.rmtree(directory)
            for rate in rates:
                # One fsync per record saturates near 2-4k records/s here: it is paced only at the lowest rate.
                for contender in ("group", "append", "single") if rate == min(rates) else ("group", "append"):
                    directory = work / f"r{round_number}-paced{int(rate)}-{contender}"
                    result = spawn("paced", contender, directory, args, rate)
                    record(round_number, f"paced{int(rate)}", contender, result)
                    print(f"    from the actual send p50 {result['send_p50_ms']:.2f} p99 {result['send_p99_ms']:.2f} ms"
                          f" (send lag max {result['max_send_lag_ms']:.1f} ms)", flush=True)
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

    def cell(entry: dict, digits: int = 2) -> str:
        return f"{entry['median']:,.{digits}f} ({entry['min']:,.{digits}f}-{entry['max']:,.{digits}f})"

    summary = {}
    print("\n| workload | contender | records/s median (min-max) | rec/group | CPU us/record | CPU us/group "
          "| of it system | p50 ms | p99 ms | p99.9 ms | from the append: p50 ms | p99 ms |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    workloads = ["bulk", "small", "threads"] + [f"paced{int(rate)}" for rate in rates]
    for workload in workloads:
        for contender in ("group", "append", "single"):
            rate = pick(workload, contender, "records_per_s")
            if not rate:
                continue
            entry = {"records_per_s": summarize(list(rate.values()))}
            for key in ("records_per_group", "cpu_us_per_record", "cpu_us_per_group", "system_us_per_group",
                        "p50_ms", "p99_ms", "p999_ms", "send_p50_ms", "send_p99_ms"):
                values = pick(workload, contender, key)
                if values:
                    entry[key] = summarize(list(values.values()))
            summary[f"{workload}/{contender}"] = entry
            cells = [cell(entry[key]) if key in entry else "" for key in
                     ("p50_ms", "p99_ms", "p999_ms", "send_p50_ms", "send_p99_ms")]
            print(f"| {workload} | {contender} | {cell(entry['records_per_s'], 0)} | "
                  f"{entry['records_per_group']['median']:.1f} | {entry['cpu_us_per_record']['median']:.2f} | "
                  f"{entry['cpu_us_per_group']['median']:.0f} | {entry['system_us_per_group']['median']:.0f} | "
                  f"{' | '.join(cells)} |")

    def ratios(workload: str, key: str, a: str, b: str) -> list[float]:
        first, second = pick(workload, a, key), pick(workload, b, key)
        return [first[r] / second[r] for r in first if r in second and second[r]]

    print("\n| workload | group / single: records/s | group / append: records/s | group / append: CPU per record "
          "| group / append: CPU per group | group / append: p99 latency |")
    print("|---|---|---|---|---|---|")
    for workload in workloads:
        row = []
        for key, a, b in (("records_per_s", "group", "single"), ("records_per_s", "group", "append"),
                          ("cpu_us_per_record", "group", "append"), ("cpu_us_per_group", "group", "append"),
                          ("p99_ms", "group", "append")):
            values = ratios(workload, key, a, b)
            if values:
                summary[f"{workload}/{a}-over-{b}/{key}"] = summarize(values)
                row.append(f"{statistics.median(values):.2f}x ({min(values):.2f}-{max(values):.2f})")
            else:
                row.append("")
        print(f"| {workload} | {' | '.join(row)} |")
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
    others = [r["others_cores"] for r in runs if "others_cores" in r]
    if others:
        summary["others_cores"] = summarize(others)
        print(f"\nothers' CPU during the runs: median {statistics.median(others):.2f} cores, max {max(others):.2f}; "
              f"{sum(1 for r in runs if r.get('attempts', 1) > 1)} runs were rerun")
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
