"""Counting what a ModelInferRequest's bytes would make protobuf hold (kernel/infer_scan.py and its compiled twin
ext/infer_scan.pyx), against what upb actually parses from the same bytes.

The requests are encoded here field by field, in random order, packed or not, split over several occurrences,
with unknown fields and groups between them: every encoding a parser accepts, not only the one upb writes.
"""

from __future__ import annotations

import math
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fuzz_budget import examples
from wire_bytes import delimited, key, varint

from kernel import infer_scan as reference
from kernel._proto.inference import grpc_service_pb2 as pb

try:
    from kernel._ext import infer_scan as compiled
except ImportError:  # not built: the reference is still tested
    compiled = None
from kernel.accel import FORCE_PURE
from kernel.limits import MAX_BYTES_ELEMENTS

IMPLEMENTATIONS = [pytest.param(reference, id="reference")] + (
    [] if compiled is None or FORCE_PURE else [pytest.param(compiled, id="cython")])

FIELDS = {field.number: field.name for field in pb.InferTensorContents.DESCRIPTOR.fields}
NARROW = {"INT8": 1, "UINT8": 1, "INT16": 2, "UINT16": 2}
DATATYPES = ["BYTES", "INT64", "INT32", "INT16", "INT8", "UINT64", "UINT32", "UINT16", "UINT8", "BOOL", "FP32",
             "FP64", "FP16", "", "int8", *NARROW]  # (the narrow ones twice: they change how typed bytes count)


def element(number: int, value) -> bytes:
    """One value of InferTensorContents field ``number`` as its wire bytes, without a key."""
    if number == 6:
        return struct.pack("<f", value)
    if number == 7:
        return struct.pack("<d", value)
    return varint(value)


UNPACKED_TYPE = {1: 0, 2: 0, 3: 0, 4: 0, 5: 0, 6: 5, 7: 1}
VALUES = {1: st.integers(0, 1), 2: st.integers(-(1 << 31), (1 << 31) - 1), 3: st.integers(-(1 << 63), (1 << 63) - 1),
          4: st.integers(0, (1 << 32) - 1), 5: st.integers(0, (1 << 64) - 1),
          6: st.floats(width=32, allow_nan=False), 7: st.floats(allow_nan=False), 8: st.binary(max_size=3)}
unknown = st.one_of(  # fields a parser keeps as unknown bytes: numbers the messages do not use, and groups
    st.builds(lambda n, v: key(n, 0) + varint(v), st.integers(9, 40), st.integers(0, 1 << 64 - 1)),
    st.builds(lambda n, b: delimited(n, b), st.integers(9, 40), st.binary(max_size=4)),
    st.builds(lambda n: key(n, 5) + b"\x01\x02\x03\x04", st.integers(9, 40)),
    st.builds(lambda n, inner: key(n, 3) + key(5, 2) + b"\x02\x42\x00" + inner + key(n, 4),
              st.integers(9, 40), st.sampled_from([b"", key(7, 3) + key(7, 4)])),
)


@st.composite
def contents(draw) -> bytes:
    parts = []
    for number in draw(st.lists(st.sampled_from([1, 2, 3, 4, 4, 5, 6, 7, 8]), max_size=6)):
        values = draw(st.lists(VALUES[number], max_size=12))
        if number == 8:
            parts += [delimited(8, value) for value in values]
        elif draw(st.booleans()):  # packed
            parts.append(delimited(number, b"".join(element(number, v) for v in values)))
        else:
            parts += [key(number, UNPACKED_TYPE[number]) + element(number, v) for v in values]
        parts += draw(st.lists(unknown, max_size=1))
    return b"".join(parts)


@st.composite
def tensors(draw) -> bytes:
    parts = []
    for number in draw(st.lists(st.sampled_from([1, 2, 2, 3, 4, 5, 5]), max_size=7)):
        if number == 1:
            parts.append(delimited(1, draw(st.text(max_size=4)).encode()))
        elif number == 2:
            parts.append(delimited(2, draw(st.sampled_from(DATATYPES)).encode()))
        elif number == 3:
            dims = draw(st.lists(st.one_of(st.integers(0, 3), st.integers(-(1 << 63), (1 << 63) - 1)), max_size=5))
            if draw(st.booleans()):
                parts.append(delimited(3, b"".join(varint(d) for d in dims)))
            else:
                parts += [key(3, 0) + varint(d) for d in dims]
        elif number == 4:  # a parameter: {"k<n>": bool_param true}, each key once
            parts.append(parameter(4, f"k{len(parts)}"))
        else:
            parts.append(delimited(5, draw(contents())))
        parts += draw(st.lists(unknown, max_size=1))
    return b"".join(parts)


