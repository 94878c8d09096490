"""A decision record's last fields written as bytes (``audit.RecordWithTail``, ``provenance.decision_tail``).

The decision flow no longer parses a request's fields into the audit record
only for the writer to serialize them again: it appends them, with the model's
scores and the task id, as bytes after the record's own deterministic
serialization. The claim checked here is that the stored bytes are still
exactly the record's deterministic serialization, for any fields, scores,
labels and task id (against upb), and for the records a running kernel writes.
"""

from __future__ import annotations

import math

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzz_budget import examples

from claims_support import claim_request, copy_pipelines
from examples.claims import data
from kernel._proto.aios.kernel.v1 import kernel_pb2 as kpb
from kernel._proto.aios.kernel.v1 import kernel_pb2_grpc as kgrpc
from kernel.audit import AuditLog, RecordFilter, RecordWithTail, iter_directory, verify_directory
from kernel.audit.record import split_stored
from kernel.audit.segments import FrameScanner, frames_start
from kernel.decision_client import to_value
from kernel.pipelines import provenance

_names = st.text(min_size=1, max_size=12)
_values = st.one_of(st.floats(allow_nan=False), st.text(max_size=20), st.booleans(),
                    st.integers(min_value=-(2**53), max_value=2**53))
_scores = st.floats(allow_nan=False, allow_infinity=False)


def _request(fields: dict, text: dict) -> kpb.DecisionRequest:
    request = kpb.DecisionRequest(pipeline="p", tenant="t", request_id="r")
    for name, value in fields.items():
        request.fields[name].CopyFrom(to_value(value))
    for name, value in text.items():
        request.text_fields[name] = value
    return request


def _head() -> kpb.AuditRecord:
    record = kpb.AuditRecord(kind=kpb.DECISION, sequence=7, prev_hash=b"\x01" * 32, time_unix_ns=123,
                             principal="anonymous", tenant="t", request_id="r", pipeline="p", pipeline_version="v")
    record.decision.action = "approve"
    return record


