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


def _rewritten(audit: Path, into: Path, edit) -> None:
    """``audit``'s records written again as a new log at ``into``, each passed to ``edit`` first (as an older kernel
    would have recorded them)."""
    from kernel.audit import AuditLog

    with AuditLog.open(into, checkpoint_records=1000, checkpoint_ms=600_000) as log:
        for record in iter_directory(audit, 0, RecordFilter()):
            copy = kpb.AuditRecord()
            copy.CopyFrom(record)
            for name in ("sequence", "prev_hash", "hash"):
                copy.ClearField(name)
            edit(copy)
            log.append(copy).wait(10)


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


def _decisions(audit: Path) -> dict[int, kpb.AuditRecord]:
    return {r.sequence: r for r in iter_directory(audit, 0, RecordFilter(kind=kpb.DECISION))}


def test_the_report_lists_every_changed_case_with_the_policy_it_was_decided_under(recorded, tmp_path, capsys):
    audit, pipelines, _ = recorded
    candidate = tmp_path / "candidate.toml"
    candidate.write_text((pipelines / "policy.toml").read_text().replace("claim_amount in [0, 5000)",
                                                                         "claim_amount in [0, 2500)"))
    report = _replay(audit, pipelines / "claims_triage.toml", candidate, tmp_path / "r.json", capsys, "--sample", "3")
    assert report["changed"] > 3
    assert len(report["changed_cases"]) == report["changed"]  # all of them, not the sample
    assert report["sample"] == report["changed_cases"][:3]
    recorded_decisions = _decisions(audit)
    baseline = recorded_decisions[report["changed_cases"][0]["sequence"]].decision
    for case in report["changed_cases"]:
        decision = recorded_decisions[case["sequence"]].decision
        assert case["from"]["policy_hash"] == decision.policy_hash and case["from"]["policy_version"] == "2026-11-25.1"
        assert (case["from"]["action"], case["from"]["outcome"]) != (case["to"]["action"], case["to"]["outcome"])
    assert report["baselines"] == [{"policy_hash": baseline.policy_hash, "policy_version": baseline.policy_version,
                                    "examined": 400, "changed": report["changed"],
                                    "rules_changed": report["rules_changed"]}]
    assert report["candidate_model"] is None


def test_the_printed_sample_stays_short(recorded, tmp_path, capsys):
    audit, pipelines, _ = recorded
    candidate = tmp_path / "candidate.toml"
    candidate.write_text((pipelines / "policy.toml").read_text().replace("claim_amount in [0, 5000)",
                                                                         "claim_amount in [0, 2500)"))
    code = cli_main(["audit", "replay", str(audit), "--pipeline", str(pipelines / "claims_triage.toml"),
                     "--policy", str(candidate), "--sample", "3"])
    out = capsys.readouterr().out
    assert code == 0
    assert len([line for line in out.splitlines() if line.startswith("  #")]) == 3
    assert "decided under policy (hash)" in out and "2026-11-25.1" in out


def test_a_rules_only_change_is_counted_listed_and_fails_the_gate(recorded, tmp_path, capsys):
    audit, pipelines, _ = recorded
    text = (pipelines / "policy.toml").read_text()
    assert text.count('id = "R06"') == 1
    candidate = tmp_path / "renamed.toml"
    candidate.write_text(text.replace('id = "R06"', 'id = "R06b"'))  # the same rule under another name
    report = _replay(audit, pipelines / "claims_triage.toml", candidate, tmp_path / "r.json", capsys)
    decided_by_r06 = [s for s, r in _decisions(audit).items() if [x.rule_id for x in r.decision.reasons] == ["R06"]]
    assert decided_by_r06 and report["changed"] == 0
    assert report["rules_changed"] == len(decided_by_r06)
    assert sorted(c["sequence"] for c in report["rules_changed_cases"]) == sorted(decided_by_r06)
    assert all(c["from"]["rules"] == ["R06"] and c["to"]["rules"] == ["R06b"]
               and c["from"]["action"] == c["to"]["action"] for c in report["rules_changed_cases"])

    gate = ["audit", "replay", str(audit), "--pipeline", str(pipelines / "claims_triage.toml"), "--fail-on-change"]
    assert cli_main([*gate, "--policy", str(candidate)]) == 1
    assert cli_main([*gate, "--policy", str(pipelines / "policy.toml")]) == 0  # nothing changes: the gate opens
    capsys.readouterr()


