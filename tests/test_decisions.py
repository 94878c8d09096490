"""Decisions end to end over real gRPC: the claims pipeline on a running kernel.

Each answer is checked against a direct recomputation (onnxruntime on the
trainer's own feature encoding, then the policy's row-by-row reference
evaluator), so the tests hold the pipeline to the truth, not to itself.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from claims_support import CLAIMS, claim_request
from examples.claims import data, features
from kernel._proto.aios.kernel.v1 import kernel_pb2 as kpb
from kernel._proto.aios.kernel.v1 import kernel_pb2_grpc as kgrpc
from kernel.audit import RecordFilter, iter_directory, verify_directory
from kernel.decision_client import make_request
from kernel.policy import load_policy

@pytest.fixture(scope="module")
def models(claims_models):
    return claims_models


@pytest.fixture(scope="module")
def kernel(claims_kernel):
    return claims_kernel


@pytest.fixture
def channel(kernel):
    with grpc.insecure_channel(f"127.0.0.1:{kernel.port}") as ch:
        yield ch


@pytest.fixture
def decisions(channel):
    return kgrpc.DecisionServiceStub(channel)


@pytest.fixture(scope="module")
def truth(models):
    """Recompute a case's decision without the kernel: the trainer's encoding, onnxruntime, the reference policy."""
    session = ort.InferenceSession(str(models / "claims_triage" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    policy = load_policy(CLAIMS / "policy.toml")

    def decide(case: dict) -> tuple[str, tuple, np.ndarray]:
        scores = session.run(None, {"features": features.encode([case])})[0][0].astype(np.float64)
        best = int(scores.argmax())
        row = {name: case[name] for name in policy.inputs}
        row.update(label=data.LABELS[best], confidence=float(scores[best]))
        row.update({f"score.{label}": float(s) for label, s in zip(data.LABELS, scores)})
        result = policy.evaluate_reference([row])
        return str(result.action[0]), tuple(result.fired[0]), scores

    return decide


def _request(case: dict, **options) -> kpb.DecisionRequest:
    request = claim_request(case, **options)
    request.text_fields["description"] = case["description"]
    return request


def _case(**overrides) -> dict:
    case = dict(data.generate_cases(1, seed=99)[0])
    case.update(overrides)
    return case


def test_the_audit_phase_holds_the_records_write_and_flush(kernel, decisions, monkeypatch):
    """A slow disk shows in the "audit" phase (a statistics audit: it was timed from after the write and the
    fsync, so in fsync mode their cost showed only in "total"); the steps never add up to more than "total"."""
    from kernel.audit import segments

    flush = segments.AppendFile.sync

    def slow_disk(self):  # the injected fault: every flush of the audit log takes 80 ms longer
        threading.Event().wait(0.08)
        flush(self)

    monkeypatch.setattr(segments.AppendFile, "sync", slow_disk)
    decision = decisions.Decide(_request(_case(), request_id="slow-disk"), timeout=30)
    timings = decision.phase_timings_ns
    assert kernel.settings.audit_mode == "fsync"  # (the default; an async-mode log flushes before checkpoints)
    assert timings["audit"] >= 80_000_000, dict(timings)
    steps = sum(timings[step] for step in ("validate", "queue", "model", "policy", "audit"))
    assert steps <= timings["total"], dict(timings)


def test_list_pipelines_counts_what_each_pipeline_decided_by_outcome(kernel, channel, decisions, monkeypatch):
    """A statistics audit: nothing counted decisions (by outcome, or recorded too late to act on)."""
    from kernel.audit import segments

    admin = kgrpc.AdminServiceStub(channel)

    def counts():
        (listed,) = [p for p in admin.ListPipelines(kpb.ListPipelinesRequest(), timeout=5).pipelines
                     if p.name == "claims_triage"]
        d = listed.decisions
        return d.automated, d.escalated, d.fallback, d.failed, d.late

    before = counts()
    small = _case(claim_amount=800.0, customer_tier="gold", fraud_score=0.05, prior_claims=0, has_police_report=True)
    assert decisions.Decide(_request(small), timeout=10).outcome == kpb.AUTOMATED
    assert decisions.Decide(_request(_case(claim_amount=90000.0)), timeout=10).outcome == kpb.ESCALATED
    flush = segments.AppendFile.sync

    def slow_disk(self):  # the injected fault: every flush of the audit log takes 300 ms longer
        threading.Event().wait(0.3)
        flush(self)

    monkeypatch.setattr(segments.AppendFile, "sync", slow_disk)
    with pytest.raises(grpc.RpcError) as info:  # decided and recorded, after its 100 ms
        decisions.Decide(_request(small, timeout_ms=100), timeout=10)
    monkeypatch.undo()
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "aios-audit-sequence" in dict(
        info.value.trailing_metadata())
    after = counts()
    assert [b - a for a, b in zip(before, after)] == [2, 1, 0, 0, 1]  # the late one is an AUTOMATED decision made


def test_automated_decision_has_reasons_and_provenance(kernel, decisions, truth):
    case = _case(claim_amount=800.0, customer_tier="bronze", fraud_score=0.05, prior_claims=0, policy_age_months=40,
                 has_police_report=True, claim_type="auto", days_since_incident=3)
    decision = decisions.Decide(_request(case, request_id="case-1"), timeout=10)
    action, fired, scores = truth(case)
    assert decision.action == action and tuple(r.rule_id for r in decision.reasons) == fired
    assert decision.outcome == kpb.AUTOMATED and not decision.review_id
    assert all(r.description for r in decision.reasons)
    assert decision.request_id == "case-1" and decision.tenant == "acme"
    assert decision.policy_hash == hashlib.sha256((kernel.pipelines_dir / "policy.toml").read_bytes()).hexdigest()
    assert decision.pipeline_version == hashlib.sha256((kernel.pipelines_dir / "claims_triage.toml").read_bytes()).hexdigest()
    assert (decision.model.model_name, decision.model.model_version) == ("claims_triage", "1")
    assert decision.model.confidence == pytest.approx(scores.max(), abs=1e-6)
    assert dict(decision.model.class_scores) == pytest.approx(dict(zip(data.LABELS, scores)), abs=1e-6)
    assert len(decision.input_hash) == 64
    assert {"validate", "queue", "model", "policy", "audit", "total"} <= set(decision.phase_timings_ns)
    # The audit record is durable and says the same thing; the raw description is not in it.
    audit_dir = Path(kernel.settings.data_dir) / "audit"
    (record,) = [r for r in iter_directory(audit_dir, decision.audit_sequence, RecordFilter()) if r.sequence == decision.audit_sequence][:1]
    assert record.decision.action == decision.action and record.request_id == "case-1"
    assert record.hash.hex() == decision.audit_hash
    assert record.inputs["text:description"].string_value.startswith("sha256:")
    assert case["description"] not in str(record)


def test_the_policys_score_adjustment_is_on_the_answer_and_the_record(kernel, decisions, truth):
    """R01 (likely fraud) adjusts the score by 0.3 and R05 by 0.1: the sum of the fired rules' adjust is the
    decision's score_adjustment, answered and recorded (it was computed and dropped); 0 when none adjusts."""
    fraud = _case(fraud_score=0.95, has_police_report=False, claim_amount=4000.0, prior_claims=0)
    decision = decisions.Decide(_request(fraud, request_id="adjusted"), timeout=10)
    assert truth(fraud)[1][0] == "R01" and decision.action == "deny"
    assert decision.score_adjustment == pytest.approx(0.3)
    audit_dir = Path(kernel.settings.data_dir) / "audit"
    (record,) = [r for r in iter_directory(audit_dir, decision.audit_sequence, RecordFilter())
                 if r.sequence == decision.audit_sequence][:1]
    assert record.decision.score_adjustment == pytest.approx(0.3)
    plain = _case(claim_amount=800.0, customer_tier="bronze", fraud_score=0.05, prior_claims=0, has_police_report=True)
    assert decisions.Decide(_request(plain), timeout=10).score_adjustment == 0.0


