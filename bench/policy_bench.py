"""Policy evaluation throughput on one core: the compiled claims policy vs its reference, zen-engine and cedarpy.

    python -m bench.policy_bench [--rows 200000] [--peer-rows 10000] [--batch 1000] [--rounds 5] [--cpu 1]

Workload: the claims-triage policy (examples/claims/pipelines/policy.toml, 10 rules +
default, hit policy FIRST) on synthetic claims (examples/claims/data.py) with
synthetic model outputs (label, confidence, score.* drawn from a Dirichlet,
rounded to 4 places so Cedar's decimals hold them exactly). Every contender
gets the same list of request dicts, cut into batches of ``--batch`` rows, and
must produce, per row, the action and the deciding rule id; its own input
conversion is inside the timed region. Before timing, every contender's
answers are checked against the reference evaluator on the peer rows.

Contenders: the compiled policy from request dicts (Cython kernel, and numpy
executor); the compiled policy from ready columns, and from ready encoded
columns (conversion excluded, to show where the time goes); the pure-Python
reference; zen-engine per row and
with evaluate_batch, cedarpy is_authorized_batch (adapters: policy_peers.py).
The process is pinned to one core (``--cpu``). Rounds alternate the
contenders (order rotated each round); the report gives the median rows/s and
the median per-round ratio to zen-engine's faster mode. A second table times
small batches (the serving path) for the compiled policy.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _installed_version
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.policy_peers import Cedar, Zen, ZenBatch  # noqa: E402
from bench.procs import run_main  # noqa: E402
from kernel.policy import load_policy  # noqa: E402

POLICY = ROOT / "examples" / "claims" / "pipelines" / "policy.toml"
OUT = ROOT / "bench" / "out"


def claims(n: int, seed: int) -> list[dict]:
    """``n`` request dicts: the demo's claim fields plus model outputs."""
    from examples.claims.data import LABELS, generate_cases

    rng = np.random.default_rng(seed + 1)
    rows = generate_cases(n, seed)
    probs = np.round(rng.dirichlet([1.2, 1.0, 0.8], n), 4)
    for row, p in zip(rows, probs.tolist()):
        k = max(range(3), key=p.__getitem__)
        row["label"] = LABELS[k]  # the model's prediction replaces the ground-truth label
        row["confidence"] = p[k]
        for j, name in enumerate(LABELS):
            row[f"score.{name}"] = p[j]
        row["claim_amount"] = round(row["claim_amount"], 2)
    return rows


class Compiled:
    def __init__(self, policy, backend: str):
        self.policy = policy.using(backend)
        self.name = f"compiled, {backend}, from dicts"

    def run(self, rows):
        result = self.policy.evaluate_rows(rows)
        return result.action, result.fired


class CompiledColumns:
    """Columns prepared outside the timed region: the evaluator without the dict conversion."""

    def __init__(self, policy, backend: str):
        self.policy = policy.using(backend)
        self.name = f"compiled, {backend}, columns given"
        self.prepared: dict[int, dict] = {}

    def prepare(self, batches):
        self.prepared = {id(b): self.policy.columns(b) for b in batches}

    def run(self, rows):
        result = self.policy.evaluate(self.prepared[id(rows)], len(rows))
        return result.action, result.fired


class CompiledEncoded:
    """Encoded columns prepared outside the timed region: the rule kernel, hit policy and outputs alone."""

    def __init__(self, policy, backend: str):
        self.compiled = policy.using(backend)._compiled
        self.name = f"compiled, {backend}, encoded columns given"
        self.prepared: dict[int, tuple] = {}

    def prepare(self, batches):
        self.prepared = {id(b): self.compiled.encode_rows(b, None, len(b)) for b in batches}

    def run(self, rows):
        result = self.compiled.evaluate(self.prepared[id(rows)], len(rows))
        return result.action, result.fired


class Reference:
    def __init__(self, policy):
        self.policy = policy
        self.name = "reference (row by row)"

    def run(self, rows):
        result = self.policy.evaluate_reference(rows)
        return result.action, result.fired


def answers(contender, batches) -> tuple[list, list]:
    actions, rules = [], []
    for batch in batches:
        action, fired = contender.run(batch)
        actions += [str(a) for a in action]
        rules += [f[0] if isinstance(f, tuple) else f for f in fired]
    return actions, rules


def rows_per_second(contender, batches) -> float:
    rows = sum(len(b) for b in batches)
    started = time.perf_counter()
    for batch in batches:
        contender.run(batch)
    return rows / (time.perf_counter() - started)