def test_a_changed_score_adjustment_fails_the_gate_too(recorded, tmp_path, capsys):
    """A pipeline author's walk-through: a candidate that changed only a rule's `adjust` (an output every
    decision carries) replayed as "0 would change" and passed the gate."""
    audit, pipelines, _ = recorded
    text = (pipelines / "policy.toml").read_text()
    assert text.count('id = "R06"') == 1
    candidate = tmp_path / "adjusted.toml"
    candidate.write_text(text.replace('id = "R06"', 'id = "R06"\nadjust = 0.25', 1))
    report = _replay(audit, pipelines / "claims_triage.toml", candidate, tmp_path / "r.json", capsys)
    assert report["changed"] == 0 and report["rules_changed"] > 0
    assert all(c["from"]["adjust"] == 0 and c["to"]["adjust"] == 0.25 for c in report["rules_changed_cases"])
    gate = ["audit", "replay", str(audit), "--pipeline", str(pipelines / "claims_triage.toml"), "--fail-on-change"]
    assert cli_main([*gate, "--policy", str(candidate)]) == 1
    capsys.readouterr()


def test_records_of_a_kernel_that_did_not_record_adjustments_replay_unchanged_under_their_policy(
        recorded, tmp_path, capsys):
    """(Upgrade audit) a kernel from before Decision.score_adjustment recorded none: under its unchanged policy
    every adjusted decision was listed as 'adjust 0 -> -0.1', and --fail-on-change failed on a log spanning the
    upgrade. Under the policy a record was decided by, with the same rules fired, the adjustment is the
    candidate's by construction; a candidate that changes an adjustment is still found."""

    audit, pipelines, _ = recorded
    older = tmp_path / "older-audit"  # the same decisions, as a kernel without the field recorded them
    _rewritten(audit, older, lambda copy: copy.decision.ClearField("score_adjustment"))
    assert any(r.decision.score_adjustment for r in _decisions(audit).values())
    pipeline, policy = pipelines / "claims_triage.toml", pipelines / "policy.toml"
    report = _replay(older, pipeline, policy, tmp_path / "r.json", capsys)
    assert report["examined"] == 400 and report["changed"] == 0 and report["rules_changed"] == 0
    gate = ["audit", "replay", str(older), "--pipeline", str(pipeline), "--fail-on-change"]
    assert cli_main([*gate, "--policy", str(policy)]) == 0
    text = policy.read_text()
    candidate = tmp_path / "adjusted.toml"
    candidate.write_text(text.replace('id = "R06"', 'id = "R06"\nadjust = 0.25', 1))
    assert cli_main([*gate, "--policy", str(candidate)]) == 1
    capsys.readouterr()


def test_a_gate_that_finds_no_decision_of_its_pipeline_fails(recorded, tmp_path, capsys):
    """The same walk-through: a misspelt pipeline name replayed 0 decisions and the gate passed (exit 0)."""
    audit, pipelines, _ = recorded
    other = tmp_path / "claims_triag.toml"
    other.write_text((pipelines / "claims_triage.toml").read_text().replace(
        'name = "claims_triage"', 'name = "claims_triag"', 1).replace('file = "policy.toml"',
                                                                        f'file = "{pipelines / "policy.toml"}"', 1))
    args = ["audit", "replay", str(audit), "--pipeline", str(other), "--policy", str(pipelines / "policy.toml")]
    assert cli_main([*args, "--fail-on-change"]) == 2
    err = capsys.readouterr().err
    assert "the log has no decision of pipeline 'claims_triag': nothing was checked" in err
    assert cli_main(args) == 0  # (without the gate: said, not failed)
    assert "nothing was checked" in capsys.readouterr().err