def parameter(number: int, name: str) -> bytes:
    """A parameters map entry {name: bool_param true} as field ``number``."""
    return delimited(number, delimited(1, name.encode()) + delimited(2, b"\x08\x01"))


@st.composite
def requests(draw) -> bytes:
    parts = [delimited(1, b"m")]
    for number in draw(st.lists(st.sampled_from([5, 5, 5, 6, 7, 4, 0]), max_size=5)):
        if number == 5:
            parts.append(delimited(5, draw(tensors())))
        elif number == 4:
            parts.append(parameter(4, f"r{len(parts)}"))
        elif number == 6:
            named = draw(st.lists(st.integers(0, 9), max_size=2, unique=True))
            parts.append(delimited(6, delimited(1, b"out") + b"".join(parameter(2, f"o{n}") for n in named)))
        elif number == 7:
            parts.append(delimited(7, draw(st.binary(max_size=4))))
        else:
            parts.append(draw(unknown))
    return b"".join(parts)


def expected(message: pb.ModelInferRequest, max_strings: int, max_typed: int, max_dims: int):
    """What ``scan`` must return, from the parsed message."""
    strings = typed = 0
    for index, tensor in enumerate(message.inputs):
        counts = [0] + [len(getattr(tensor.contents, FIELDS[number])) for number in range(1, 9)]
        strings += counts[8]
        for number in range(1, 8):
            width = NARROW.get(tensor.datatype) if number in (2, 4) else None
            typed += counts[number] * (width or reference.WIDTH[number])
        if strings > max_strings or typed > max_typed or len(tensor.shape) > max_dims:
            return (index, tensor.name.encode(), tensor.datatype.encode(), list(tensor.shape)[:max_dims + 1],
                    len(tensor.shape), counts, strings, typed)
    return None


def parameters_sent(data: bytes) -> int:
    """The parameters entries of the request, its inputs and its outputs, as parsed (the strategies never repeat a
    key in one map: a repeated key would count once parsed and each time on the wire, as the scan counts it)."""
    message = pb.ModelInferRequest.FromString(data)
    return (len(message.parameters) + sum(len(t.parameters) for t in message.inputs)
            + sum(len(o.parameters) for o in message.outputs))


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@settings(max_examples=examples(300), deadline=None)
@given(data=requests(), limits=st.tuples(st.integers(-1, 40), st.integers(-1, 400), st.integers(-1, 6)))
def test_the_counts_are_what_the_parser_makes_of_the_bytes(impl, data, limits):
    message = pb.ModelInferRequest.FromString(data)
    assert impl.scan(data, *limits) == expected(message, *limits)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@settings(max_examples=examples(300), deadline=None)
@given(data=requests())
def test_the_entries_are_the_parsed_requests(impl, data):
    message = pb.ModelInferRequest.FromString(data)
    assert impl.entries(data) == (len(message.inputs), len(message.outputs), len(message.raw_input_contents),
                                  parameters_sent(data))


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@settings(max_examples=examples(300), deadline=None)
@given(data=st.one_of(st.binary(max_size=64), requests().flatmap(
    lambda whole: st.integers(0, len(whole)).map(lambda cut: whole[:cut]))),
       limits=st.tuples(st.integers(-1, 4), st.integers(-1, 40), st.integers(-1, 3)))
