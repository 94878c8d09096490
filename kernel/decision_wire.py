"""A decision's own fields as protobuf bytes, merged into its Decision in one call (pure-Python reference).

The finisher fills in each Decision's per-request fields — request id,
action, reasons, outcome, confidence and class scores, input hash, tenant,
idempotency key, escalation reasons, phase timings — on top of the pipeline's
template. Set one by one through upb's Python objects that was about a dozen
Python-level calls a decision; ``ext/decision_wire.pyx`` (the compiled twin)
writes the same fields as wire bytes in one C call, and a single
``MergeFromString`` puts them in (merging leaves the template's fields and
merges the ``model`` message into the template's). This reference builds the
same fields through upb and serializes them: it is the definition the compiled
encoder is tested against (tests/test_decision_wire.py), and what runs
without the extension. Import through ``kernel.accel``.
"""

from __future__ import annotations

from ._proto.aios.kernel.v1 import kernel_pb2 as kpb

TIMING_NAMES = ("validate", "queue", "model", "policy")  # the phase timings a decision gets here, in this order


def decision_fields(request_id: str, action: str, input_hash: str, tenant: str, idempotency_key: str,
                    reasons: bytes, escalated: bool, confidence: float, labels: tuple, scores: list,
                    why: list, validate_ns: int, queue_ns: int, model_ns: int, policy_ns: int) -> bytes:
    """The fields above as Decision wire bytes. ``reasons``: the ``reasons`` entries already encoded
    (``reasons_bytes``); ``labels``: the class names, one per score; ``escalated``: outcome ESCALATED
    (else left to the template's); timings must be >= 0."""
    if len(scores) != len(labels):
        raise ValueError(f"{len(labels)} labels but {len(scores)} scores")
    decision = kpb.Decision(request_id=request_id, action=action, input_hash=input_hash, tenant=tenant,
                            idempotency_key=idempotency_key)
    decision.MergeFromString(reasons)
    if escalated:
        decision.outcome = kpb.ESCALATED
    model = decision.model
    model.confidence = confidence
    class_scores = model.class_scores
    for name, value in zip(labels, scores):
        class_scores[name] = value
    decision.escalation_reasons.extend(why)
    timings = decision.phase_timings_ns
    for name, value in zip(TIMING_NAMES, (validate_ns, queue_ns, model_ns, policy_ns)):
        timings[name] = value
    return decision.SerializeToString()


def reasons_bytes(fired, descriptions: dict) -> bytes:
    """The ``reasons`` entries of the rules ``fired`` (ids, in order), encoded once per distinct list."""
    decision = kpb.Decision()
    for rule_id in fired:
        decision.reasons.add(rule_id=rule_id, description=descriptions[rule_id])
    return decision.SerializeToString()