def test_a_gate_whose_every_decision_was_skipped_says_so_rather_than_blame_the_name(recorded, tmp_path, capsys):
    """(A review) all decisions skipped — here a candidate pipeline requiring a field no record has — read as "the
    log has no decision of pipeline …: is the pipeline's name right?"."""
    audit, pipelines, _ = recorded
    text = (pipelines / "claims_triage.toml").read_text()
    candidate = tmp_path / "claims_triage.toml"
    candidate.write_text(text + '\n[[field]]\nname = "new_signal"\ntype = "number"\nrequired = true\nencode = "raw"\n')
    args = ["audit", "replay", str(audit), "--pipeline", str(candidate), "--policy", str(pipelines / "policy.toml"),
            "--fail-on-change"]
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert "all 400 decisions of pipeline 'claims_triage' were skipped" in err and "name" not in err.split(":")[-1]


def test_a_candidate_model_is_named_by_path_and_hashes(recorded, tmp_path, capsys):
    import hashlib

    audit, pipelines, models = recorded
    folder = models / "claims_triage" / "1"
    report = _replay(audit, pipelines / "claims_triage.toml", pipelines / "policy.toml", tmp_path / "m.json", capsys,
                     "--model", str(folder))
    assert report["candidate_model"] == {
        "path": str(folder.resolve()),
        "onnx_sha256": hashlib.sha256((folder / "model.onnx").read_bytes()).hexdigest(),
        "config_sha256": hashlib.sha256((folder / "model.toml").read_bytes()).hexdigest(),
    }


