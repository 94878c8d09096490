"""Two equal models overloaded on one lane: what admission's service stretch buys (bench/RESULTS.md).

Both models (``large_mlp`` and a copy, ``large_b``) run on the one-core CPU
lane, so each model's queue also waits for the other's batches, which its own
latency fit does not time. Each gets 4-row requests as Poisson at
``--rate-per-model`` (default 950/s: ~2x the pair's saturation together) with a
100 ms deadline as Triton's ``timeout`` parameter. Every arm is a fresh server
(``bench.openloop``'s machinery: server on core 0, generator on core 1), first
measuring the pair's saturation closed-loop, then the overload; code roots
alternate per round.

    python -m bench.shared_lane_overload --code-roots A,B --labels stretch,no-stretch [--rounds 2]

Each code root is a checkout with its Cython extensions built. For the
no-stretch arm, a worktree of the same commit with the stretch pinned to 1:
``STRETCH_MAX = STRETCH_ONE`` in kernel/scheduling/policy.py and
``DEF STRETCH_MAX = 1024`` in ext/consts.pxi, then ``python setup.py
build_ext --inplace`` there. Writes ``OUT/shared-lane-<stamp>.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

from bench.openloop.cli import parse_args as openloop_args
from bench.openloop.repos import build_repo, model_toml
from bench.openloop.runs import REPO_ROOT, Ctx, measure, start, stop, stream_stats
from bench.openloop.streams import ClosedLoad, OpenLoad, make_stream
from bench.openloop.traces import poisson

MODELS = ("large_mlp", "large_b")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.shared_lane_overload", description=__doc__.splitlines()[0])
    parser.add_argument("--code-roots", required=True, help="comma list of checkouts to serve from, one arm each")
    parser.add_argument("--labels", required=True, help="comma list of arm names, one per code root")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--rate-per-model", type=float, default=950.0)
    parser.add_argument("--wait-idle", default="5")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "out")
    args = parser.parse_args(argv)
    roots = dict(zip(args.labels.split(","), (Path(p).resolve() for p in args.code_roots.split(","))))
    if len(roots) != len(args.code_roots.split(",")):
        parser.error("--labels needs one name per code root")
    run_args = openloop_args(["--scenario", "overload", "--wait-idle", args.wait_idle, "--out", str(args.out)])
    try:
        os.sched_setaffinity(0, {int(run_args.client_cpu)})
    except (OSError, ValueError):
        pass
    args.out.mkdir(parents=True, exist_ok=True)
    repo = build_repo(args.out, "shared-lane", {"large_mlp": model_toml("large_mlp", 64)})
    shutil.copytree(repo / "large_mlp", repo / "large_b", dirs_exist_ok=True)
    sat = [make_stream(f"{tag}-sat", "large_mlp", rows=4, served_as=model) for tag, model in zip("ab", MODELS)]
    over = [make_stream(tag, "large_mlp", deadline_ms=100, deadline_via="timeout", rows=4, served_as=model)
            for tag, model in zip("ab", MODELS)]
    length = run_args.warmup + run_args.seconds
    times = [poisson(np.random.default_rng(7 + i), args.rate_per_model, 0.0, length) for i in range(2)]
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    rows, labels = [], list(roots)
    for rnd in range(1, args.rounds + 1):
        for label in (labels if rnd % 2 else labels[::-1]):
            ctx = Ctx(run_args, args.out, stamp, roots[label], args.out / "logs" / f"shared-lane-{stamp}")
            server = start(ctx, f"{label}-sat-r{rnd}", repo)
            try:
                r = measure(ctx, server, "shared-lane", "saturation", rnd, [], [ClosedLoad(s, 32) for s in sat],
                            window_s=5.0)
                cap = sum(stream_stats(r, f"{s.name}[closed]")["throughput_rps"] for s in sat)
            finally:
                stop(server)
            server = start(ctx, f"{label}-over-r{rnd}", repo)
            try:
                r = measure(ctx, server, "shared-lane", label, rnd, [OpenLoad(s, t) for s, t in zip(over, times)],
                            slo_s=0.1, deadline_s=0.1)
            finally:
                stop(server)
            streams = [stream_stats(r, s.name) for s in over]
            counters = r["counters"]
            row = {"arm": label, "round": rnd, "saturation_rps": cap,
                   "goodput_rps": sum(s["goodput_rps"] for s in streams),
                   "ok": sum(s["ok"] for s in streams), "refused": sum(s["refused"] for s in streams),
                   "expired": sum(s["expired"] for s in streams),
                   "ok_late_over_5ms": sum(s.get("ok_after_deadline_plus_5ms", 0) for s in streams),
                   "service_stretch_at_end": {m: counters.get(m, {}).get("service_stretch") for m in MODELS},
                   "expired_predicted": sum(counters.get(m, {}).get("expired_predicted", 0) for m in MODELS)}
            row["goodput_over_saturation"] = row["goodput_rps"] / cap if cap else None
            rows.append(row)
            print(f"{label:12} r{rnd}: goodput {row['goodput_rps']:.0f}/s = {row['goodput_over_saturation']:.2f}x "
                  f"saturation {cap:.0f}/s; refused {row['refused']}, expired {row['expired']}, OK > 5 ms late "
                  f"{row['ok_late_over_5ms']}; stretch at end {row['service_stretch_at_end']}", flush=True)
    path = args.out / f"shared-lane-{stamp}.json"
    command = "python -m bench.shared_lane_overload " + " ".join(argv if argv is not None else sys.argv[1:])
    path.write_text(json.dumps({"command": command, "arms": rows}, indent=1, default=str) + "\n")
    print(f"results in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
