"""A decision's own fields as wire bytes (kernel.decision_wire.py and ext/decision_wire.pyx).

The reference builds the fields through upb; the compiled twin writes the
bytes itself. Both, merged into the pipeline's template Decision, must give
the same Decision as setting the fields one by one did — for any text
(empty, non-ASCII), any scores (negative zero, subnormal, huge), any number
of labels, reasons and escalation reasons, any timing up to 2**64 - 1.
"""

from __future__ import annotations

import importlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fuzz_budget import examples

from kernel._proto.aios.kernel.v1 import kernel_pb2 as kpb
from kernel import decision_wire as reference

try:
    compiled = importlib.import_module("kernel._ext.decision_wire")
except ImportError:  # not built: the reference alone (its own tests still run)
    compiled = None

IMPLEMENTATIONS = [pytest.param(reference, id="reference"),
                   pytest.param(compiled, id="cython", marks=pytest.mark.skipif(compiled is None, reason="not built"))]

_text = st.text(max_size=40)
_scores = st.floats(allow_nan=False)
_ns = st.integers(min_value=0, max_value=2**64 - 1)


def _template() -> kpb.Decision:
    template = kpb.Decision(outcome=kpb.AUTOMATED, policy_name="claims", policy_hash="ab" * 8, policy_version="3",
                            pipeline="claims_triage", pipeline_version="cd" * 8)
    model = template.model
    model.model_name, model.model_version, model.route_arm = "claims_triage", "1", "primary"
    return template


def _one_by_one(request_id, action, input_hash, tenant, key, fired, descriptions, escalated, confidence, labels,
                scores, why, timings) -> kpb.Decision:
    """How the finisher set the fields before (and what the merged bytes must equal)."""
    decision = _template()
    decision.request_id, decision.action, decision.input_hash = request_id, action, input_hash
    if tenant:
        decision.tenant = tenant
    if key:
        decision.idempotency_key = key
    for rule_id in fired:
        decision.reasons.add(rule_id=rule_id, description=descriptions[rule_id])
    decision.model.confidence = confidence
    for name, value in zip(labels, scores):
        decision.model.class_scores[name] = value
    decision.escalation_reasons.extend(why)
    if escalated:
        decision.outcome = kpb.ESCALATED
    for name, value in zip(reference.TIMING_NAMES, timings):
        decision.phase_timings_ns[name] = value
    return decision


@pytest.mark.parametrize("wire", IMPLEMENTATIONS)
@settings(max_examples=examples(300), deadline=None)
@given(request_id=_text, action=_text, input_hash=_text, tenant=_text, key=_text,
       rules=st.dictionaries(st.text(min_size=1, max_size=8), _text, max_size=4),
       escalated=st.booleans(), confidence=_scores,
       labels=st.lists(st.text(max_size=10), max_size=5, unique=True), data=st.data(),
       why=st.lists(_text, max_size=3), timings=st.tuples(_ns, _ns, _ns, _ns))
def test_merged_fields_equal_the_fields_set_one_by_one(wire, request_id, action, input_hash, tenant, key, rules,
                                                       escalated, confidence, labels, data, why, timings):
    fired = list(rules)
    scores = data.draw(st.lists(_scores, min_size=len(labels), max_size=len(labels)))
    merged = _template()
    merged.MergeFromString(wire.decision_fields(
        request_id, action, input_hash, tenant, key, reference.reasons_bytes(fired, rules), escalated, confidence,
        tuple(labels), scores, why, *timings))
    expected = _one_by_one(request_id, action, input_hash, tenant, key, fired, rules, escalated, confidence, labels,
                           scores, why, timings)
    assert merged.SerializeToString(deterministic=True) == expected.SerializeToString(deterministic=True)


@pytest.mark.parametrize("wire", IMPLEMENTATIONS)
def test_a_negative_timing_and_mismatched_scores_are_refused(wire):
    with pytest.raises((ValueError, OverflowError)):
        wire.decision_fields("r", "a", "h", "", "", b"", False, 0.5, ("x",), [0.5], [], -1, 0, 0, 0)
    with pytest.raises((ValueError, TypeError)):
        wire.decision_fields("r", "a", "h", "", "", b"", False, 0.5, ("x", "y"), [0.5], [], 0, 0, 0, 0)


@pytest.mark.skipif(compiled is None, reason="not built")
def test_the_compiled_bytes_parse_as_the_reference_bytes_do():
    args = ("req-1", "approve", "f" * 64, "acme", "k1", reference.reasons_bytes(["R1"], {"R1": "amount < 1000"}), True,
            0.8125, ("approve", "deny", "review"), [0.8125, 0.0625, 0.125], ["model confidence 0.812 is below 0.9"],
            1500, 20, 350, 4000)
    assert kpb.Decision.FromString(compiled.decision_fields(*args)) == kpb.Decision.FromString(
        reference.decision_fields(*args))