@settings(max_examples=examples(500), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(given_fields=st.dictionaries(_names, _values, max_size=6),
       defaults=st.dictionaries(_names, _values, max_size=3),
       text=st.dictionaries(_names, st.text(max_size=30), max_size=2),
       labels=st.lists(_names, min_size=1, max_size=5, unique=True),
       data_=st.data(),
       task_id=st.one_of(st.just(""), st.text(max_size=40)),
       request_hash=st.one_of(st.just(""), st.binary(min_size=32, max_size=32).map(bytes.hex)))
def test_the_tail_completes_the_records_deterministic_serialization(given_fields, defaults, text, labels, data_,
                                                                    task_id, request_hash):
    scores = data_.draw(st.lists(_scores, min_size=len(labels), max_size=len(labels)))
    request = _request(given_fields, text)
    values = {**{name: value for name, value in defaults.items() if name not in given_fields}, **given_fields}
    # Some integers sent where the pipeline takes a number (a float): the record holds the value as taken, the one
    # input_hash covers (the compliance audit). Built here without add_inputs, which the tail is checked against.
    whole = sorted(name for name, value in given_fields.items() if type(value) is int)
    for name in data_.draw(st.lists(st.sampled_from(whole), unique=True) if whole else st.just([])):
        values[name] = float(values[name])
    digests = provenance.text_digests(request.text_fields) if text else {}

    expected = _head()
    for name, value in values.items():
        expected.inputs[name].CopyFrom(to_value(value))
    for name, digest in digests.items():
        expected.inputs["text:" + name].string_value = digest
    for label, score in zip(labels, scores):
        expected.model_outputs[label] = score
    if task_id:
        expected.task_id = task_id
    expected.defaulted_fields.extend(sorted(name for name in values if name not in given_fields))
    if request_hash:
        expected.request_hash = bytes.fromhex(request_hash)

    tail = provenance.decision_tail(request, values, digests, scores, provenance.output_entries(labels), task_id,
                                    request_hash)
    assert _head().SerializeToString(deterministic=True) + tail == expected.SerializeToString(deterministic=True)


@pytest.mark.parametrize("labels", [["0", "00"], ["00", "0"], ["b", "a", "ab", "abc", "a\u00e9", "A"]])
def test_labels_where_one_starts_another_are_ordered_as_upb_orders_them(labels):
    """(upb puts the longer of two such keys first: hypothesis found ["0", "00"].)"""
    scores = [float(i) for i in range(len(labels))]
    expected = _head()
    for label, score in zip(labels, scores):
        expected.model_outputs[label] = score
    tail = provenance.decision_tail(_request({}, {}), {}, {}, scores, provenance.output_entries(labels), "")
    assert _head().SerializeToString(deterministic=True) + tail == expected.SerializeToString(deterministic=True)


def test_negative_zero_and_extreme_scores_keep_their_bits():
    labels, scores = ["b", "a", "c"], [-0.0, 5e-324, 1.7976931348623157e308]
    tail = provenance.decision_tail(_request({"x": 1.0}, {}), {"x": 1.0}, {}, scores,
                                    provenance.output_entries(labels), "")
    parsed = kpb.AuditRecord.FromString(tail)
    assert [math.copysign(1, parsed.model_outputs["b"]), parsed.model_outputs["a"], parsed.model_outputs["c"]] == \
        [-1.0, 5e-324, 1.7976931348623157e308]


def test_the_log_stores_a_record_with_its_tail_and_chains_it(tmp_path):
    request = _request({"amount": 12.5, "tier": "gold"}, {})
    values = {"amount": 12.5, "tier": "gold"}
    entries = provenance.output_entries(["approve", "deny"])
    with AuditLog.open(tmp_path) as log:
        tickets = log.append_many([
            RecordWithTail(kpb.AuditRecord(kind=kpb.DECISION, request_id=f"r{i}"),
                           provenance.decision_tail(request, values, {}, [0.25, 0.75], entries, f"task-{i}"))
            for i in range(3)])
        for ticket in tickets:
            ticket.wait(10)
        records = list(log.read())
    assert [r.request_id for r in records] == ["r0", "r1", "r2"]
    assert [r.task_id for r in records] == ["task-0", "task-1", "task-2"]
    assert all(dict(r.model_outputs) == {"approve": 0.25, "deny": 0.75} for r in records)
    assert all(r.inputs["tier"].string_value == "gold" and r.inputs["amount"].number_value == 12.5 for r in records)
    assert verify_directory(tmp_path).ok


def test_only_audit_records_and_records_with_a_tail_are_taken(tmp_path):
    from kernel.errors import InvalidArgument

    with AuditLog.open(tmp_path) as log:
        with pytest.raises(InvalidArgument):
            log.append_many([RecordWithTail(kpb.Decision(), b"")])


def _stored_canonicals(directory) -> list[bytes]:
    out = []
    for path in sorted(directory.glob("*.seg")):
        data_ = path.read_bytes()
        for _, payload in FrameScanner(data_, frames_start(path, data_)):
            out.append(split_stored(payload)[0])
    return out


def test_a_kernels_decision_records_are_their_deterministic_serialization(claims_models, tmp_path):
    """Requests with every field, with fields left to the pipeline's defaults, with free text, with an
    idempotency key: each stored record is byte for byte what upb's deterministic serialization gives."""
    from conftest import start_kernel

    data_dir = tmp_path / "data"
    server = start_kernel(claims_models, pipelines=str(copy_pipelines(tmp_path / "pipelines")),
                          data_dir=str(data_dir), pipeline_poll_s=0)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = kgrpc.DecisionServiceStub(channel)
            for i, case in enumerate(data.generate_cases(12, seed=41)):
                request = claim_request(case, request_id=f"t{i}")
                if i % 3 == 1:  # leave optional fields to the pipeline's defaults
                    for name in list(request.fields)[:2]:
                        del request.fields[name]
                if i % 4 == 2:
                    request.text_fields["notes"] = f"customer called {i} times"
                if i % 5 == 3:
                    request.idempotency_key = f"key-{i}"
                stub.Decide(request, timeout=10)  # (every claims field has a default)
    finally:
        server.stop(grace=1)
    decisions = {r.request_id: r for r in iter_directory(data_dir / "audit", 0, RecordFilter(kind=kpb.DECISION))}
    assert len(decisions) == 12
    assert all(len(decisions[f"t{i}"].inputs) == len(data.REQUEST_FIELDS) for i in (1, 4, 7))  # defaults in
    assert any(name.startswith("text:") for name in decisions["t2"].inputs)
    for i in range(12):  # a keyed request's record names its hash (what restores its key after a crash)
        keyed = decisions[f"t{i}"].idempotency_key
        assert bool(decisions[f"t{i}"].request_hash) == bool(keyed) and (not keyed or len(decisions[f"t{i}"].request_hash) == 32)
    for canonical in _stored_canonicals(data_dir / "audit"):
        assert kpb.AuditRecord.FromString(canonical).SerializeToString(deterministic=True) == canonical
    assert verify_directory(data_dir / "audit").ok