def test_the_record_names_the_inputs_that_took_the_pipelines_default(kernel, decisions):
    """A deny that fired on a defaulted has_police_report=false looked in the record exactly like one the
    caller sent: the record lists the inputs the caller left out (they took the pipeline's default)."""
    request = make_request("claims_triage", {"claim_amount": 4000.0, "fraud_score": 0.9}, tenant="acme")
    decision = decisions.Decide(request, timeout=10)
    audit_dir = Path(kernel.settings.data_dir) / "audit"
    (record,) = [r for r in iter_directory(audit_dir, decision.audit_sequence, RecordFilter())
                 if r.sequence == decision.audit_sequence][:1]
    defaulted = list(record.defaulted_fields)
    assert "has_police_report" in defaulted and defaulted == sorted(defaulted)
    assert not {"claim_amount", "fraud_score"} & set(defaulted)
    assert set(defaulted) == set(record.inputs) - {"claim_amount", "fraud_score"}
    full = decisions.Decide(_request(_case(), request_id="all-sent"), timeout=10)
    (sent,) = [r for r in iter_directory(audit_dir, full.audit_sequence, RecordFilter())
               if r.sequence == full.audit_sequence][:1]
    assert list(sent.defaulted_fields) == []


def test_the_record_holds_each_number_as_the_pipeline_took_it_so_its_input_hash_can_be_recomputed(kernel, decisions):
    """An analyst's walk-through: a number field sent as an int (an integer field as a whole double) was recorded as
    sent, while the answer's input_hash covers the value as the pipeline took it: input_hash recomputed from the
    record's inputs (provenance.input_hash, as documented) differed from the answer's, as if the record were wrong."""
    from kernel.pipelines.provenance import input_hash

    full = {"claim_amount": kpb.Value(int_value=800), "policy_age_months": kpb.Value(number_value=40.0),
            "prior_claims": kpb.Value(int_value=0), "fraud_score": kpb.Value(int_value=0),
            "days_since_incident": kpb.Value(int_value=3), "customer_tier": kpb.Value(string_value="gold"),
            "claim_type": kpb.Value(string_value="auto"), "has_police_report": kpb.Value(bool_value=True)}
    some = {"claim_amount": kpb.Value(int_value=800), "policy_age_months": kpb.Value(number_value=40.0)}
    audit_dir = Path(kernel.settings.data_dir) / "audit"
    for fields, text in ((full, {}), (some, {}), (full, {"description": "hail"})):
        answer = decisions.Decide(kpb.DecisionRequest(pipeline="claims_triage", fields=fields, text_fields=text),
                                  timeout=10)
        (record,) = [r for r in iter_directory(audit_dir, answer.audit_sequence, RecordFilter())
                     if r.sequence == answer.audit_sequence][:1]
        inputs = record.inputs
        assert inputs["claim_amount"] == kpb.Value(number_value=800.0)
        assert inputs["policy_age_months"] == kpb.Value(int_value=40)
        values = {name: getattr(v, v.WhichOneof("kind")) for name, v in inputs.items() if not name.startswith("text:")}
        digests = {name[5:]: v.string_value for name, v in inputs.items() if name.startswith("text:")}
        assert input_hash(record.pipeline, values, digests) == answer.input_hash


