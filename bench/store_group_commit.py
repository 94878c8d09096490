"""Group commit in the local store: reviews created per second, grouped vs one fsync per write.

    python -m bench.store_group_commit [--rounds 5] [--seconds 2] [--threads 16] [--dir bench/out/gc-tmp]

Each round runs every contender once on a fresh database on the real disk
(never tmpfs: fsync must cost what it costs), in an order that rotates from
round to round so drift in the machine's load hits all of them; the report
gives per-round values and median ratios.

- ``group``: ``--threads`` threads call ``ReviewQueue.create`` back to back
  (the Decide hot path: one create per escalated decision, from many handler
  threads); the database group-commits (the default, ``group_max=256``).
- ``single``: the same, with ``group_max=1``: every create is its own
  transaction and fsync (what the store did before group commit).
- ``group_1t`` / ``single_1t``: the same on one thread, where nothing can be
  grouped: what group commit costs a lone writer.
- ``many``: one thread calls ``ReviewQueue.create_many`` with ``--threads``
  items per call (how the decision engine hands over a finished group).

Every create is durable when it returns, in every contender. Reported per
contender: creates/s, per-call latency p50/p99, commits (= fsyncs) per
create.
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
from kernel.store import open_database

ROOT = Path(__file__).resolve().parent.parent
ACTIONS = ["approve", "deny", "refer"]


def _case(n: int) -> tuple[kpb.Decision, kpb.DecisionRequest]:
    request = kpb.DecisionRequest(pipeline="claims_triage", tenant="acme", request_id=f"r{n}")
    request.fields["amount"].number_value = 1234.5 + n
    request.fields["channel"].string_value = "web"
    request.text_fields["note"] = "x" * 200
    decision = kpb.Decision(request_id=request.request_id, pipeline="claims_triage", tenant="acme",
                            action="approve", outcome=kpb.ESCALATED)
    decision.escalation_reasons.append("model confidence 0.612 is below the pipeline's 0.8")
    decision.model.model_name, decision.model.confidence = "claims_clf", 0.612
    decision.model.class_scores.update({"approve": 0.612, "deny": 0.3, "refer": 0.088})
    return decision, request


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def run_contender(base: Path, name: str, threads: int, batch: int, group_max: int, seconds: float) -> dict:
    path = base / name
    shutil.rmtree(path, ignore_errors=True)
    db = open_database(path, group_max=group_max)
    queue = ReviewQueue(db)
    cases = [_case(n) for n in range(64)]
    stop = threading.Event()
    start = threading.Barrier(threads + 1)
    latencies: list[list[float]] = [[] for _ in range(threads)]
    created = [0] * threads

    def worker(k: int) -> None:
        out, n = latencies[k], 0
        start.wait()
        while not stop.is_set():
            t0 = time.perf_counter()
            if batch:
                items = [(*cases[(n + i) % len(cases)], ACTIONS, 3600.0) for i in range(batch)]
                queue.create_many(items)
                n += batch
            else:
                decision, request = cases[n % len(cases)]
                queue.create(decision, request, ACTIONS, 3600.0)
                n += 1
            out.append(time.perf_counter() - t0)
        created[k] = n

    workers = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
    for thread in workers:
        thread.start()
    commits0 = db.commits
    start.wait()
    t0 = time.perf_counter()
    stop.wait(seconds)  # the measurement window
    stop.set()
    for thread in workers:
        thread.join()
    elapsed = time.perf_counter() - t0
    stats = db.stats()
    db.close()
    shutil.rmtree(path, ignore_errors=True)
    calls = [x for out in latencies for x in out]
    total = sum(created)
    return {"creates_per_s": total / elapsed, "creates": total, "call_p50_ms": pct(calls, 0.5) * 1e3,
            "call_p99_ms": pct(calls, 0.99) * 1e3, "commits": stats["commits"] - commits0,
            "commits_per_create": (stats["commits"] - commits0) / max(1, total),
            "largest_group": stats["largest_group"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--dir", type=Path, default=ROOT / "bench" / "out" / "gc-tmp")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw rounds here")
    args = parser.parse_args(argv)
    n = args.threads
    contenders = {  # name -> (threads, create_many batch (0 = create), group_max)
        "group": (n, 0, 256), "single": (n, 0, 1), "group_1t": (1, 0, 256), "single_1t": (1, 0, 1),
        "many": (1, n, 256),
    }
    names = list(contenders)
    print(f"python {platform.python_version()}, sqlite {sqlite3.sqlite_version}, {os.cpu_count()} cpus, "
          f"{n} threads, dir {args.dir}")
    rounds = []
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]  # rotate who goes first
        result = {name: run_contender(args.dir, name, *contenders[name], args.seconds) for name in order}
        rounds.append(result)
        print(f"round {r + 1}: " + " | ".join(
            f"{name} {result[name]['creates_per_s']:.0f}/s ({result[name]['commits_per_create']:.3f} commits/create,"
            f" p99 {result[name]['call_p99_ms']:.1f} ms)" for name in names), flush=True)

    def ratio(a: str, b: str) -> float:
        return statistics.median(x[a]["creates_per_s"] / x[b]["creates_per_s"] for x in rounds)

    print("median ratios (creates/s):")
    print(f"  {n} threads, group commit / one fsync per write: {ratio('group', 'single'):.2f}x")
    print(f"  1 thread,   group commit / one fsync per write: {ratio('group_1t', 'single_1t'):.2f}x")
    print(f"  create_many({n}) on 1 thread / {n} threads one fsync each: {ratio('many', 'single'):.2f}x")
    for name in names:
        print(f"  {name}: median {statistics.median(x[name]['creates_per_s'] for x in rounds):.0f} creates/s, "
              f"{statistics.median(x[name]['commits_per_create'] for x in rounds):.3f} commits/create, p50 "
              f"{statistics.median(x[name]['call_p50_ms'] for x in rounds):.2f} ms, p99 "
              f"{statistics.median(x[name]['call_p99_ms'] for x in rounds):.2f} ms per call")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rounds, indent=1))
    shutil.rmtree(args.dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
