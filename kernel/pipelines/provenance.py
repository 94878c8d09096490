"""What a decision carries so it can be defended later: input hash, audit record, request hash.

Free-text fields never leave the request in clear: until the PII tokenizer
lands, the audit record keeps only a SHA-256 digest of each text field (so
replay can tell whether two cases had the same text, and nobody can read
it back), and no model sees text at all.
"""

from __future__ import annotations

import hashlib

from .._proto.aios.kernel.v1 import kernel_pb2 as kpb
from ..decision_client import to_value


def text_digests(text_fields) -> dict[str, str]:
    return {name: "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest() for name, text in text_fields.items()}


def input_hash(pipeline: str, values: dict, digests: dict[str, str]) -> str:
    """SHA-256 over a canonical text of the validated (tokenized) inputs.

    The text is the pipeline name, then ``name=repr(value)`` per field and
    ``text:name=digest`` per text field, each set sorted by name, joined by
    U+001F. Python's ``repr`` of a float is its shortest round-trip form, so
    equal inputs always give equal text (JSON with sorted keys gave the same
    guarantee at several times the cost, on every decision).
    """
    parts = [pipeline]
    parts += [f"{name}={values[name]!r}" for name in sorted(values)]
    parts += [f"text:{name}={digests[name]}" for name in sorted(digests)]
    return hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()


def _record_of(kind: int, decision: kpb.Decision, principal: str) -> kpb.AuditRecord:
    """An audit record carrying ``decision`` and the identifiers auditors filter on."""
    record = kpb.AuditRecord(
        kind=kind,
        principal=principal,
        tenant=decision.tenant,
        request_id=decision.request_id,
        idempotency_key=decision.idempotency_key,
        pipeline=decision.pipeline,
        pipeline_version=decision.pipeline_version,
    )
    record.decision.CopyFrom(decision)
    return record


def decision_record(decision: kpb.Decision, given, values: dict, digests: dict[str, str], scores: dict[str, float],
                    principal: str) -> kpb.AuditRecord:
    """The audit record of one decision: the answer as sent plus what replay needs.

    ``given`` is the request's (already validated) field map, copied as it
    came; ``values`` adds the defaults the pipeline filled in.
    """
    record = _record_of(kpb.DECISION, decision, principal)
    record.model_outputs.update(scores)
    inputs = record.inputs
    inputs.MergeFrom(given)
    if len(given) != len(values):
        for name, value in values.items():
            if name not in given:
                inputs[name].CopyFrom(to_value(value))
    for name, digest in digests.items():
        inputs["text:" + name].string_value = digest
    return record


def resolution_record(resolution: kpb.Decision, principal: str, links_to: int | None) -> kpb.AuditRecord:
    record = _record_of(kpb.REVIEW_RESOLUTION, resolution, principal)
    if links_to is not None:
        record.links_to = links_to
        record.has_link = True
    return record
