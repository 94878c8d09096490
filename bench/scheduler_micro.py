"""Decision cost of the scheduler per request: the Cython core vs the Python reference.

    python -m bench.scheduler_micro [--queued 1000] [--rounds 2000] [--pairs 5]

Workload (the same for both, in one process, alternating A B A B): one model,
max_batch_size 8, three priority levels, a deadline on half the items; the
queue is pre-filled to ``--queued`` items and held there: each round submits
8 items, takes one batch of 8 and completes it. Cost per request = round time
/ 8, covering submit, the batch decision, batch assembly and completion.
tests/bench/test_scheduler_micro.py runs the same workload under pytest-benchmark.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

from kernel.scheduling import implementations
from kernel.scheduling.policy import ModelSchedule
from kernel.scheduling.types import PyWorkItem

ROWS_PER_BATCH = 8


class Model:
    name, version = "bench", "1"


def prepare(cls, queued: int, rounds: int = 200_000):
    """A scheduler holding ``queued`` items, and a function running one round.

    Items are built up front (``rounds`` rounds' worth, reused cyclically once
    completed), so a round times the scheduler, not WorkItem construction.
    """
    sched = cls()
    model = Model()
    sched.add_model(model, ModelSchedule(max_batch_size=ROWS_PER_BATCH, priority_levels=3, max_queue=queued * 4))
    for rows, ns in ((1, 50_000), (8, 120_000)):
        sched.observe(model, rows, ns)
    clock = [10**12]
    counter = [0]

    def make_item():
        counter[0] += 1
        k = counter[0]
        item = cls.item_class(model, 1, (), None, request_id="", priority=1 + k % 3,
                        deadline_ns=(clock[0] + 10**12 + k) if k & 1 else 0)
        item.enqueued_ns = clock[0]
        return item

    for _ in range(queued):
        sched.submit(make_item(), clock[0])
    pool = [make_item() for _ in range(ROWS_PER_BATCH * min(rounds, 20_000))]
    position = [0]

    def one_round() -> None:
        clock[0] += 1000
        now = clock[0]
        start = position[0]
        if start + ROWS_PER_BATCH > len(pool):
            start = 0
        position[0] = start + ROWS_PER_BATCH
        for index in range(start, start + ROWS_PER_BATCH):
            item = pool[index]
            item.enqueued_ns = now
            sched.submit(item, now)
        for batch in sched.next_batches(now, 1):
            sched.complete(batch, 100_000)

    return sched, one_round


class NullScheduler:
    """Does nothing: times the benchmark's own loop, to subtract from both."""

    name = "harness"
    item_class = PyWorkItem

    def add_model(self, model, schedule):
        pass

    def observe(self, model, rows, ns):
        pass

    def submit(self, item, now):
        return 0

    def next_batches(self, now, limit=1):
        return ()

    def complete(self, batch, ns):
        pass


def per_request_us(cls, queued: int, rounds: int) -> float:
    _, one_round = prepare(cls, queued, rounds)
    for _ in range(50):  # warm-up
        one_round()
    started = time.perf_counter_ns()
    for _ in range(rounds):
        one_round()
    return (time.perf_counter_ns() - started) / rounds / ROWS_PER_BATCH / 1000


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queued", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=2000)
    parser.add_argument("--pairs", type=int, default=5)
    args = parser.parse_args(argv)
    impls = implementations()
    if len(impls) < 2:
        raise SystemExit("the Cython core is not built: run `make build`")
    impls = [*impls, NullScheduler]
    results = {cls.name: [] for cls in impls}
    for pair in range(args.pairs):
        for cls in impls:
            results[cls.name].append(per_request_us(cls, args.queued, args.rounds))
        print(f"pair {pair + 1}/{args.pairs}: " + ", ".join(f"{k} {v[-1]:.2f} µs" for k, v in results.items()), flush=True)
    ref, core = statistics.median(results["reference"]), statistics.median(results["cython"])
    loop = statistics.median(results["harness"])
    print(f"\n{platform.processor() or platform.machine()}, Python {platform.python_version()}, "
          f"{args.queued} queued, {args.rounds} rounds x {ROWS_PER_BATCH} requests, {args.pairs} pairs")
    print("| implementation | µs per request, median (min–max) |\n|---|---|")
    for name, values in results.items():
        print(f"| {name} | {statistics.median(values):.2f} ({min(values):.2f}–{max(values):.2f}) |")
    print(f"\nreference / cython = {ref / core:.1f}x as measured; "
          f"{(ref - loop) / (core - loop):.1f}x net of the benchmark loop's own {loop:.2f} µs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
