"""Decision cost of the scheduler per request: the Cython core vs the Python reference.

    python -m bench.scheduler_micro [--queued 1000] [--rounds 2000] [--pairs 5] [--wait-idle 20]

Workload (the same for both, in one process, alternating A B A B): one model,
max_batch_size 8, three priority levels, a deadline on half the items; the
queue is pre-filled to ``--queued`` items and held there: each round submits
8 items, takes one batch of 8 and completes it. Cost per request = round time
/ 8, covering submit, the batch decision, batch assembly and completion.
The loop is the least a caller does per request (kernel/scheduling/lane.py
also reads the clock, takes a lock and checks the verdict), so the raw figure
is what a caller sees; a do-nothing scheduler ("harness") times the loop.

On this shared machine each pair waits for other processes to go quiet
(``--wait-idle``), counts the CPU they used during the pair, and is rerun when
that exceeds ``--max-others`` cores. The claim is the median of the per-pair
ratios reference / cython, with their min–max.
tests/bench/test_scheduler_micro.py runs the same workload under pytest-benchmark.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

from bench.frontends import add_undisturbed_options, undisturbed
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
    # A pooled item must have left the queue before it is submitted again: the
    # longest-waiting ones (level 3, no deadline) stay about 0.75 x queued rounds.
    pool = [make_item() for _ in range(ROWS_PER_BATCH * max(min(rounds, 20_000), queued))]
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
            if sched.start(batch, now):  # (as the lane does before running it)
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

    def start(self, batch, now):
        return True

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


def run_pair(impls, args) -> tuple[dict, float, int]:
    """One A B (C) round; rerun while other processes disturbed it (up to --retries times).

    Returns ({name: µs per request}, CPU cores other processes used during the
    round, attempts). /proc/stat counts in 10 ms ticks, so the share of others
    is taken over the whole round, not per implementation."""
    return undisturbed(lambda: {cls.name: per_request_us(cls, args.queued, args.rounds) for cls in impls},
                       args.wait_idle, args.max_others, args.retries)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queued", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=2000)
    parser.add_argument("--pairs", type=int, default=5)
    add_undisturbed_options(parser)
    args = parser.parse_args(argv)
    impls = implementations()
    if len(impls) < 2:
        raise SystemExit("the Cython core is not built: run `make build`")
    impls = [*impls, NullScheduler]
    results = {cls.name: [] for cls in impls}
    ratios, others_max, reruns = [], 0.0, 0
    for pair in range(args.pairs):
        values, others, attempts = run_pair(impls, args)
        for name, value in values.items():
            results[name].append(value)
        ratios.append(values["reference"] / values["cython"])
        others_max, reruns = max(others_max, others), reruns + attempts - 1
        flag = "  (still disturbed)" if others > args.max_others else ""
        print(f"pair {pair + 1}/{args.pairs}: " + ", ".join(f"{k} {v:.3f} µs" for k, v in values.items())
              + f"; ratio {ratios[-1]:.1f}x; others {others:.2f} cores, attempt {attempts}{flag}", flush=True)
    ref, core = statistics.median(results["reference"]), statistics.median(results["cython"])
    loop = statistics.median(results["harness"])
    print(f"\n{platform.processor() or platform.machine()}, Python {platform.python_version()}, "
          f"{args.queued} queued, {args.rounds} rounds x {ROWS_PER_BATCH} requests, {args.pairs} pairs; "
          f"others' CPU max {others_max:.2f} cores, {reruns} disturbed pair(s) rerun")
    print("| implementation | µs per request, median (min–max) |\n|---|---|")
    for name, values in results.items():
        print(f"| {name} | {statistics.median(values):.3f} ({min(values):.3f}–{max(values):.3f}) |")
    print(f"\nreference / cython: {statistics.median(ratios):.1f}x median of per-pair ratios "
          f"({min(ratios):.1f}–{max(ratios):.1f}); {ref / core:.1f}x on medians; "
          f"{(ref - loop) / (core - loop):.1f}x net of the benchmark loop's own {loop:.3f} µs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