def small_batches(policy, backends, sizes, seconds: float, rows) -> dict:
    """µs per call for the compiled policy at serving-sized batches."""
    out = {}
    for backend in backends:
        compiled = policy.using(backend)
        for size in sizes:
            batch = rows[:size]
            calls = 0
            started = time.perf_counter()
            while time.perf_counter() - started < seconds:
                result = compiled.evaluate_rows(batch)
                result.fired  # noqa: B018 - materialized, as a caller building reasons does
                calls += 1
            out[f"{backend}/{size}"] = (time.perf_counter() - started) / calls * 1e6
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000, help="rows per round for the compiled policy")
    parser.add_argument("--peer-rows", type=int, default=10_000, help="rows per round for the slow contenders")
    parser.add_argument("--batch", type=int, default=1000, help="rows per call")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--cpu", type=int, default=None, help="core to pin to (default: the last one)")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--small-seconds", type=float, default=1.0, help="seconds per small-batch measurement")
    parser.add_argument("--out", default=None, help="JSON results file (default bench/out/policy-<time>.json)")
    args = parser.parse_args(argv)
    cpu = args.cpu if args.cpu is not None else max(os.sched_getaffinity(0))
    allowed = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        return run(args, cpu)
    finally:
        os.sched_setaffinity(0, allowed)


def run(args, cpu: int) -> int:
    policy = load_policy(POLICY)
    rows = claims(args.rows, args.seed)
    batches = [rows[i:i + args.batch] for i in range(0, len(rows), args.batch)]
    peer_batches = batches[:max(1, args.peer_rows // args.batch)]
    from kernel.policy.backends import available

    fast = [Compiled(policy, b) for b in reversed(available())]
    prepared = [CompiledColumns(policy, available()[-1]), CompiledEncoded(policy, available()[-1])]
    for contender in prepared:
        contender.prepare(batches)
    fast += prepared
    slow = [Reference(policy), Zen(), ZenBatch(), Cedar()]
    contenders = fast + slow

    truth = answers(Reference(policy), peer_batches)
    errors = slow[-1].errors(peer_batches[0])
    if errors:
        raise SystemExit(f"cedar reported evaluation errors, e.g. {errors[0]}")
    for contender in contenders:
        got = answers(contender, peer_batches)
        if got != truth:
            wrong = sum(a != b for a, b in zip(got[1], truth[1]))
            raise SystemExit(f"{contender.name} disagrees with the reference on {wrong} of {len(truth[1])} rows")
    print(f"all {len(contenders)} contenders agree with the reference on {len(truth[0])} rows "
          f"(action and rule id); pinned to CPU {cpu}", flush=True)

    rates: dict[str, list[float]] = {c.name: [] for c in contenders}
    for round_index in range(args.rounds):
        order = contenders[round_index % len(contenders):] + contenders[:round_index % len(contenders)]
        for contender in order:
            rates[contender.name].append(rows_per_second(contender, batches if contender in fast else peer_batches))
        print(f"round {round_index + 1}/{args.rounds}: "
              + ", ".join(f"{name} {values[-1]:,.0f}" for name, values in rates.items()), flush=True)
    zen_best = [max(a, b) for a, b in zip(rates[Zen.name], rates[ZenBatch.name])]
    cedar = rates[Cedar.name]
    small = small_batches(policy, list(reversed(available())), (1, 8, 64, 1000), args.small_seconds, rows)

    def version(package: str) -> str:
        # Cython is a build-time requirement: a fresh environment built the extension without keeping it.
        try:
            return _installed_version(package)
        except PackageNotFoundError:
            return "not installed"

    versions = {"python": platform.python_version(), "numpy": np.__version__, "zen-engine": version("zen-engine"),
                "cedarpy": version("cedarpy"), "Cython": version("Cython")}
    print(f"\n{platform.machine()}, pinned to 1 core; {versions}")
    print(f"{args.rows:,} rows per round for the compiled policy, {len(truth[0]):,} for the others; "
          f"batches of {args.batch}; {args.rounds} rounds")
    print("\n| contender | rows/s, median (min–max) | × zen-engine (median of per-round ratios) | × cedarpy |")
    print("|---|---|---|---|")
    summary = {}
    for name, values in rates.items():
        vs_zen = statistics.median(v / z for v, z in zip(values, zen_best))
        vs_cedar = statistics.median(v / c for v, c in zip(values, cedar))
        summary[name] = {"median": statistics.median(values), "min": min(values), "max": max(values),
                         "vs_zen": vs_zen, "vs_cedar": vs_cedar, "rounds": values}
        print(f"| {name} | {statistics.median(values):,.0f} ({min(values):,.0f}–{max(values):,.0f}) | "
              f"{vs_zen:,.1f}× | {vs_cedar:,.1f}× |")
    print("\n| compiled policy, from dicts | " + " | ".join(f"batch {s}" for s in (1, 8, 64, 1000)) + " |")
    print("|---|" + "---|" * 4)
    for backend in reversed(available()):
        print(f"| {backend}: µs per call (µs per row) | " + " | ".join(
            f"{small[f'{backend}/{s}']:.1f} ({small[f'{backend}/{s}'] / s:.2f})" for s in (1, 8, 64, 1000)) + " |")
    OUT.mkdir(parents=True, exist_ok=True)
    out = Path(args.out) if args.out else OUT / f"policy-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"args": vars(args), "cpu": cpu, "versions": versions, "rates": summary,
                               "small_batches_us": small, "agreement_rows": len(truth[0])}, indent=1))
    print(f"\nraw: {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main("policy_bench", main))
