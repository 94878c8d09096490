"""``aios-kernel audit replay DIR --pipeline FILE --policy FILE [--since T] [--model DIR] [--report OUT.json]
[--sample N] [--fail-on-change]``.

Re-decides the recorded decisions of a log directory under a candidate
policy (the pipeline file gives the fields; ``--policy`` replaces the
policy it names) and prints the transitions, the policies the decisions were
made under, and a sample of the changed cases; ``--report`` writes the whole
report as JSON: every changed case, every case whose deciding rules change
under the same action (``rules_changed``), each with the policy hash and
version it was decided under, and the candidate model (path and the SHA-256
of its model.onnx and model.toml) when ``--model`` is given.
Exit codes: 0 done (whether or not decisions change, unless
``--fail-on-change``), 1 ``--fail-on-change`` and some decision, its deciding
rules or its score adjustment would change, or the log is damaged, 2 the
command could not run (bad file, no such directory, a candidate the kernel
would refuse, a policy that does not fit the recorded classes), said in one
line, or ``--fail-on-change`` found no decision of the pipeline to check.

A candidate is checked as the kernel checks it before anything is
re-decided: ``--model``'s model.toml against its graph (as a load), then the
pipeline bound to it (input name and width, output and its labels, the
policy's classes and ``score.<class>`` reads); without ``--model`` the
policy's classes and score reads against the class labels each recorded
decision carries. With ``--model``, FALLBACK decisions (the model failed:
no scores were recorded) are re-decided from their recorded inputs too.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..cli_support import open_private, whole_number
from ..progress import Progress, counted
from .replay import ReplayError, ReplayReport, load_candidate, replay
from .spec import PipelineError, load_pipeline


# (-1 was taken: no case printed, exit 0, which read as "nothing changed")
_sample_size = whole_number(0, "0 (print none)")


def add_arguments(parser: argparse.ArgumentParser, parse_time) -> None:
    parser.add_argument("directory", help="audit log directory (<data_dir>/audit)")
    parser.add_argument("--pipeline", required=True, help="the pipeline file (fields and escalation rules)")
    parser.add_argument("--policy", required=True, help="the candidate policy file")
    parser.add_argument("--since", type=parse_time, default=0, help="only decisions at or after this time (ISO-8601 or unix ns)")
    parser.add_argument("--model", help="a candidate model version folder (model.onnx + model.toml) to re-run; "
                                        "the report names it by path and SHA-256")
    parser.add_argument("--report", help="write the whole report as JSON here: every changed case and every "
                                         "rules-only change, each with the policy it was decided under (never "
                                         "inside the data dir; not over an existing file unless --force)")
    parser.add_argument("--force", action="store_true", help="replace an existing --report file")
    parser.add_argument("--sample", type=_sample_size, default=10,
                        help="changed cases to print (default 10; the --report file lists all of them)")
    parser.add_argument("--fail-on-change", dest="fail_on_change", action="store_true",
                        help="exit 1 when any decision, outcome, deciding rule or score adjustment would change, "
                             "2 when the log has no decision of the pipeline to check (a gate in CI)")


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())  # (onnxruntime's messages run over several lines)
    return text if isinstance(exc, (PipelineError, ValueError, OSError)) and text else f"{type(exc).__name__}: {text}"


def _cannot_run(problem: str) -> int:
    print(f"aios-kernel audit replay: {problem}", file=sys.stderr)
    return 2


def run(args) -> int:
    from ..audit import RecordFilter, iter_directory
    from ..audit.errors import AuditError
    from ..models.errors import ModelConfigError
    from ..policy import PolicyError, load_policy

    directory = Path(args.directory)
    if not directory.is_dir():
        return _cannot_run(f"{directory} is not a directory")
    try:
        pipeline = load_pipeline(args.pipeline, lambda _named: load_policy(args.policy))
        # Refused here as the kernel refuses it (the graph check of a load, then the pipeline's binding):
        # a candidate the kernel would not decide with has no decisions to compare.
        model = load_candidate(args.model, pipeline) if args.model else None
    except (PipelineError, PolicyError, ModelConfigError, ReplayError, OSError) as exc:
        return _cannot_run(_one_line(exc))
    records = counted(iter_directory(directory, 0, RecordFilter(pipeline=pipeline.name, since_unix_ns=args.since or None)),
                      Progress("aios-kernel audit replay"), "records read")
    try:
        report = replay(records, pipeline, model=model, since_unix_ns=args.since, sample_size=args.sample,
                        keep_cases=bool(args.report))
    except AuditError:
        raise  # damage in the log: exit 1, said by the caller
    except ReplayError as exc:  # the policy does not fit the classes a record carries
        return _cannot_run(_one_line(exc))
    except Exception as exc:  # exit 1 means "would change": a replay that could not finish must not read so
        return _cannot_run(f"could not re-decide the recorded decisions: {_one_line(exc)}")
    report.candidate_model = model.identity if model is not None else None
    _print(report)
    if args.report:
        try:
            with open_private(args.report) as out:
                out.write(json.dumps(report.as_json(), indent=2) + "\n")
        except OSError as exc:
            return _cannot_run(f"--report {args.report}: cannot write: {exc.strerror or exc}")
        print(f"report: {args.report} (all {report.changed} changed and {report.rules_changed} rules-only cases)")
    if not report.examined:  # (a pipeline author's walk-through: a misspelt name passed a --fail-on-change gate)
        since = " in the time asked (--since)" if args.since else ""
        if report.skipped:  # (a review: every decision skipped read as "no decision", the name blamed)
            why = (f"all {report.skipped} decisions of pipeline {pipeline.name!r}{since} were skipped (see why "
                   "above): nothing was checked")
            hint = "; --fail-on-change fails on that"
        else:
            why = f"the log has no decision of pipeline {pipeline.name!r}{since}: nothing was checked"
            hint = "; --fail-on-change fails on that (is the pipeline's name right?)"
        print(f"aios-kernel audit replay: {why}" + (hint if args.fail_on_change else ""), file=sys.stderr)
        return 2 if args.fail_on_change else 0
    return 1 if args.fail_on_change and report.any_change else 0


def _print(report: ReplayReport) -> None:
    model = report.candidate_model
    print(f"replayed {report.examined} decisions of pipeline {report.pipeline} under policy {report.policy} "
          f"({report.policy_hash[:12]})"
          + (f" and model {model['path']} (onnx {model['onnx_sha256'][:12]})" if model else "")
          + f" in {report.seconds:.2f} s: {report.changed} would change"
          + f", {report.rules_changed} keep their action for other rules or another adjustment"
          + (f", {report.skipped} skipped" if report.skipped else "")
          + (f" ({report.fallbacks} FALLBACK decisions re-decided by the model)" if report.fallbacks else ""))
    _print_baselines(report)
    if report.transitions:
        print("\n  from -> to                      count")
        for (old, new), count in sorted(report.transitions.items(), key=lambda kv: -kv[1]):
            mark = "" if old == new else "  *"
            print(f"  {old:>12} -> {new:<14} {count:>7}{mark}")
        print("\n  outcome from -> to              count")
        for (old, new), count in sorted(report.outcome_transitions.items(), key=lambda kv: -kv[1]):
            print(f"  {old:>12} -> {new:<14} {count:>7}{'' if old == new else '  *'}")
    for case in report.sample:
        _print_case(case)
    for case in report.rules_sample:
        _print_case(case, " (same action, other rules or adjustment)")
    for reason, count in report.skipped_reasons.items():
        print(f"  skipped {count}: {reason}")
    if report.stale_scores:
        print(f"  {report.stale_scores} cases left out a field the model reads whose default the candidate pipeline "
              "changes: the policy sees the new default, the scores are the recorded model's on the old one "
              "(--model re-scores them)")


def _print_baselines(report: ReplayReport) -> None:
    """The policies the decisions were made under: a log can span policy changes."""
    if not report.baselines:
        return
    print(f"\n  {'decided under policy (hash)':>36} {'decisions':>9} {'would change':>13} {'rules only':>11}")
    for (policy_hash, version), counts in report.baselines.items():
        print(f"  {version or '?':>20} ({policy_hash[:12] or '?':>12}) {counts['examined']:>9} "
              f"{counts['changed']:>13} {counts['rules_changed']:>11}")


def _print_case(case: dict, note: str = "") -> None:
    old, new = case["from"], case["to"]
    adjusted = f" adjust {old['adjust']:g} -> {new['adjust']:g}" if old["adjust"] != new["adjust"] else ""
    print(f"  #{case['sequence']} {case['request_id']}: {old['action']} ({','.join(old['rules'])}) "
          f"-> {new['action']} ({','.join(new['rules'])}){adjusted}{note} [decided under {old['policy_hash'][:12]}]")