def test_same_input_same_input_hash_and_answer(decisions):
    case = _case()
    first = decisions.Decide(_request(case), timeout=10)
    second = decisions.Decide(_request(case), timeout=10)
    assert first.input_hash == second.input_hash and first.action == second.action
    assert first.audit_sequence != second.audit_sequence  # two decisions, two records


def test_low_confidence_case_is_escalated_reviewed_and_its_task_completes(channel, truth):
    tasks, reviews = kgrpc.TaskServiceStub(channel), kgrpc.ReviewServiceStub(channel)
    case = _case(claim_amount=75000.0, fraud_score=0.2, prior_claims=0)  # R04: large claims go to a human
    task = tasks.StartTask(kpb.StartTaskRequest(request=_request(case, request_id="big-1")), timeout=10)
    states = []
    for update in tasks.WatchTask(kpb.TaskRef(task_id=task.task_id), timeout=20):
        states.append(update.state)
        if update.state == kpb.WAITING_FOR_REVIEW:
            break
    assert states[-1] == kpb.WAITING_FOR_REVIEW
    waiting = tasks.GetTask(kpb.TaskRef(task_id=task.task_id), timeout=5)
    listed = reviews.ListReviews(kpb.ListReviewsRequest(pipeline="claims_triage", tenant="acme", state="OPEN"), timeout=5)
    (review,) = [r for r in listed.reviews if r.review_id == waiting.review_id]
    assert review.proposed.outcome == kpb.ESCALATED and review.proposed.request_id == "big-1"
    assert any("R04" in why for why in review.proposed.escalation_reasons)
    claimed = reviews.ClaimReview(kpb.ClaimReviewRequest(review_id=review.review_id, reviewer="alice", lease_seconds=60), timeout=5)
    assert claimed.claimed_by == "alice"
    with pytest.raises(grpc.RpcError) as other:
        reviews.ClaimReview(kpb.ClaimReviewRequest(review_id=review.review_id, reviewer="bob", lease_seconds=60), timeout=5)
    assert other.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    resolved = reviews.ResolveReview(kpb.ResolveReviewRequest(
        review_id=review.review_id, reviewer="alice", action="deny", comment="invoice looks forged"), timeout=10)
    assert resolved.resolved_action == "deny" and resolved.resolution.outcome == kpb.REVIEWED
    final = None
    for update in tasks.WatchTask(kpb.TaskRef(task_id=task.task_id), timeout=20):
        final = update
        if update.state in (kpb.SUCCEEDED, kpb.FAILED, kpb.CANCELLED):
            break
    assert final.state == kpb.SUCCEEDED
    assert final.decision.action == "deny" and final.decision.outcome == kpb.REVIEWED
    assert final.decision.links_to_audit_sequence == review.proposed.audit_sequence
    # The resolution is itself in the audit log, linked to the escalated decision.
    stream = kgrpc.AuditServiceStub(channel).StreamAudit(
        kpb.StreamAuditRequest(from_sequence=review.proposed.audit_sequence, kind=kpb.REVIEW_RESOLUTION), timeout=10)
    records = list(stream)
    linked = [r for r in records if r.has_link and r.links_to == review.proposed.audit_sequence]
    assert len(linked) == 1 and linked[0].decision.action == "deny" and linked[0].principal == "alice"


