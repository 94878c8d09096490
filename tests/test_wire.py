"""Re-tagging a field in protobuf wire bytes (kernel/wire.py and its compiled twin ext/wire.pyx)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fuzz_budget import examples

from kernel import wire as reference
from kernel._proto.aios.kernel.v1 import kernel_pb2 as kpb

try:
    from kernel._ext import wire as compiled
except ImportError:  # not built: the reference is still tested
    compiled = None
from kernel.accel import FORCE_PURE

IMPLEMENTATIONS = [pytest.param(reference, id="reference")] + (
    [] if compiled is None or FORCE_PURE else [pytest.param(compiled, id="cython")])

FIELDS = kpb.DecisionRequest.DESCRIPTOR.fields_by_name["fields"].number
INPUTS = kpb.AuditRecord.DESCRIPTOR.fields_by_name["inputs"].number

values = st.one_of(
    st.floats(allow_nan=False).map(lambda x: kpb.Value(number_value=x)),
    st.integers(-(1 << 63), (1 << 63) - 1).map(lambda i: kpb.Value(int_value=i)),
    st.text(max_size=20).map(lambda s: kpb.Value(string_value=s)),
    st.booleans().map(lambda b: kpb.Value(bool_value=b)),
)
requests = st.builds(
    lambda fields, texts, pipeline, priority, timeout: _request(fields, texts, pipeline, priority, timeout),
    st.dictionaries(st.text(max_size=12), values, max_size=12),
    st.dictionaries(st.text(max_size=8), st.text(max_size=200), max_size=3),
    st.text(max_size=20), st.integers(0, 5), st.integers(0, 1 << 40),
)


def _request(fields, texts, pipeline, priority, timeout) -> kpb.DecisionRequest:
    request = kpb.DecisionRequest(pipeline=pipeline, priority=priority, timeout_ms=timeout, tenant="t")
    for name, value in fields.items():
        request.fields[name].CopyFrom(value)
    for name, text in texts.items():
        request.text_fields[name] = text
    return request


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@settings(max_examples=examples(300), deadline=None)
@given(request=requests)
def test_a_requests_field_map_becomes_an_audit_records_inputs(impl, request):
    record = kpb.AuditRecord.FromString(impl.retag(request.SerializeToString(), FIELDS, INPUTS))
    assert dict(record.inputs) == dict(request.fields)
    assert record.ListFields() == ([] if not request.fields else [(kpb.AuditRecord.DESCRIPTOR.fields_by_name["inputs"],
                                                                    record.inputs)])


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_long_tags_and_lengths_and_other_fields_are_handled(impl):
    request = kpb.DecisionRequest(pipeline="p" * 300, fields={"x" * 200: kpb.Value(string_value="y" * 500)})
    data = request.SerializeToString()
    assert kpb.DecisionRequest.FromString(impl.retag(data, FIELDS, FIELDS)) == kpb.DecisionRequest(
        fields=request.fields)
    big = impl.retag(data, FIELDS, 100_000)  # a tag of several bytes
    assert big.endswith(bytes(request.fields["x" * 200].SerializeToString()))
    assert impl.retag(b"", FIELDS, INPUTS) == b""


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("data, fragment", [
    (b"\x2a\x05ab", "runs past the end"),  # field 5, length 5, 2 bytes left
    (b"\x2a", "varint runs past the end"),
    (b"\x00\x01", "field number 0"),
    (b"\x0b", "group 1 is not closed"),
    (b"\x0b\x2b\x2c", "group 1 is not closed"),  # group 5 inside it closed, 1 not
    (b"\x0c", "end of a group 1 that is not open"),
    (b"\x0b\x14", "end of a group 2 that is not open"),
    (b"\x0e", "wire type 6"),
    (b"\x08" + b"\xff" * 10 + b"\x01", "longer than 10 bytes"),
    (b"\x08" + b"\xff" * 9 + b"\x7f", "longer than 64 bits"),
    (b"\x09\x00", "runs past the end"),  # a fixed64 cut short
])
def test_malformed_bytes_are_refused_with_a_reason(impl, data, fragment):
    with pytest.raises(ValueError, match=fragment):
        impl.retag(data, FIELDS, INPUTS)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    return bytes(out + bytes([value]))


def _tag(number: int, wire_type: int) -> bytes:
    return _varint(number << 3 | wire_type)


# What a caller may append to a request that still parses: the parser keeps each as an unknown field (the
# map field sent with another wire type too) and serializing the request writes it back.
UNKNOWN_FIELDS = [
    _tag(FIELDS, 0) + b"\x01", _tag(FIELDS, 1) + bytes(8), _tag(FIELDS, 5) + bytes(4),
    _tag(FIELDS, 3) + _tag(FIELDS, 4), _tag(999, 3) + _tag(999, 4),
    _tag(999, 3) * 40 + _tag(999, 4) * 40,
    _tag(999, 3) + _tag(FIELDS, 2) + b"\x00" + _tag(999, 4),  # the map's number, length-delimited, in a group
    _tag(999, 0) + b"\x01", _tag(999, 2) + b"\x03abc",
]


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@settings(max_examples=examples(100), deadline=None)
@given(request=requests, unknown=st.lists(st.sampled_from(UNKNOWN_FIELDS), min_size=1, max_size=4))
def test_unknown_fields_a_request_kept_are_skipped(impl, request, unknown):
    """Regression: a Decide whose bytes held one of these (which parse: the kernel decided the case) answered
    INTERNAL, its task FAILED INTERNAL, as the audit record was built ("field 5 is not length-delimited",
    "wire type 3"). Repro: a good claims request's bytes + b"\\x29" + bytes(8), through a raw channel."""
    parsed = kpb.DecisionRequest.FromString(request.SerializeToString() + b"".join(unknown))
    record = kpb.AuditRecord.FromString(impl.retag(parsed.SerializeToString(), FIELDS, INPUTS))
    assert dict(record.inputs) == dict(request.fields)


@pytest.mark.skipif(compiled is None or FORCE_PURE, reason="the compiled twin is not built")
@settings(max_examples=examples(2000), deadline=None)
@given(data=st.binary(max_size=64), field=st.integers(1, 20), new_field=st.integers(1, 1 << 20))
def test_compiled_and_reference_agree_on_any_bytes(data, field, new_field):
    outcomes = []
    for impl in (reference, compiled):
        try:
            outcomes.append(("ok", impl.retag(data, field, new_field)))
        except ValueError as exc:
            outcomes.append(("error", str(exc)))
    assert outcomes[0] == outcomes[1]