def test_replay_help_names_the_gate_and_the_full_report(capsys):
    with pytest.raises(SystemExit):
        cli_main(["audit", "replay", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--fail-on-change exit 1 when any decision, outcome, deciding rule or score adjustment would change" in out
    assert "every changed case and every rules-only change" in out


def test_a_candidate_pipeline_s_defaults_fill_the_fields_a_case_left_out(tmp_path, capsys):
    """An analyst's walk-through: a candidate pipeline whose fraud_score default is 0.95 replayed the recorded
    default (0.21) for a claim that left fraud_score out, and reported 0 changed, where the kernel serving the
    candidate denies it (R01: fraud_score >= 0.8 and no police report). A field the caller sent keeps its value."""
    models = build_small_model(tmp_path / "models")
    pipelines = copy_pipelines(tmp_path / "pipelines")
    server = start_kernel(models, pipelines=str(pipelines), data_dir=str(tmp_path / "data"), pipeline_poll_s=0)
    try:
        with DecisionClient(f"127.0.0.1:{server.port}") as client:
            left_out = client.decide("claims_triage", {"claim_amount": 800.0, "customer_tier": "gold",
                                                       "has_police_report": False}, request_id="left-out")
            sent = client.decide("claims_triage", {"claim_amount": 800.0, "customer_tier": "gold",
                                                   "has_police_report": False, "fraud_score": 0.21},
                                 request_id="sent")
    finally:
        server.stop(grace=1)
    assert (left_out.action, sent.action) == ("fast_track", "fast_track")
    candidate = copy_pipelines(tmp_path / "candidate")
    toml = candidate / "claims_triage.toml"
    text = toml.read_text()
    assert "default = 0.21\n" in text
    toml.write_text(text.replace("default = 0.21\n", "default = 0.95\n"))
    audit = tmp_path / "data" / "audit"
    report = _replay(audit, toml, candidate / "policy.toml", tmp_path / "r.json", capsys)
    assert report["examined"] == 2 and report["changed"] == 1
    (case,) = report["changed_cases"]
    assert case["request_id"] == "left-out" and case["to"]["action"] == "deny" and case["to"]["rules"] == ["R01"]
    # Its recorded scores are the model's on the old default: said, and --model re-scores it.
    assert report["stale_scores"] == 1
    report = _replay(audit, toml, candidate / "policy.toml", tmp_path / "m.json", capsys,
                     "--model", str(models / "claims_triage" / "1"))
    assert report["changed"] == 1 and report["stale_scores"] == 0
    assert report["changed_cases"][0]["request_id"] == "left-out"
    # A candidate that requires the field would refuse the case that left it out: skipped, not re-decided.
    toml.write_text(text.replace("default = 0.21\n", "required = true\n"))
    report = _replay(audit, toml, candidate / "policy.toml", tmp_path / "q.json", capsys)
    assert report["examined"] == 1 and report["skipped"] == 1
    assert report["skipped_reasons"] == {"missing required field 'fraud_score'": 1}


def test_stale_scores_counts_only_the_cases_replay_examined(tmp_path, capsys):
    """stale_scores counts, of the examined cases, those whose recorded scores are the model's on a default the
    candidate changed. A FALLBACK case (the model failed: no scores) that left the field out is skipped without
    --model, and was counted all the same: the report said 2 stale of 1 examined."""
    from claims_support import faulty_claims_model

    good = build_small_model(tmp_path / "good") / "claims_triage" / "1"
    faulty_claims_model(good, tmp_path / "models" / "claims_triage" / "1", fault="refuse")
    pipelines = copy_pipelines(tmp_path / "pipelines")
    server = start_kernel(tmp_path / "models", pipelines=str(pipelines), data_dir=str(tmp_path / "data"),
                          pipeline_poll_s=0)
    try:
        with DecisionClient(f"127.0.0.1:{server.port}") as client:
            small = client.decide("claims_triage", {"claim_amount": 300.0, "customer_tier": "gold",
                                                    "has_police_report": False}, request_id="small")
            large = client.decide("claims_triage", {"claim_amount": 90000.0, "customer_tier": "gold",
                                                    "has_police_report": False}, request_id="large")
    finally:
        server.stop(grace=1)
    assert small.outcome != kpb.FALLBACK and large.outcome == kpb.FALLBACK
    candidate = copy_pipelines(tmp_path / "candidate")
    toml = candidate / "claims_triage.toml"
    toml.write_text(toml.read_text().replace("default = 0.21\n", "default = 0.95\n"))
    report = _replay(tmp_path / "data" / "audit", toml, candidate / "policy.toml", tmp_path / "r.json", capsys)
    assert report["examined"] == 1 and report["skipped"] == 1
    assert report["stale_scores"] == 1


def test_a_recorded_case_the_candidate_refuses_is_skipped_and_counted_not_the_replay_stopped(
        recorded, tmp_path, capsys):
    """Decisions recorded before the policy refused a whole number past 2**53 (it compared such a number as its
    float neighbour): replaying them under today's policy refused the whole chunk, and `audit replay` stopped with
    exit 2. Each such case is skipped and counted, with its field, as the kernel serving the candidate would
    refuse the request; the others are re-decided."""

    audit, pipelines, _ = recorded
    older = tmp_path / "older-audit"
    edited = []

    def past_2_53(copy):
        if copy.kind == kpb.DECISION and len(edited) < 3 and "prior_claims" in copy.inputs \
                and "prior_claims" not in copy.defaulted_fields:
            copy.inputs["prior_claims"].int_value = 2**53 + 1  # as a kernel before the refusal recorded it
            edited.append(copy.request_id)

    _rewritten(audit, older, past_2_53)
    assert len(edited) == 3
    report = _replay(older, pipelines / "claims_triage.toml", pipelines / "policy.toml", tmp_path / "r.json", capsys)
    assert report["examined"] == 397 and report["changed"] == 0, report
    assert report["skipped"] == 3, report
    assert list(report["skipped_reasons"].values()) == [3], report["skipped_reasons"]
    assert "field 'prior_claims' refused by the candidate's policy" in next(iter(report["skipped_reasons"]))