def test_bytes_that_are_no_message_never_raise_and_both_agree(impl, data, limits):
    """Random and cut-off bytes: never an exception (the deserializer must not raise), the twins the same, and
    when the parser takes the bytes, the counts it makes."""
    found, entries = impl.scan(data, *limits), impl.entries(data)
    if compiled is not None and impl is reference:
        assert (compiled.scan(data, *limits), compiled.entries(data)) == (found, entries)
    try:
        message = pb.ModelInferRequest.FromString(data)
    except Exception:
        return
    assert found == expected(message, *limits)
    assert entries == (len(message.inputs), len(message.outputs), len(message.raw_input_contents),
                       parameters_sent(data))


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_groups_nested_a_million_deep_are_skipped_without_recursion(impl):
    data = key(9, 3) * 1_000_000 + key(9, 4) * 1_000_000 + delimited(5, delimited(1, b"x") + delimited(3, b"\x01" * 3))
    assert impl.scan(data, 0, 0, 2)[1:5] == (b"x", b"", [1, 1, 1], 3)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_a_varint_run_of_a_packed_field_is_counted_by_its_last_bytes(impl):
    values = [0, 1, 127, 128, 300, 1 << 40, -1, -(1 << 63)]
    data = delimited(5, delimited(2, b"INT64") + delimited(5, delimited(3, b"".join(map(varint, values)))))
    found = impl.scan(data, 0, 8 * len(values) - 1, 4)
    assert found[5][3] == len(values) and found[7] == 8 * len(values) and math.prod(found[3]) == 1


# -- the refusal's words (kernel/api/wire_limits.py), for requests past SCAN_ABOVE -------------------------------
def _input(name: bytes, datatype: bytes, shape: list[int], contents: bytes) -> bytes:
    return delimited(5, delimited(1, name) + delimited(2, datatype) + delimited(3, b"".join(map(varint, shape)))
                     + delimited(5, contents))


def test_values_that_do_not_match_the_shape_are_refused_naming_what_was_sent():
    from kernel.api import wire_limits

    count = MAX_BYTES_ELEMENTS + 1  # (empty strings: twice as many bytes, past SCAN_ABOVE)
    words = wire_limits.refusal(_input(b"s", b"BYTES", [1, 1], delimited(8, b"") * count))
    assert words.startswith(f"input 's': contents.bytes_contents of {count:,} elements makes {count:,} BYTES "
                            "elements in this request; at most 1,048,576 are taken"), words


def test_what_the_check_after_parsing_takes_is_not_refused_from_the_bytes():
    """INT8 values come in int_contents, 4 bytes each in upb's array, but the kernel's limit counts one byte a
    decoded element: 20M of them are within it, and a request the kernel serves today is still served."""
    from kernel.api import wire_limits

    count = 20 << 20
    assert wire_limits.refusal(_input(b"q", b"INT8", [1, count], delimited(2, bytes(count)))) is None
    small = _input(b"q", b"INT8", [1] * 100, delimited(2, bytes(1000)))  # (100 dims: refused after parsing)
    assert wire_limits.refusal(small) is None and len(small) <= wire_limits.SCAN_ABOVE


# -- field_count: a DecisionRequest's (or StartTask's) fields and text fields (wire_limits.decision_refusal) --------
@st.composite
def decision_requests(draw):
    from kernel._proto.aios.kernel.v1 import kernel_pb2 as kpb

    request = kpb.DecisionRequest(pipeline=draw(st.text(max_size=3)), tenant=draw(st.text(max_size=3)))
    for name, value in draw(st.dictionaries(st.text(max_size=4), st.booleans(), max_size=6)).items():
        request.fields[name].bool_value = value
    for name, value in draw(st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=4)).items():
        request.text_fields[name] = value
    return request


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@settings(max_examples=examples(300), deadline=None)
@given(request=decision_requests(), cut=st.floats(0, 1))
def test_field_counts_are_the_parsed_requests_and_cut_bytes_never_raise(impl, request, cut):
    from kernel._proto.aios.kernel.v1 import kernel_pb2 as kpb

    data = request.SerializeToString()
    task = kpb.StartTaskRequest(request=request).SerializeToString()
    assert impl.field_count(data, 5) + impl.field_count(data, 6) == len(request.fields) + len(request.text_fields)
    assert impl.field_count(task, 5, 1) + impl.field_count(task, 6, 1) == len(request.fields) + len(request.text_fields)
    cut_data = task[:int(len(task) * cut)]
    counted = [impl.field_count(cut_data, number, within) for number, within in ((5, 0), (5, 1), (6, 1))]
    if compiled is not None and impl is reference:
        assert [compiled.field_count(cut_data, n, w) for n, w in ((5, 0), (5, 1), (6, 1))] == counted
