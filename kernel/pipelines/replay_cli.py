"""``aios-kernel audit replay DIR --pipeline FILE --policy FILE [--since T] [--model DIR] [--report OUT.json]``.

Re-decides the recorded decisions of a log directory under a candidate
policy (the pipeline file gives the fields; ``--policy`` replaces the
policy it names) and prints the transitions; ``--report`` writes the whole
report as JSON. Exit codes: 0 done (whether or not decisions change),
2 the command could not run (bad file, no such directory).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .replay import replay
from .spec import PipelineError, load_pipeline


def add_arguments(parser: argparse.ArgumentParser, parse_time) -> None:
    parser.add_argument("directory", help="audit log directory (<data_dir>/audit)")
    parser.add_argument("--pipeline", required=True, help="the pipeline file (fields and escalation rules)")
    parser.add_argument("--policy", required=True, help="the candidate policy file")
    parser.add_argument("--since", type=parse_time, default=0, help="only decisions at or after this time (ISO-8601 or unix ns)")
    parser.add_argument("--model", help="a candidate model version folder (model.onnx + model.toml) to re-run")
    parser.add_argument("--report", help="write the full report as JSON here")
    parser.add_argument("--sample", type=int, default=10, help="changed cases to show (default 10)")


def _candidate_model(folder: str, output: str):
    import onnxruntime as ort

    from ..models import config as model_config

    path = Path(folder)
    config = model_config.load(path / "model.toml", path.parent.name, path.name)
    labels = next((spec.labels for spec in config.outputs if spec.name == output), ())
    if not labels:
        raise PipelineError(f"{path / 'model.toml'}: output '{output}' has no class labels")
    session = ort.InferenceSession(str(path / "model.onnx"), providers=["CPUExecutionProvider"])
    return session, labels


def run(args) -> int:
    from ..audit import RecordFilter, iter_directory
    from ..policy import PolicyError, load_policy

    directory = Path(args.directory)
    if not directory.is_dir():
        print(f"aios-kernel audit replay: {directory} is not a directory", file=sys.stderr)
        return 2
    try:
        pipeline = load_pipeline(args.pipeline, lambda _named: load_policy(args.policy))
        model = _candidate_model(args.model, pipeline.output) if args.model else None
    except (PipelineError, PolicyError, OSError) as exc:
        print(f"aios-kernel audit replay: {exc}", file=sys.stderr)
        return 2
    records = iter_directory(directory, 0, RecordFilter(pipeline=pipeline.name, since_unix_ns=args.since or None))
    report = replay(records, pipeline, model=model, since_unix_ns=args.since, sample_size=args.sample)
    print(f"replayed {report.examined} decisions of pipeline {report.pipeline} under policy {report.policy} "
          f"({report.policy_hash[:12]}) in {report.seconds:.2f} s: {report.changed} would change"
          + (f", {report.skipped} skipped" if report.skipped else ""))
    if report.transitions:
        print("\n  from -> to                      count")
        for (old, new), count in sorted(report.transitions.items(), key=lambda kv: -kv[1]):
            mark = "" if old == new else "  *"
            print(f"  {old:>12} -> {new:<14} {count:>7}{mark}")
        print("\n  outcome from -> to              count")
        for (old, new), count in sorted(report.outcome_transitions.items(), key=lambda kv: -kv[1]):
            print(f"  {old:>12} -> {new:<14} {count:>7}{'' if old == new else '  *'}")
    for case in report.sample:
        print(f"  #{case['sequence']} {case['request_id']}: {case['from']['action']} ({','.join(case['from']['rules'])}) "
              f"-> {case['to']['action']} ({','.join(case['to']['rules'])})")
    for reason, count in report.skipped_reasons.items():
        print(f"  skipped {count}: {reason}")
    if args.report:
        Path(args.report).write_text(json.dumps(report.as_json(), indent=2) + "\n")
        print(f"report: {args.report}")
    return 0
