"""What a decision carries so it can be defended later: input hash, audit record, request hash.

Free-text fields never leave the request in clear: until the PII tokenizer
lands, the audit record keeps only a SHA-256 digest of each text field (so
replay can tell whether two cases had the same text, and nobody can read
it back), and no model sees text at all.
"""

from __future__ import annotations

import functools
import hashlib
import json
import struct

from .._proto.aios.kernel.v1 import kernel_pb2 as kpb
from ..accel import wire
from ..wire import encode_varint as _varint  # (the pure encoder: only for static and rare fields here)
from ..field_values import to_value


def text_digests(text_fields) -> dict[str, str]:
    """``{name: "sha256:<hex>"}`` of each free-text field's UTF-8 bytes. Each text is at most
    ``kernel.limits.MAX_TEXT_FIELD_BYTES`` (1 MiB of UTF-8): ``DecisionEngine.prepare`` refuses a longer one
    (INVALID_ARGUMENT naming the field and the limit, never the text) before the request is hashed or copied,
    and StartTask before it is stored."""
    return {name: "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest() for name, text in text_fields.items()}


def input_hash(pipeline: str, values: dict, digests: dict[str, str], names: tuple[str, ...] | None = None) -> str:
    """SHA-256 over a canonical text of the validated (tokenized) inputs.

    The text is the pipeline name, then ``name=repr(value)`` per field and
    ``text:name=digest`` per text field, each set sorted by name, joined by
    U+001F. Python's ``repr`` of a float is its shortest round-trip form, so
    equal inputs always give equal text (JSON with sorted keys gave the same
    guarantee at several times the cost, on every decision). ``names``, when
    given, is ``sorted(values)`` computed once per pipeline. A float zero is
    written ``0.0`` whatever its sign: -0.0 is the same input to the model and
    the policy (``-0.0 == 0.0``), so it must hash the same (a client that
    sends -0 would otherwise never match its own 0 in replay or dedup).
    """
    parts = [pipeline]
    parts += [f"{name}={_canonical(values[name])!r}" for name in (names if names is not None else sorted(values))]
    if digests:
        parts += [f"text:{name}={digests[name]}" for name in sorted(digests)]
    return hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()


def _canonical(value):
    """``value``, with a float -0.0 as 0.0 (adding +0.0 is IEEE's way: only -0.0 changes)."""
    return value + 0.0 if type(value) is float else value


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
_MODEL_OUTPUTS = kpb.AuditRecord.DESCRIPTOR.fields_by_name["model_outputs"].number
_TASK_ID = kpb.AuditRecord.DESCRIPTOR.fields_by_name["task_id"].number
_DEFAULTED = kpb.AuditRecord.DESCRIPTOR.fields_by_name["defaulted_fields"].number
_REQUEST_HASH = kpb.AuditRecord.DESCRIPTOR.fields_by_name["request_hash"].number
_LENGTH_DELIMITED = 2
_MAP_KEY = b"\x0a"  # a map entry's key: field 1, length-delimited
_DOUBLE_VALUE = b"\x11"  # a map entry's double value: field 2, 64-bit
_pack_double = struct.Struct("<d").pack


def _length_delimited(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | _LENGTH_DELIMITED) + _varint(len(payload)) + payload


def output_entries(labels) -> tuple[tuple[int, bytes], ...]:
    """For ``decision_tail``: per class label, in the order a deterministic serialization gives map keys
    (``_map_key_order``), the label's index and its ``model_outputs`` entry up to the 8 bytes of its value."""
    entries = []
    for index, label in enumerate(labels):
        key = label.encode("utf-8")
        entry_head = _MAP_KEY + _varint(len(key)) + key + _DOUBLE_VALUE
        size = len(entry_head) + 8
        entries.append((key, index, _varint(_MODEL_OUTPUTS << 3 | _LENGTH_DELIMITED) + _varint(size) + entry_head))
    return tuple((index, head) for _, index, head in sorted(entries, key=lambda entry: _map_key_order(entry[0])))


@functools.cmp_to_key
def _map_key_order(a: bytes, b: bytes) -> int:
    """upb's order of string map keys in a deterministic serialization: by their bytes, except that of
    two keys where one is the start of the other, the longer comes first ("00" before "0")."""
    common = min(len(a), len(b))
    if a[:common] != b[:common]:
        return -1 if a[:common] < b[:common] else 1
    return len(b) - len(a)


def decision_tail(request: kpb.DecisionRequest, values: dict, digests: dict[str, str], scores,
                  entries: tuple[tuple[int, bytes], ...], task_id: str, request_hash: str = "") -> bytes:
    """A decision record's fields from ``inputs`` on (inputs, model_outputs, task_id, defaulted_fields,
    request_hash), encoded as the record's deterministic serialization encodes them: the tail of an
    ``audit.RecordWithTail``. ``request_hash``: hex, a keyed request's (kernel/store/idempotency.py).

    ``scores``: the model's class scores, in label order; ``entries``: ``output_entries(labels)``.
    The inputs are the request's own field entries (sorted, re-tagged: never parsed again); a
    request whose inputs the pipeline completed (defaults, text digests) has them built as before.
    """
    defaulted = ()
    if len(request.fields) == len(values) and not digests and not _converted(request.fields, values):
        parts = [wire.retag(request.SerializeToString(deterministic=True), _FIELDS, _INPUTS)]
    else:
        holder = kpb.AuditRecord()
        defaulted = add_inputs(holder, request, values, digests, with_defaulted=False)
        parts = [holder.SerializeToString(deterministic=True)]
    for index, head in entries:
        parts.append(head)
        parts.append(_pack_double(scores[index]))
    if task_id:
        parts.append(_length_delimited(_TASK_ID, task_id.encode("utf-8")))
    for name in defaulted:  # (after task_id, as the serialization orders them)
        parts.append(_length_delimited(_DEFAULTED, name.encode("utf-8")))
    if request_hash:  # (the record's last field)
        parts.append(_length_delimited(_REQUEST_HASH, bytes.fromhex(request_hash)))
    return b"".join(parts)


_KIND_OF = {float: "number_value", int: "int_value"}


def _converted(given, values: dict) -> bool:
    """Whether a number field was sent as an int (or an integer field as a whole double): the pipeline took it
    as its own type, and the record must hold that, the value ``input_hash`` covers."""
    for name, taken in values.items():  # (the plain dict first: only numbers reach the request's map, ~1.5 µs)
        kind = _KIND_OF.get(type(taken))
        if kind is not None and given[name].WhichOneof("kind") != kind:
            return True
    return False


def defaulted_values(request: kpb.DecisionRequest, values: dict) -> dict | None:
    """The fields ``request`` left out, each with the default the pipeline filled in (``values``: the validated
    inputs), as ``add_inputs`` names them in ``defaulted_fields``; None when it left none out."""
    given = request.fields
    if len(given) == len(values):
        return None
    return {name: value for name, value in values.items() if name not in given}


def add_inputs(record: kpb.AuditRecord, request: kpb.DecisionRequest, values: dict, digests: dict[str, str],
               with_defaulted: bool = True) -> list[str]:
    """What replay needs: the request's (validated) field map as it came (a number sent as an int, or an integer
    as a whole double, as the pipeline took it: the value ``input_hash`` covers), the defaults the pipeline
    filled in, and each free-text field's digest; and which inputs were defaults (``defaulted_fields``,
    sorted; set on ``record`` unless ``with_defaulted`` is False, for a caller that appends them itself).
    Returns those names."""
    given = request.fields
    # The same map type under another field number: its entries' bytes, re-tagged, parse straight into
    # the record (a third of what copying them through upb's Python map objects costs).
    record.MergeFromString(wire.retag(request.SerializeToString(), _FIELDS, _INPUTS))
    inputs = record.inputs
    for name, value in given.items():  # a number sent as an int: recorded as the pipeline took it (_converted)
        kind = _KIND_OF.get(type(values[name]))
        if kind is not None and value.WhichOneof("kind") != kind:
            inputs[name].CopyFrom(to_value(values[name]))
    defaulted = []
    if len(given) != len(values):
        for name, value in values.items():
            if name not in given:
                inputs[name].CopyFrom(to_value(value))
                defaulted.append(name)
        defaulted.sort()
        if with_defaulted:
            record.defaulted_fields.extend(defaulted)
    for name, digest in digests.items():
        inputs["text:" + name].string_value = digest
    return defaulted


def resolution_record(resolution: kpb.Decision, principal: str, links_to: int | None,
                      review: kpb.Review | None = None) -> kpb.AuditRecord:
    """The REVIEW_RESOLUTION record of ``resolution``, linked to the escalated decision's record
    (``links_to``), with ``review``'s human side as its JSON payload (``review_detail``)."""
    record = _record_of(kpb.REVIEW_RESOLUTION, resolution, principal)
    if links_to is not None:
        record.links_to = links_to
        record.has_link = True
    if review is not None:
        # The same JSON as the governance records' payloads. A plain field of the record (no tail):
        # the writer serializes it deterministically with the rest, so hash, chain and verify hold.
        record.payload = json.dumps(review_detail(review), sort_keys=True).encode()
    return record


def review_detail(review: kpb.Review) -> dict:
    """Who resolved a review, their comment and its timing, as separate fields: the reason text
    "decided by R: C" cannot tell reviewer "eve" with comment "the auditor" from reviewer
    "eve: the auditor" with none, and SLA questions need the times, not prose."""
    return {
        "reviewer": review.resolved_by,
        "comment": review.comment,
        "claimed_unix_ns": review.claimed_unix_ns,
        "lease_expires_unix_ns": review.lease_expires_unix_ns,
        "resolved_unix_ns": review.resolved_unix_ns,
        "sla_deadline_unix_ns": review.sla_deadline_unix_ns,  # 0: no SLA
        "sla_missed": review.sla_missed,
    }
