"""``aios-kernel audit replay``: recorded decisions re-decided under a candidate policy."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from claims_support import build_small_model, claim_request, copy_pipelines
from conftest import start_kernel
from examples.claims import data
from kernel._proto.aios.kernel.v1 import kernel_pb2 as kpb
from kernel.audit import RecordFilter, iter_directory
from kernel.cli import main as cli_main
from kernel.decision_client import DecisionClient
from kernel.policy import load_policy



@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """An audit log of 400 real decisions of the claims pipeline (the kernel is stopped afterwards)."""
    models = build_small_model(tmp_path_factory.mktemp("models"))
    pipelines = copy_pipelines(tmp_path_factory.mktemp("pipelines"))
    data_dir = tmp_path_factory.mktemp("data")
    server = start_kernel(models, pipelines=str(pipelines), data_dir=str(data_dir), pipeline_poll_s=0)
    try:
        cases = data.generate_cases(400, seed=31)
        requests = [claim_request(c, request_id=f"q{i}") for i, c in enumerate(cases)]
        with DecisionClient(f"127.0.0.1:{server.port}") as client:
            answers = list(client.decide_stream(requests, timeout=120))
    finally:
        server.stop(grace=1)
    assert len(answers) == 400 and not any(a.error_code for a in answers)
    return data_dir / "audit", pipelines, models


def _replay(audit: Path, pipeline: Path, policy: Path, report: Path, capsys, *extra: str) -> dict:
    code = cli_main(["audit", "replay", str(audit), "--pipeline", str(pipeline), "--policy", str(policy),
                     "--report", str(report), *extra])
    out = capsys.readouterr().out
    assert code == 0, out
    return json.loads(report.read_text())


def test_replay_under_the_same_policy_changes_nothing(recorded, tmp_path, capsys):
    audit, pipelines, models = recorded
    report = _replay(audit, pipelines / "claims_triage.toml", pipelines / "policy.toml", tmp_path / "r.json", capsys)
    assert report["examined"] == 400 and report["changed"] == 0 and report["skipped"] == 0
    # Re-running the very model that decided them (re-encoding the recorded inputs) changes nothing either.
    report = _replay(audit, pipelines / "claims_triage.toml", pipelines / "policy.toml", tmp_path / "m.json", capsys,
                     "--model", str(models / "claims_triage" / "1"))
    assert report["examined"] == 400 and report["changed"] == 0


def test_changed_threshold_transitions_match_a_direct_recomputation(recorded, tmp_path, capsys):
    audit, pipelines, _ = recorded
    text = (pipelines / "policy.toml").read_text()
    assert "claim_amount in [0, 5000)" in text
    candidate = tmp_path / "candidate.toml"
    candidate.write_text(text.replace("claim_amount in [0, 5000)", "claim_amount in [0, 2500)"))
    report = _replay(audit, pipelines / "claims_triage.toml", candidate, tmp_path / "r.json", capsys)

    # Recompute every recorded decision directly with the candidate's row-by-row reference evaluator.
    policy = load_policy(candidate)
    expected: Counter = Counter()
    changed = 0
    for record in iter_directory(audit, 0, RecordFilter(kind=kpb.DECISION)):
        row = {name: getattr(record.inputs[name], record.inputs[name].WhichOneof("kind")) for name in policy.inputs}
        scores = dict(record.model_outputs)
        label = max(scores, key=scores.get)
        row.update(label=label, confidence=scores[label], **{f"score.{k}": v for k, v in scores.items()})
        result = policy.evaluate_reference([row])
        new = str(result.action[0])
        escalated = bool(result.escalate[0]) or scores[label] < 0.6
        expected[(record.decision.action, new)] += 1
        old_escalated = record.decision.outcome == kpb.ESCALATED
        changed += new != record.decision.action or escalated != old_escalated
    got = Counter({(t["from"], t["to"]): t["count"] for t in report["transitions"]})
    assert got == expected
    assert report["changed"] == changed > 0
    assert all(case["from"]["action"] != case["to"]["action"] or case["from"]["outcome"] != case["to"]["outcome"]
               for case in report["sample"])
