"""An upper bound on any scheduler's goodput for a recorded bursty run (what "≥ 1.3× the best static point" can mean).

    python -m bench.openloop.bound bench/out/openloop-<stamp>.json

For each bursty run in the JSON, the trace's scheduled send times (from the
``-raw.npz`` beside it) are served by an idealised server: a fluid single
server that completes one request every ``1/C`` seconds (``C`` = the
closed-loop saturation throughput measured in that run, i.e. with full
batches), no front-end cost and no batching delay. Every request has the
same relative deadline (the SLO), so serving in arrival order and skipping
each request that can no longer finish in time maximises the number finished
in time (arrival order and deadline order agree). No batching policy on the
real server can beat this: real batches only add latency and the front end
only adds cost. Printed: the bound, the best measured arm, and their ratio —
the largest goodput gain over that arm any policy could show.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def fluid_bound(sched_s: np.ndarray, capacity_rps: float, slo_s: float, window: tuple[float, float]) -> float:
    """Requests finished within ``slo_s`` per second of ``window``, by the ideal server."""
    service = 1.0 / capacity_rps
    free = -np.inf
    on_time = 0
    start_w, end_w = window
    for release in np.sort(sched_s):
        finish = max(free, release) + service
        if finish <= release + slo_s:
            free = finish
            if start_w <= release < end_w:
                on_time += 1
    return on_time / (end_w - start_w)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0] in ("-h", "--help"):  # (--help was read as a file name: a traceback)
        print(__doc__)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    path = Path(argv[0])
    if not path.is_file():
        print(f"{path}: no such file (give an openloop-<stamp>.json that `python -m bench.openloop` wrote)")
        return 2
    result = json.loads(path.read_text())
    raw = np.load(path.with_name(path.stem + "-raw.npz"))
    trace = result["info"]["bursty"]["trace"]
    capacity, slo = trace["capacity_rps"], trace["slo_ms"] / 1000.0
    runs = [r for r in result["runs"] if r["scenario"] == "bursty" and "saturation" not in r["arm"]]
    if not runs:
        print(f"{path}: no bursty runs")
        return 1
    first = runs[0]
    key = next(k for k in raw.keys() if f"bursty-{first['arm']}-r{first['round']}" in k and k.endswith("/sched"))
    sched = raw[key]
    start = float(np.min(sched)) + first["warmup_s"]
    bound = fluid_bound(sched, capacity, slo, (start, start + first["window_s"]))
    print(f"trace: {len(sched)} requests, SLO {slo * 1000:.0f} ms, capacity C = {capacity:,.0f}/s (measured, full batches)")
    print(f"ideal fluid server at C: at most {bound:,.0f} requests/s within the SLO")
    summary = result.get("summary", {}).get("bursty", {})
    best = summary.get("best_static")
    if best:
        static = summary["ratios"][best]["static_median_goodput"]
        adaptive = summary["ratios"][best]["adaptive_median_goodput"]
        print(f"best static point {best}: {static:,.0f}/s; adaptive {adaptive:,.0f}/s")
        print(f"no policy can exceed {bound / static:.2f}x the best static point on this trace "
              f"(target {summary.get('target', 1.3)}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