def test_decide_stream_returns_each_answer_to_its_request(decisions, truth):
    cases = data.generate_cases(120, seed=21)
    requests = [_request(case, request_id=f"s-{i}") for i, case in enumerate(cases)]
    bad = make_request("claims_triage", {"claim_amount": "lots"}, request_id="bad-type")
    unknown = make_request("no_such_pipeline", {}, request_id="bad-pipeline")
    requests[10:10] = [bad]
    requests[50:50] = [unknown]
    answers = {d.request_id: d for d in decisions.DecideStream(iter(requests), timeout=60)}
    assert len(answers) == len(requests)
    assert answers["bad-type"].error_code == "INVALID_ARGUMENT" and "claim_amount" in answers["bad-type"].error_message
    assert answers["bad-pipeline"].error_code == "NOT_FOUND"
    for i, case in enumerate(cases):
        decision = answers[f"s-{i}"]
        action, fired, _ = truth(case)
        assert not decision.error_code, decision.error_message
        assert (decision.action, tuple(r.rule_id for r in decision.reasons)) == (action, fired), f"case {i}"


@pytest.mark.parametrize(
    "fields, code, needle",
    [
        ({"claim_amount": "lots"}, grpc.StatusCode.INVALID_ARGUMENT, "'claim_amount' must be number"),
        ({"claim_amount": -5.0}, grpc.StatusCode.INVALID_ARGUMENT, "'claim_amount' must be >= 0"),
        ({"prior_claims": 1.5}, grpc.StatusCode.INVALID_ARGUMENT, "'prior_claims' must be an integer"),
        ({"customer_tier": "diamond"}, grpc.StatusCode.INVALID_ARGUMENT, "'customer_tier' must be one of"),
        ({"shoe_size": 42}, grpc.StatusCode.INVALID_ARGUMENT, "field 'shoe_size' is not a field"),
        ({"has_police_report": 1}, grpc.StatusCode.INVALID_ARGUMENT, "'has_police_report' must be bool"),
    ],
)
def test_bad_fields_are_named(decisions, fields, code, needle):
    with pytest.raises(grpc.RpcError) as info:
        decisions.Decide(make_request("claims_triage", fields), timeout=10)
    assert info.value.code() == code and needle in info.value.details()


