"""What checking a hostile or pathological policy costs: seconds and peak memory of ``parse_policy`` (what an
upload, a load and ``aios-kernel policy check`` run) on shapes an uploader controls, for the code here and,
with ``--baseline REV``, for that revision's code in the same run (rounds alternate between the two).

Shapes (each one a file under the 1 MiB upload limit):

* ``not-in-sets``  40 rules of ``x not in {0, 1, …}`` with ~1,850 values each (COLLECT): the table analysis at
  its work limit, on sets of thousands of intervals.
* ``many-actions`` ``[outputs] actions`` listing 30,000 names (duplicates were found with a scan per name).
* ``error-flood``  10,000 classes and 12,000 tests of a class the model lacks (every error listed every class).

Each measurement runs in a fresh process (``ru_maxrss`` is per process), one shape at a time.

    python -m bench.policy_check_cost [--rounds 3] [--shapes not-in-sets,many-actions,error-flood] [--baseline REV]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from . import procs
from .frontends import snapshot_revision

REPO_ROOT = Path(__file__).resolve().parent.parent
SHAPES = ("not-in-sets", "many-actions", "error-flood")

# Run in the measured process: build the shape's text, time parse_policy, report peak RSS. Kept as source so the
# baseline's process imports only its own tree's kernel (PYTHONPATH), never this file's.
_MEASURE = r"""
import json, resource, sys, time
shape = sys.argv[1]

def policy(rules, actions=("a", "b", "c"), classes=None, hit="FIRST"):
    text = f'[policy]\nname = "t"\nversion = "1"\nhit_policy = "{hit}"\n[inputs]\nx = "number"\n'
    if classes is not None:
        text += "[model]\nclasses = [" + ", ".join(f'"{c}"' for c in classes) + "]\n"
    text += "[outputs]\nactions = [" + ", ".join(f'"{a}"' for a in actions) + "]\n"
    for i, (when, action) in enumerate(rules):
        text += f"[[rule]]\nid = \"R{i}\"\nwhen = '''{when}'''\naction = \"{action}\"\n"
    return text + f'[[rule]]\nid = "D"\ndefault = true\naction = "{actions[-1]}"\n'

if shape == "not-in-sets":
    values = ", ".join(str(i) for i in range(2000))[:9_980].rsplit(",", 1)[0]
    text = policy([(f"x not in {{{values}}}", "a")] * 40, hit="COLLECT")
elif shape == "many-actions":
    text = policy([("x > 1", "a0")], actions=[f"a{i}" for i in range(30_000)])
else:
    text = policy([(" or ".join(["label == 'zz'"] * 500), "a")] * 24, classes=[f"class_{i:06d}" for i in range(10_000)])
import kernel
from kernel.policy import parse_policy
start = time.perf_counter()
try:
    parsed = parse_policy(text)
    outcome = "served" + ("" if parsed.analysis_complete else " (work limit)")
except Exception as exc:  # (a refusal is the expected outcome of error-flood)
    outcome = f"refused: {type(exc).__name__}"
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "bytes": len(text), "outcome": outcome, "kernel": kernel.__file__}))
"""


def measure(shape: str, code_root: Path | None) -> dict:
    env = dict(os.environ)
    if code_root is not None:
        env["PYTHONPATH"] = str(code_root)
    run = subprocess.run([procs.python(), "-c", _MEASURE, shape], capture_output=True, text=True, env=env,
                         cwd=code_root or REPO_ROOT, timeout=900)
    if run.returncode != 0:
        raise SystemExit(f"{shape} failed: {run.stderr.strip()[-800:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, of {', '.join(SHAPES)}")
    parser.add_argument("--baseline", default="", metavar="REV", help="also measure this git revision's code")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "out")
    args = parser.parse_args(argv)
    shapes = [s for s in args.shapes.split(",") if s]
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        parser.error(f"unknown shape(s) {', '.join(unknown)}; known: {', '.join(SHAPES)}")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    trees = {"now": None}
    if args.baseline:
        trees[args.baseline] = snapshot_revision(args.out, stamp, args.baseline)
    results: dict = {name: {shape: [] for shape in shapes} for name in trees}
    for round_index in range(args.rounds):
        for shape in shapes:
            for name, root in (trees.items() if round_index % 2 == 0 else reversed(trees.items())):
                found = measure(shape, root)
                results[name][shape].append(found)
                print(f"round {round_index + 1}/{args.rounds} {shape:12} {name:10} {found['seconds']:8.2f} s "
                      f"{found['peak_mib']:8.0f} MiB peak  {found['outcome']}", flush=True)
    print("\nshape          " + "".join(f"{name:>24}" for name in trees) + ("   baseline / now (time, memory)"
                                                                             if args.baseline else ""))
    for shape in shapes:
        medians = {name: (statistics.median(r["seconds"] for r in results[name][shape]),
                          statistics.median(r["peak_mib"] for r in results[name][shape])) for name in trees}
        line = f"{shape:14} " + "".join(f"{s:>12.2f} s {m:>6.0f} MiB" for s, m in medians.values())
        if args.baseline:
            (now_s, now_m), (then_s, then_m) = medians["now"], medians[args.baseline]
            line += f"   {then_s / now_s:.1f}×, {then_m / now_m:.1f}×"
        print(line)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"policy-check-cost-{stamp}.json"
    path.write_text(json.dumps({"argv": sys.argv, "results": results}, indent=1))
    print(f"raw: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(procs.run_main("policy_check_cost", main))
