"""What a decision carries so it can be defended later: input hash, audit record, request hash.

Free-text fields never leave the request in clear: until the PII tokenizer
lands, the audit record keeps only a SHA-256 digest of each text field (so
replay can tell whether two cases had the same text, and nobody can read
it back), and no model sees text at all.
"""

from __future__ import annotations

import hashlib

from .._proto.aios.kernel.v1 import kernel_pb2 as kpb
from ..accel import wire
from ..decision_client import to_value


def text_digests(text_fields) -> dict[str, str]:
    return {name: "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest() for name, text in text_fields.items()}


def input_hash(pipeline: str, values: dict, digests: dict[str, str], names: tuple[str, ...] | None = None) -> str:
    """SHA-256 over a canonical text of the validated (tokenized) inputs.

    The text is the pipeline name, then ``name=repr(value)`` per field and
    ``text:name=digest`` per text field, each set sorted by name, joined by
    U+001F. Python's ``repr`` of a float is its shortest round-trip form, so
    equal inputs always give equal text (JSON with sorted keys gave the same
    guarantee at several times the cost, on every decision). ``names``, when
    given, is ``sorted(values)`` computed once per pipeline.
    """
    parts = [pipeline]
    parts += [f"{name}={values[name]!r}" for name in (names if names is not None else sorted(values))]
    if digests:
        parts += [f"text:{name}={digests[name]}" for name in sorted(digests)]
    return hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()


def new_record(kind: int, principal: str, tenant: str, request_id: str, idempotency_key: str, pipeline: str,
               pipeline_version: str) -> kpb.AuditRecord:
    """An audit record with the identifiers auditors filter on; its ``decision`` is filled in by the caller."""
    return kpb.AuditRecord(kind=kind, principal=principal, tenant=tenant, request_id=request_id,
                           idempotency_key=idempotency_key, pipeline=pipeline, pipeline_version=pipeline_version)


def _record_of(kind: int, decision: kpb.Decision, principal: str) -> kpb.AuditRecord:
    """An audit record carrying a copy of ``decision``."""
    record = new_record(kind, principal, decision.tenant, decision.request_id, decision.idempotency_key,
                        decision.pipeline, decision.pipeline_version)
    record.decision.CopyFrom(decision)
    return record


def decision_record(decision: kpb.Decision, principal: str) -> kpb.AuditRecord:
    """The audit record of a decision built on its own (a fallback): the answer as sent and its scores."""
    record = _record_of(kpb.DECISION, decision, principal)
    model_outputs = record.model_outputs
    for name, value in decision.model.class_scores.items():
        model_outputs[name] = value
    return record


_FIELDS = kpb.DecisionRequest.DESCRIPTOR.fields_by_name["fields"].number
_INPUTS = kpb.AuditRecord.DESCRIPTOR.fields_by_name["inputs"].number


def add_inputs(record: kpb.AuditRecord, request: kpb.DecisionRequest, values: dict, digests: dict[str, str]) -> None:
    """What replay needs: the request's (validated) field map as it came, the defaults the pipeline
    filled in, and each free-text field's digest."""
    given = request.fields
    # The same map type under another field number: its entries' bytes, re-tagged, parse straight into
    # the record (a third of what copying them through upb's Python map objects costs).
    record.MergeFromString(wire.retag(request.SerializeToString(), _FIELDS, _INPUTS))
    inputs = record.inputs
    if len(given) != len(values):
        for name, value in values.items():
            if name not in given:
                inputs[name].CopyFrom(to_value(value))
    for name, digest in digests.items():
        inputs["text:" + name].string_value = digest


def resolution_record(resolution: kpb.Decision, principal: str, links_to: int | None) -> kpb.AuditRecord:
    record = _record_of(kpb.REVIEW_RESOLUTION, resolution, principal)
    if links_to is not None:
        record.links_to = links_to
        record.has_link = True
    return record