@pytest.mark.parametrize(
    "text, needle",
    [
        # A typed field sent as text used to be digested and ignored: the model saw the field's default.
        ({"claim_amount": "800"}, "text_fields['claim_amount']: 'claim_amount' is a typed field of pipeline"),
        ({"shoe_size": "42"}, "text_fields['shoe_size'] is not a text field of pipeline 'claims_triage' "
                              "(text fields: description, notes)"),
    ],
)
def test_text_fields_the_pipeline_does_not_take_are_named(decisions, text, needle):
    with pytest.raises(grpc.RpcError) as info:
        decisions.Decide(make_request("claims_triage", {"claim_amount": 800.0}, text), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in info.value.details()


def test_a_retry_that_sends_a_whole_number_another_way_is_replayed(decisions):
    """(Cross-language audit) a Node client sends 1234 as a double, the Python client as an integer."""
    case = _case(claim_amount=1234.0)
    first_request = _request(case, idempotency_key="k-whole", request_id="r-1")
    first_request.fields["prior_claims"].Clear()
    first_request.fields["prior_claims"].int_value = int(case["prior_claims"])
    first = decisions.Decide(first_request, timeout=10)
    retry = kpb.DecisionRequest()
    retry.CopyFrom(first_request)
    retry.fields["prior_claims"].number_value = float(case["prior_claims"])
    again = decisions.Decide(retry, timeout=10)
    assert again.replayed and again.audit_sequence == first.audit_sequence


def test_a_retry_at_another_priority_is_replayed(decisions):
    """A caller retrying sooner (priority 1) asks for the decision it already has, not for a second one."""
    case = _case(claim_amount=1250.0)
    first_request = _request(case, idempotency_key="k-priority", request_id="r-p3")
    first_request.priority = 3
    first = decisions.Decide(first_request, timeout=10)
    retry = kpb.DecisionRequest()
    retry.CopyFrom(first_request)
    retry.priority, retry.request_id = 1, "r-p1"
    again = decisions.Decide(retry, timeout=10)
    assert again.replayed and again.audit_sequence == first.audit_sequence


def test_unknown_pipeline_is_not_found(decisions):
    with pytest.raises(grpc.RpcError) as info:
        decisions.Decide(make_request("claims_tirage", {}), timeout=10)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND and "claims_triage" in info.value.details()


def test_idempotency_key_gives_the_same_answer_once(decisions):
    case = _case(claim_amount=1234.0)
    first = decisions.Decide(_request(case, idempotency_key="k-1", request_id="r-1"), timeout=10)
    again = decisions.Decide(_request(case, idempotency_key="k-1", request_id="r-2"), timeout=10)
    assert again.replayed and not first.replayed
    assert (again.action, again.audit_sequence, again.audit_hash) == (first.action, first.audit_sequence, first.audit_hash)
    with pytest.raises(grpc.RpcError) as info:
        decisions.Decide(_request(_case(claim_amount=999.0), idempotency_key="k-1"), timeout=10)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "k-1" in info.value.details()


def test_invalid_policy_upload_is_refused_and_the_old_policy_keeps_serving(kernel, channel, decisions):
    admin = kgrpc.AdminServiceStub(channel)
    pipeline_text = (kernel.pipelines_dir / "claims_triage.toml").read_bytes()
    policy_text = (kernel.pipelines_dir / "policy.toml").read_text()
    before = decisions.Decide(_request(_case()), timeout=10).policy_hash
    broken = policy_text.replace('hit_policy = "FIRST"', 'hit_policy = "SOMETIMES"')
    with pytest.raises(grpc.RpcError) as info:
        admin.UploadPipeline(kpb.UploadPipelineRequest(pipeline_toml=pipeline_text, policy_toml=broken.encode()), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "hit_policy" in info.value.details() and "running version keeps serving" in info.value.details()
    assert decisions.Decide(_request(_case()), timeout=10).policy_hash == before
    changed = policy_text.replace("claim_amount >= 50000", "claim_amount >= 40000")
    info = admin.UploadPipeline(kpb.UploadPipelineRequest(pipeline_toml=pipeline_text, policy_toml=changed.encode()), timeout=10)
    assert info.policy_hash == hashlib.sha256(changed.encode()).hexdigest() != before
    assert not [w for w in info.warnings if "not probabilities" in w]  # (the claims model ends in a Softmax)
    after = decisions.Decide(_request(_case(claim_amount=45000.0, fraud_score=0.1)), timeout=10)
    assert after.policy_hash == info.policy_hash and "R04" in [r.rule_id for r in after.reasons]
    listed = admin.ListPipelines(kpb.ListPipelinesRequest(), timeout=5)
    assert [p.policy_hash for p in listed.pipelines] == [info.policy_hash]


def test_audit_log_verifies_after_all_of_the_above(kernel, decisions):
    decisions.Decide(_request(_case()), timeout=10)
    result = verify_directory(Path(kernel.settings.data_dir) / "audit")
    assert result.ok, result


def test_concurrent_unary_decisions_each_get_their_own_answer(decisions, truth):
    cases = data.generate_cases(40, seed=3)
    answers: dict[int, kpb.Decision] = {}

    def worker(k: int) -> None:
        for i in range(k, len(cases), 8):
            answers[i] = decisions.Decide(_request(cases[i], request_id=f"c-{i}"), timeout=20)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, case in enumerate(cases):
        assert answers[i].request_id == f"c-{i}" and answers[i].action == truth(case)[0]


def test_governance_events_are_on_the_record(kernel, channel):
    """Model deploys, pipeline/policy changes and the kernel's start are audited next to the decisions."""
    import json

    stream = kgrpc.AuditServiceStub(channel).StreamAudit(kpb.StreamAuditRequest(from_sequence=0), timeout=10)
    records = list(stream)
    by_kind = {}
    for r in records:
        by_kind.setdefault(r.kind, []).append(json.loads(r.payload) if r.payload else {})
    (deploy,) = by_kind[kpb.MODEL_DEPLOY]
    assert deploy["model"] == "claims_triage" and len(deploy["onnx_sha256"]) == 64
    assert by_kind[kpb.CONFIG_CHANGE][0]["settings"]["audit_mode"] == "fsync"
    policy_changes = by_kind[kpb.POLICY_CHANGE]
    assert policy_changes[0]["pipeline"] == "claims_triage" and policy_changes[0]["previous_policy_hash"] == ""
    # The upload test changed the policy: its change names the old and the new hash.
    later = [c for c in policy_changes if c["previous_policy_hash"]]
    assert later and later[-1]["previous_policy_hash"] != later[-1]["policy_hash"]


def test_a_required_field_that_is_missing_is_named(kernel, channel, decisions):
    admin = kgrpc.AdminServiceStub(channel)
    original = (kernel.pipelines_dir / "claims_triage.toml").read_bytes()
    text = original.decode()
    block = text.index('name = "fraud_score"')
    strict = text[:block] + text[block:].replace("default = ", "required = true\n# default = ", 1)
    admin.UploadPipeline(kpb.UploadPipelineRequest(pipeline_toml=strict.encode()), timeout=10)
    try:
        with pytest.raises(grpc.RpcError) as info:
            decisions.Decide(make_request("claims_triage", {"claim_amount": 100.0}), timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "field 'fraud_score' is required" in info.value.details()
        assert decisions.Decide(_request(_case()), timeout=10).action
    finally:
        admin.UploadPipeline(kpb.UploadPipelineRequest(pipeline_toml=original), timeout=10)


def test_a_model_fault_on_one_request_does_not_fail_its_group(kernel):
    """Injected fault: one request's scores are overwritten with NaN after the model ran."""
    engine = kernel.decisions.engine
    cases = data.generate_cases(3, seed=12)
    group = [engine.prepare(_request(case, request_id=f"g{i}"), None) for i, case in enumerate(cases)]
    for pending in group:
        engine.run_blocking(pending)
    group[1].item.outputs = [np.full_like(out, np.nan) for out in group[1].item.outputs]  # the injected fault
    results = engine.finish(group)
    assert results[0].outcome != kpb.FALLBACK and results[2].outcome != kpb.FALLBACK
    # The claims pipeline has a fallback action: the faulty request alone takes it, and says why.
    assert results[1].outcome == kpb.FALLBACK and results[1].request_id == "g1"
    assert "non-finite" in results[1].escalation_reasons[0]


def test_a_model_fault_takes_the_pipeline_fallback_and_goes_to_a_human(kernel, channel):
    """Injected fault: one request's model call is marked failed after it ran (as run_batch does on a raise)."""
    from kernel.errors import Internal

    engine = kernel.decisions.engine
    cases = data.generate_cases(2, seed=13)
    group = [engine.prepare(_request(case, request_id=f"f{i}"), None) for i, case in enumerate(cases)]
    for pending in group:
        engine.run_blocking(pending)
    group[0].item.error = Internal("model claims_triage/1 failed at run time: injected (request id f0)")
    fallback, normal = engine.finish(group)
    assert fallback.outcome == kpb.FALLBACK and fallback.action == "review" and fallback.review_id
    assert fallback.model.route_arm == "fallback" and "injected" in fallback.escalation_reasons[0]
    assert normal.outcome in (kpb.AUTOMATED, kpb.ESCALATED) and normal.model.route_arm == "primary"
    review = kgrpc.ReviewServiceStub(channel).ListReviews(kpb.ListReviewsRequest(state="OPEN", page_size=1000), timeout=5)
    assert fallback.review_id in {r.review_id for r in review.reviews}
    record = next(kernel.decisions.audit.read(from_sequence=fallback.audit_sequence))
    assert record.decision.outcome == kpb.FALLBACK and record.request_id == "f0"


def test_an_input_the_model_refuses_at_run_time_takes_the_pipeline_fallback(claims_models, tmp_path):
    """A pipeline author's walk-through: onnxruntime refusing the input the pipeline built (an index out of a
    table's bounds) reached the Decide caller as INVALID_ARGUMENT with onnxruntime's text, although every field
    had passed the pipeline's checks, and a task failed on it; a model fault takes the fallback. (ModelInfer, whose
    caller sent the tensors, still answers INVALID_ARGUMENT: test_scheduling_grpc.)"""
    from claims_support import faulty_claims_model
    from conftest import start_claims_kernel

    faulty_claims_model(claims_models / "claims_triage" / "1", tmp_path / "models" / "claims_triage" / "1",
                        fault="refuse")
    server = start_claims_kernel(tmp_path / "models", tmp_path)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            decide = kgrpc.DecisionServiceStub(channel).Decide
            small = decide(_request(_case(claim_amount=300.0), request_id="small"), timeout=10)
            large = decide(_request(_case(claim_amount=90000.0), request_id="large"), timeout=10)
    finally:
        server.stop(grace=1)
    assert small.outcome != kpb.FALLBACK
    assert large.outcome == kpb.FALLBACK and large.action == "review" and large.review_id
    assert "refused this request's input" in large.escalation_reasons[0]


COLLECT_POLICY = """
[policy]
name = "claims_collect"
version = "1"
hit_policy = "COLLECT"
[inputs]
claim_amount = "number"
[outputs]
actions = ["deny", "review", "approve"]
[[rule]]
id = "NOTED"
when = "claim_amount >= 0"
action = "approve"
[[rule]]
id = "ASKS"
when = "claim_amount >= 0"
action = "approve"
escalate = true
[[rule]]
id = "ALSO"
when = "claim_amount >= 0"
action = "approve"
adjust = 0.1
[[rule]]
id = "D"
default = true
action = "approve"
"""


def test_under_collect_the_escalation_names_the_rules_that_asked_for_review_only(claims_models, tmp_path):
    """A pipeline author's walk-through: with three rules firing, one of them escalating, the escalation reason
    (on the answer and the audit record) named all three."""
    from claims_support import copy_pipelines
    from conftest import start_claims_kernel

    pipelines = copy_pipelines(tmp_path / "pipelines")
    text = (pipelines / "claims_triage.toml").read_text()
    (pipelines / "collect_policy.toml").write_text(COLLECT_POLICY)
    (pipelines / "claims_collect.toml").write_text(text.replace('name = "claims_triage"', 'name = "claims_collect"', 1)
                                                   .replace('file = "policy.toml"', 'file = "collect_policy.toml"', 1))
    server = start_claims_kernel(claims_models, tmp_path, pipelines)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            request = _request(_case())
            request.pipeline = "claims_collect"
            decision = kgrpc.DecisionServiceStub(channel).Decide(request, timeout=10)
    finally:
        server.stop(grace=1)
    assert decision.outcome == kpb.ESCALATED and {r.rule_id for r in decision.reasons} >= {"NOTED", "ASKS", "ALSO"}
    assert "a policy rule asked for review: ASKS" in decision.escalation_reasons


def test_a_model_whose_scores_are_not_probabilities_is_warned_about(claims_models, tmp_path):
    """A pipeline author's walk-through: a model answering logits (no Softmax) was served without a word; its
    'confidence' read 5.2 and -3.2, and min_confidence (0 to 1) could never send a case to review."""
    from claims_support import faulty_claims_model
    from conftest import start_claims_kernel

    faulty_claims_model(claims_models / "claims_triage" / "1", tmp_path / "models" / "claims_triage" / "1",
                        fault="logits")
    server = start_claims_kernel(tmp_path / "models", tmp_path)
    try:
        pipeline = (tmp_path / "pipelines" / "claims_triage.toml").read_text().replace(
            'version = "2026-11-25.1"', 'version = "2026-11-25.2"', 1)
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            info = kgrpc.AdminServiceStub(channel).UploadPipeline(
                kpb.UploadPipelineRequest(pipeline_toml=pipeline.encode()), timeout=10)
    finally:
        server.stop(grace=1)
    assert any("output 'probabilities' of model claims_triage/1 gave scores from" in w and "not probabilities" in w
               for w in info.warnings), info.warnings


def test_cancelling_a_waiting_task_withdraws_its_review(channel):
    tasks, reviews = kgrpc.TaskServiceStub(channel), kgrpc.ReviewServiceStub(channel)
    case = _case(claim_amount=80000.0, fraud_score=0.2, prior_claims=0)  # R04: a human decides
    task = tasks.StartTask(kpb.StartTaskRequest(request=_request(case, request_id="cancel-1")), timeout=10)
    for update in tasks.WatchTask(kpb.TaskRef(task_id=task.task_id), timeout=20):
        if update.state == kpb.WAITING_FOR_REVIEW:
            break
    waiting = tasks.GetTask(kpb.TaskRef(task_id=task.task_id), timeout=5)
    assert tasks.CancelTask(kpb.TaskRef(task_id=task.task_id), timeout=5).state == kpb.CANCELLED
    open_ids = {r.review_id for r in reviews.ListReviews(
        kpb.ListReviewsRequest(state="OPEN", page_size=1000), timeout=5).reviews}
    assert waiting.review_id and waiting.review_id not in open_ids
    with pytest.raises(grpc.RpcError) as info:
        reviews.ResolveReview(kpb.ResolveReviewRequest(review_id=waiting.review_id, reviewer="dan", action="approve"),
                              timeout=5)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_a_task_retries_a_transient_failure(kernel, channel, monkeypatch):
    from kernel.errors import ResourceExhausted

    engine, calls = kernel.decisions.engine, []
    real_prepare = engine.prepare

    def flaky_prepare(request, deadline_ns, principal="anonymous", **options):  # injected fault: a full queue first
        calls.append(request.request_id)
        if len(calls) == 1:
            raise ResourceExhausted("model claims_triage queue is full (injected)")
        return real_prepare(request, deadline_ns, principal, **options)

    monkeypatch.setattr(engine, "prepare", flaky_prepare)
    tasks = kgrpc.TaskServiceStub(channel)
    task = tasks.StartTask(kpb.StartTaskRequest(request=_request(_case(claim_amount=700.0), request_id="retry-1")),
                           timeout=10)
    final = None
    for update in tasks.WatchTask(kpb.TaskRef(task_id=task.task_id), timeout=20):
        final = update
        if update.state in (kpb.SUCCEEDED, kpb.FAILED, kpb.CANCELLED, kpb.WAITING_FOR_REVIEW):
            break
    assert final.state in (kpb.SUCCEEDED, kpb.WAITING_FOR_REVIEW) and final.attempts == 2, final
    assert calls == ["retry-1", "retry-1"]


@pytest.mark.parametrize("asked, runs_at", [(0, "default"), (1, 1), (99, "default")])
def test_a_priority_outside_the_models_levels_gets_the_default_as_modelinfer_does(kernel, asked, runs_at):
    """0 means the pipeline's (or model's) default; so does a number past the model's priority levels, as
    Triton does for ModelInfer (clamping it would put the request behind every other)."""
    pending = kernel.decisions.engine.prepare(_request(_case(), priority=asked), None)  # prepared only: not queued
    model = pending.item.model
    assert asked > model.config.priority_levels or asked <= 1
    default = pending.pipeline.priority or model.config.priority
    assert pending.item.priority == (default if runs_at == "default" else runs_at)
