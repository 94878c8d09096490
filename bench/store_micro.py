"""Costs of the local store (SQLite): the choices behind kernel/store/sqlite.py, measured.

    python -m bench.store_micro [--rounds 5] [--seconds 1.5] [--tasks 200] [--dir bench/out/store-tmp]

Three comparisons, each alternating its two contenders over ``--rounds``
rounds on fresh database files on the real disk (never tmpfs: fsync must
cost what it costs), reporting per-round values and the median ratio:

1. ``reads``: ListReviews-sized reads (``ReviewQueue.list``, 20 of 500
   reviews) on 2 threads while 1 thread commits durable task transitions
   back to back. Reads through a pool of read-only connections
   (``read_connections=2``, the default) vs reads sharing the writer's
   connection and lock (``read_connections=0``).
2. ``idempotency``: ``IdempotencyStore.put`` on one thread, ``durable=False``
   (the default: WAL, synchronous=NORMAL) vs ``durable=True`` (fsync per put).
3. ``tasks``: ``--tasks`` durable tasks through ``TaskRunner`` (2 workers,
   a run_fn that returns a Decision at once), submit to all SUCCEEDED, vs the
   floor: the same number of durable commits (3 per task: QUEUED, RUNNING,
   SUCCEEDED) of the same row size with raw sqlite3 on one connection.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sqlite3
import statistics
import threading
import time
from pathlib import Path

from kernel._proto.aios.kernel.v1 import kernel_pb2 as kpb
from kernel.review import ReviewQueue
from kernel.store import IdempotencyStore, open_database
from kernel.tasks import TaskRunner, TaskStore

ROOT = Path(__file__).resolve().parent.parent


def fresh(base: Path, name: str) -> Path:
    path = base / name
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def _request(n: int) -> kpb.DecisionRequest:
    req = kpb.DecisionRequest(pipeline="claims", tenant="acme", request_id=f"r{n}")
    req.fields["amount"].number_value = float(n)
    req.text_fields["note"] = "x" * 200
    return req


# -- 1. reads under a durable write load --------------------------------------------------------
def reads_round(base: Path, read_connections: int, seconds: float) -> dict:
    db = open_database(fresh(base, f"reads-{read_connections}"), read_connections=read_connections)
    queue, store = ReviewQueue(db), TaskStore(db)
    for n in range(500):
        queue.create(kpb.Decision(action="approve", outcome=kpb.ESCALATED), _request(n), ["approve", "deny"], 3600)
    task, _ = store.create(_request(0))
    stop = threading.Event()
    latencies: list[list[float]] = [[], []]
    writes = [0]

    def writer() -> None:
        state = kpb.QUEUED
        while not stop.is_set():
            target = kpb.RUNNING if state == kpb.QUEUED else kpb.QUEUED
            store.transition(task.task_id, target, (state,), "bench")
            state = target
            writes[0] += 1

    def reader(out: list[float]) -> None:
        while not stop.is_set():
            t0 = time.perf_counter()
            queue.list(state="OPEN", page_size=20)
            out.append(time.perf_counter() - t0)

    threads = [threading.Thread(target=writer)] + [threading.Thread(target=reader, args=(out,)) for out in latencies]
    for thread in threads:
        thread.start()
    time.sleep(seconds)  # the measurement window
    stop.set()
    for thread in threads:
        thread.join()
    db.close()
    reads = latencies[0] + latencies[1]
    return {"reads_per_s": len(reads) / seconds, "read_p50_ms": pct(reads, 0.5) * 1e3,
            "read_p99_ms": pct(reads, 0.99) * 1e3, "writes_per_s": writes[0] / seconds}


# -- 2. idempotency puts ------------------------------------------------------------------------
def idempotency_round(base: Path, durable: bool, seconds: float) -> dict:
    db = open_database(fresh(base, f"idem-{durable}"))
    store = IdempotencyStore(db, durable=durable)
    response = kpb.Decision(action="approve", request_id="r" * 32).SerializeToString()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        store.put("acme", f"key-{n}", "h" * 64, response)
        n += 1
    elapsed = time.perf_counter() - t0
    db.close()
    return {"puts_per_s": n / elapsed, "us_per_put": elapsed / n * 1e6}


# -- 3. task throughput vs raw durable commits ----------------------------------------------------
def tasks_round(base: Path, count: int) -> dict:
    db = open_database(fresh(base, "tasks"))
    store = TaskStore(db)

    def run_fn(task):
        return kpb.Decision(action="approve", request_id=task.request.request_id)

    runner = TaskRunner(store, run_fn, workers=2).start()
    watches = []
    t0 = time.perf_counter()
    for n in range(count):
        task = runner.submit(_request(n))
        watches.append(runner.watch(task.task_id, timeout_s=60))
    for watch in watches:
        for _task in watch:  # ends at SUCCEEDED
            pass
    elapsed = time.perf_counter() - t0
    runner.stop()
    db.close()
    return {"tasks_per_s": count / elapsed, "ms_per_task": elapsed / count * 1e3}


def raw_round(base: Path, count: int) -> dict:
    path = fresh(base, "raw") / "raw.sqlite3"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("CREATE TABLE t (id TEXT PRIMARY KEY, state INTEGER, body BLOB)")
    body = _request(0).SerializeToString() * 2  # about a task with its history
    t0 = time.perf_counter()
    for n in range(count):
        for state in (1, 2, 4):
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT OR REPLACE INTO t VALUES (?, ?, ?)", (str(n), state, body))
            conn.execute("COMMIT")
    elapsed = time.perf_counter() - t0
    conn.close()
    return {"tasks_per_s": count / elapsed, "ms_per_task": elapsed / count * 1e3}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=1.5)
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--dir", type=Path, default=ROOT / "bench" / "out" / "store-tmp")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw rounds here")
    args = parser.parse_args(argv)
    base = args.dir
    print(f"python {platform.python_version()}, sqlite {sqlite3.sqlite_version}, {os.cpu_count()} cpus, dir {base}")
    rounds = {"reads": [], "idempotency": [], "tasks": []}
    for r in range(args.rounds):
        # Alternate which contender goes first, so drift in the machine's load hits both.
        order = (2, 0) if r % 2 else (0, 2)
        reads = {rc: reads_round(base, rc, args.seconds) for rc in order}
        idem = {d: idempotency_round(base, d, args.seconds) for d in ((True, False) if r % 2 else (False, True))}
        pair = [("kernel", lambda: tasks_round(base, args.tasks)), ("raw", lambda: raw_round(base, args.tasks))]
        tasks = {name: run() for name, run in (pair[::-1] if r % 2 else pair)}
        rounds["reads"].append({"pool": reads[2], "shared": reads[0],
                                "p99_ratio_shared_over_pool": reads[0]["read_p99_ms"] / reads[2]["read_p99_ms"],
                                "reads_ratio_pool_over_shared": reads[2]["reads_per_s"] / reads[0]["reads_per_s"],
                                "writes_ratio_pool_over_shared": reads[2]["writes_per_s"] / reads[0]["writes_per_s"]})
        rounds["idempotency"].append({"normal": idem[False], "durable": idem[True],
                                      "ratio_normal_over_durable": idem[False]["puts_per_s"] / idem[True]["puts_per_s"]})
        rounds["tasks"].append({"kernel": tasks["kernel"], "raw": tasks["raw"],
                                "ratio_kernel_over_raw": tasks["kernel"]["tasks_per_s"] / tasks["raw"]["tasks_per_s"]})
        rr, ii, tt = rounds["reads"][-1], rounds["idempotency"][-1], rounds["tasks"][-1]
        print(f"round {r + 1}: reads/s pool {rr['pool']['reads_per_s']:.0f} shared {rr['shared']['reads_per_s']:.0f}"
              f" | read p99 ms pool {rr['pool']['read_p99_ms']:.2f} shared {rr['shared']['read_p99_ms']:.2f}"
              f" | writes/s pool {rr['pool']['writes_per_s']:.0f} shared {rr['shared']['writes_per_s']:.0f}"
              f" | puts/s normal {ii['normal']['puts_per_s']:.0f} durable {ii['durable']['puts_per_s']:.0f}"
              f" | tasks/s kernel {tt['kernel']['tasks_per_s']:.0f} raw {tt['raw']['tasks_per_s']:.0f}", flush=True)
    med = lambda key, name: statistics.median(x[name] for x in rounds[key])  # noqa: E731
    print("median ratios:")
    print(f"  reads/s, pool / shared:           {med('reads', 'reads_ratio_pool_over_shared'):.2f}x")
    print(f"  read p99, shared / pool:          {med('reads', 'p99_ratio_shared_over_pool'):.2f}x")
    print(f"  writes/s meanwhile, pool / shared: {med('reads', 'writes_ratio_pool_over_shared'):.2f}x")
    print(f"  idempotency puts/s, normal / durable: {med('idempotency', 'ratio_normal_over_durable'):.1f}x")
    print(f"  tasks/s, kernel / raw commits:    {med('tasks', 'ratio_kernel_over_raw'):.2f}x")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rounds, indent=1))
    shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
