"""Per-request CPU of a decision's field work: read + encode + input hash, compiled row codec vs its reference.

    python -m bench.prepare_micro [--requests 2000] [--repeat 10] [--pairs 5] [--wait-idle 20] [--with-text]

Workload: the claims pipeline (examples/claims/pipelines/claims_triage.toml, 8 fields -> 14 columns) and
``--requests`` DecisionRequests as bench/decide_load.py sends them (the 8 claim fields, a tenant; with
``--with-text`` also the claim's free-text description), each parsed from its wire bytes as the server
holds it. Per request, what ``DecisionEngine.prepare`` and ``_decide`` do with its fields:

* ``reference``: ``codec.read(request.fields)``, ``codec.encode(values)``, ``provenance.input_hash(...)``
  on the pure-Python RowCodec (kernel/pipelines/rowcodec.py) - the calls flow.py makes today;
* ``compiled``: the same three calls on the compiled codec (ext/rowcodec.pyx);
* ``compiled-fused``: ``codec.read_encode_hash(request, digests)``, one pass over the request's wire bytes;
* ``harness``: the loop alone.

Text digests are computed before timing (both sides take them as given). Contenders alternate in one
process; each pair waits for other processes to go quiet, and is rerun when they used more than
``--max-others`` cores meanwhile. The claim is the median of the per-pair ratios with their min-max.
tests/bench/test_prepare_micro.py times the same calls under pytest-benchmark.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

from bench.frontends import add_undisturbed_options, undisturbed

ROOT = Path(__file__).resolve().parent.parent
PIPELINE = ROOT / "examples" / "claims" / "pipelines" / "claims_triage.toml"


def workload(n: int, with_text: bool = False, seed: int = 7):
    """(pipeline, [(request, digests)]) for the claims pipeline."""
    from examples.claims import data
    from kernel._proto.aios.kernel.v1 import kernel_pb2 as kpb
    from kernel.decision_client import make_request
    from kernel.pipelines import load_pipeline, provenance
    from kernel.policy import load_policy

    pipeline = load_pipeline(PIPELINE, load_policy)
    cases = []
    for case in data.generate_cases(n, seed=seed):
        text = {"description": case["description"]} if with_text else None
        request = make_request("claims_triage", {k: case[k] for k in data.REQUEST_FIELDS}, text, tenant="bench")
        request = kpb.DecisionRequest.FromString(request.SerializeToString())  # as the server holds it
        cases.append((request, provenance.text_digests(request.text_fields) if request.text_fields else {}))
    return pipeline, cases


def contenders(pipeline) -> dict:
    """name -> function(request, digests) doing one request's field work."""
    from kernel import accel
    from kernel.pipelines import provenance
    from kernel.pipelines.rowcodec import RowCodec as Reference

    name, fields, width = pipeline.name, pipeline.fields, pipeline.width
    input_hash = provenance.input_hash
    reference = Reference(name, fields, width)
    sorted_names = reference.sorted_names

    def run_reference(request, digests):
        values = reference.read(request.fields)
        reference.encode(values)
        input_hash(name, values, digests, sorted_names)

    found = {"reference": run_reference}
    if not accel.FORCE_PURE:
        try:
            from kernel._ext.rowcodec import RowCodec as Compiled
        except ImportError:
            Compiled = None
        if Compiled is not None:
            compiled = Compiled(name, fields, width)

            def run_compiled(request, digests):
                values = compiled.read(request.fields)
                compiled.encode(values)
                compiled.input_hash(values, digests)

            found["compiled"] = run_compiled
            found["compiled-fused"] = compiled.read_encode_hash
    found["harness"] = lambda request, digests: None
    return found


def per_request_us(work, cases, repeat: int) -> float:
    for request, digests in cases[:200]:  # warm-up
        work(request, digests)
    started = time.perf_counter_ns()
    for _ in range(repeat):
        for request, digests in cases:
            work(request, digests)
    return (time.perf_counter_ns() - started) / (repeat * len(cases)) / 1000


def run_pair(works: dict, cases, args) -> tuple[dict, float, int]:
    """One round of every contender; rerun while other processes disturbed it (up to --retries times)."""
    return undisturbed(lambda: {name: per_request_us(work, cases, args.repeat) for name, work in works.items()},
                       args.wait_idle, args.max_others, args.retries)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.prepare_micro", description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=10, help="passes over the requests per contender and pair")
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--with-text", action="store_true", help="requests carry the claim's free-text description")
    add_undisturbed_options(parser)
    args = parser.parse_args(argv)
    pipeline, cases = workload(args.requests, args.with_text)
    works = contenders(pipeline)
    if "compiled" not in works:
        raise SystemExit("the compiled row codec is not built (or AIOS_PURE_PYTHON=1): run `make build`")
    results = {name: [] for name in works}
    ratios = {name: [] for name in ("compiled", "compiled-fused")}
    others_max, reruns = 0.0, 0
    for pair in range(args.pairs):
        if pair % 2:  # alternate which contender runs first
            works = dict(reversed(list(works.items())))
        values, others, attempts = run_pair(works, cases, args)
        for name, value in values.items():
            results[name].append(value)
        for name in ratios:
            ratios[name].append(values["reference"] / values[name])
        others_max, reruns = max(others_max, others), reruns + attempts - 1
        flag = "  (still disturbed)" if others > args.max_others else ""
        print(f"pair {pair + 1}/{args.pairs}: " + ", ".join(f"{k} {v:.3f} µs" for k, v in sorted(values.items()))
              + f"; fused ratio {ratios['compiled-fused'][-1]:.2f}x; others {others:.2f} cores, attempt {attempts}{flag}",
              flush=True)
    print(f"\n{platform.processor() or platform.machine()}, Python {platform.python_version()}, "
          f"{args.requests} requests x {args.repeat} passes per contender, {args.pairs} pairs, "
          f"text {'on' if args.with_text else 'off'}; others' CPU max {others_max:.2f} cores, "
          f"{reruns} disturbed pair(s) rerun")
    print("| contender | µs per request, median (min–max) |\n|---|---|")
    for name in ("reference", "compiled", "compiled-fused", "harness"):
        values = results[name]
        print(f"| {name} | {statistics.median(values):.3f} ({min(values):.3f}–{max(values):.3f}) |")
    for name, values in ratios.items():
        print(f"reference / {name}: {statistics.median(values):.2f}x median of per-pair ratios "
              f"({min(values):.2f}–{max(values):.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
