"""The floor of Decide's extra cost over ModelInfer: both bodies in-process, no gRPC, no thread hand-offs.

    python -m bench.decide_floor [--group 6] [--requests 600] [--rounds 5] [--infer-us 199] [--audit-mode async]

Issue 5 asks Decide at >= 0.8x the throughput of a bare ModelInfer on the
same model. On the benchmark's one server core that means a Decide may cost
at most 1.25x a ModelInfer's server CPU, i.e. ``0.25 * C`` more, where ``C``
is a ModelInfer's CPU in the real server (~200 µs here: gRPC, threads, the
model). This tool measures the least that extra can be in this code: one
thread runs each body on a started kernel's own parts (real onnxruntime
session, real lane, the audit log fsynced on the data disk, the SQLite review
store), with nothing else to pay — no gRPC, no GIL hand-offs, no context
switches:

* ``infer``: parse the ModelInferRequest, ``InferenceService.prepare``, the
  lane runs it inline, ``answer``, serialize;
* ``decide``: parse the DecisionRequests, ``DecisionEngine.prepare``, the lane
  runs each inline, then ``DecisionEngine.finish`` on the group of ``--group``
  (policy vectorized over the group, audit records written and fdatasynced
  once for the group, reviews queued), serialize.

CPU is the process's (``time.process_time``: the background review-row writer
included) over ``--requests`` requests, rounds alternating. The same claims
as ``bench/decide_load.py`` (Decide as fields, ModelInfer as the encoded
row). The result, ``D - I`` µs per call, bounds the real server from below:
there every one of these steps also pays GIL hand-offs and cold caches. The
ceiling it implies for the throughput ratio is ``C / (C + D - I)``;
``--infer-us`` is ``C`` (measure it with ``python -m bench.thread_cpu
--modes infer``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench import procs
from bench.decide_bench import REPO_ROOT, build_models
from bench.frontends import machine_facts, wait_idle


def _workload(n: int):
    from bench.decide_load import _requests

    decide = [r.SerializeToString() for r in _requests("decide", n)]
    infer = [r.SerializeToString() for r in _requests("infer", n)]
    return decide, infer


def _infer_body(server, wire: list[bytes]) -> None:
    from kernel._proto.inference import grpc_service_pb2 as pb

    service = server.service
    parse = pb.ModelInferRequest.FromString
    for data in wire:
        request = parse(data)
        item = service.prepare(request, None)
        service.run_blocking(item)
        service.answer(request, item).SerializeToString()


def _decide_body(server, wire: list[bytes], group: int) -> None:
    from kernel._proto.aios.kernel.v1 import kernel_pb2 as kpb

    engine = server.decisions.engine
    parse = kpb.DecisionRequest.FromString
    for start in range(0, len(wire), group):
        pendings = [engine.prepare(parse(data), None) for data in wire[start:start + group]]
        for pending in pendings:
            engine.run_blocking(pending)
        for result in engine.finish(pendings):
            if isinstance(result, BaseException):
                raise result
            result.SerializeToString()
    # Review rows are stored by a background thread; its CPU belongs to these decisions, so wait for it
    # here (a read of the review queue stores what is queued first) instead of billing the next body.
    server.decisions.reviews.exists("")


def _cpu_per_call(body, count: int) -> float:
    gc.collect()  # each body starts with the same heap, not the other body's garbage
    started = time.process_time()
    body()
    return (time.process_time() - started) / count * 1e6


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.decide_floor", description=__doc__.splitlines()[0])
    parser.add_argument("--group", type=int, default=6, help="decisions finished together (the finisher's group)")
    parser.add_argument("--requests", type=int, default=600, help="calls per body per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--infer-us", dest="infer_us", type=float, default=0.0,
                        help="a ModelInfer's server CPU in µs (bench.thread_cpu), for the implied ceiling")
    parser.add_argument("--wait-idle", dest="wait_idle", type=float, default=10.0)
    parser.add_argument("--data-parent", dest="data_parent", default=None, help="where the data dir goes (disk for fsync)")
    parser.add_argument("--audit-mode", dest="audit_mode", default="fsync", choices=("fsync", "async"),
                        help="the audit log's mode (async: records written, not fsynced per group)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "out")
    args = parser.parse_args(argv)
    if args.group < 1 or args.requests < args.group:
        parser.error("--group must be >= 1 and --requests at least --group")
    sys.path.insert(0, str(REPO_ROOT))
    from kernel.config import load_settings
    from kernel.server import KernelServer

    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python -m bench.decide_floor " + " ".join(argv if argv is not None else sys.argv[1:])
    models = build_models(args.out, "claims_triage")
    data_dir = Path(tempfile.mkdtemp(prefix="aios-floor-data-", dir=args.data_parent))
    settings = load_settings(None, {
        "models": str(models), "pipelines": str(REPO_ROOT / "examples" / "claims" / "pipelines"),
        "data_dir": str(data_dir), "port": 0, "log_level": "WARNING", "audit_mode": args.audit_mode}, environ={})
    server = KernelServer(settings)
    server.start()
    decide_wire, infer_wire = _workload(args.requests)
    rounds = []
    try:
        _infer_body(server, infer_wire[:100])  # warm both paths (first batches time the lane's fit)
        _decide_body(server, decide_wire[:10 * args.group], args.group)
        for round_no in range(args.rounds):
            wait_idle(args.wait_idle)
            pair = {}
            order = ("infer", "decide") if round_no % 2 == 0 else ("decide", "infer")
            for mode in order:
                if mode == "infer":
                    pair[mode] = _cpu_per_call(lambda: _infer_body(server, infer_wire), len(infer_wire))
                else:
                    pair[mode] = _cpu_per_call(lambda: _decide_body(server, decide_wire, args.group), len(decide_wire))
            pair["extra"] = pair["decide"] - pair["infer"]
            rounds.append(pair)
            print(f"round {round_no + 1}: infer {pair['infer']:.1f} µs, decide {pair['decide']:.1f} µs, "
                  f"extra {pair['extra']:.1f} µs per call", flush=True)
    finally:
        server.stop(grace=1)
        shutil.rmtree(data_dir, ignore_errors=True)
    summary = {key: statistics.median(r[key] for r in rounds) for key in ("infer", "decide", "extra")}
    summary["extra_min"] = min(r["extra"] for r in rounds)
    summary["extra_max"] = max(r["extra"] for r in rounds)
    lines = [
        f"in-process CPU per call, median of {len(rounds)} rounds (group of {args.group} decisions):",
        f"  ModelInfer body {summary['infer']:.1f} µs, Decide body {summary['decide']:.1f} µs, "
        f"Decide's extra {summary['extra']:.1f} µs ({summary['extra_min']:.1f}-{summary['extra_max']:.1f})",
    ]
    if args.infer_us > 0:
        ceiling = args.infer_us / (args.infer_us + summary["extra"])
        summary["ceiling"] = ceiling
        lines.append(f"  with a ModelInfer at {args.infer_us:.0f} µs of server CPU, Decide/ModelInfer can reach at most "
                     f"{ceiling:.2f}x (0.8x needs the extra at <= {args.infer_us / 4:.0f} µs)")
    print("\n".join(lines))
    (args.out / f"decide-floor-{stamp}.json").write_text(json.dumps(
        {"command": command, "machine": machine_facts(command), "rounds": rounds, "summary": summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(procs.run_main("decide_floor", main))
