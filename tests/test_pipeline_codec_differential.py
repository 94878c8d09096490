"""The compiled row codec (ext/rowcodec.pyx) against its reference (kernel/pipelines/rowcodec.py) on random
pipelines and random requests: the same values, rows, hashes and errors (type and message), valid or not.

Pipelines are drawn with awkward specs on purpose (bounds that are NaN, infinite, beyond int64, integers
no double holds, duplicate categories, a zero std); requests with missing, unknown and repeated-kind
fields, NaN/inf, out-of-range numbers, bools for numbers, integral doubles for integers, int64 extremes
and unicode. Skipped where the extension is not built or with ``AIOS_PURE_PYTHON=1``.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzz_budget import examples

from kernel import accel
from kernel._proto.aios.kernel.v1 import kernel_pb2 as kpb
from kernel.decision_client import to_value
from kernel.pipelines import provenance
from kernel.pipelines.fields import FieldSpec
from kernel.pipelines.rowcodec import RowCodec as ReferenceRowCodec

compiled = pytest.importorskip("kernel._ext.rowcodec", reason="compiled row codec not built")
pytestmark = pytest.mark.skipif(accel.FORCE_PURE, reason="AIOS_PURE_PYTHON=1: the reference alone")

NAMES = ("amount", "count", "tier", "flag", "ñame", "a b", "x", "it's")
CATEGORIES = ("gold", "silver", "ünï", "it's", "", "a\\b")
WIRE_EDGES = (0, 0.5, -1, -1.0, 1e300, -0.0, 2**53 + 1, -(2**53) - 1, 2**63 - 1, -(2**63), 2.0**63, -(2.0**63))
EDGE_NUMBERS = WIRE_EDGES + (2**63, 10**30)

# Characters whose repr or UTF-8 is special (quotes, backslash, controls, the separator, non-ASCII), then any.
text_st = st.text(st.one_of(st.sampled_from("ab'\"\\ \x00\x1f\x7fü€😀"), st.characters(blacklist_categories=("Cs",))),
                  max_size=6)
# Mostly no bound (so values take the fast paths), else an awkward one.
bound_st = st.one_of(st.just(None), st.just(None), st.just(None), st.floats(), st.integers(-(2**70), 2**70),
                     st.sampled_from(EDGE_NUMBERS))
wire_value_st = st.one_of(
    st.floats(), st.integers(-(2**63), 2**63 - 1), st.sampled_from(WIRE_EDGES),
    st.booleans(), text_st, st.sampled_from(CATEGORIES), st.none(),  # None: an empty Value
)
python_value_st = st.one_of(wire_value_st, st.integers(-(2**80), 2**80), st.text(max_size=4))


@st.composite
def spec_st(draw, name: str) -> FieldSpec:
    kind = draw(st.sampled_from(("number", "integer", "string", "bool")))
    values: tuple[str, ...] = ()
    if kind == "string":
        values = tuple(draw(st.lists(st.sampled_from(CATEGORIES), max_size=4)))
    encode = draw(st.sampled_from({"number": ("none", "standardize", "raw"), "integer": ("none", "standardize", "raw"),
                                   "string": ("none", "onehot"), "bool": ("none", "bool", "raw")}[kind]))
    required = draw(st.booleans())
    default = None if required else draw(st.one_of(python_value_st, st.sampled_from(values or (1.5,))))
    return FieldSpec(
        name, kind, required=required, default=default, min=draw(bound_st), max=draw(bound_st), values=values,
        encode=encode, transform=draw(st.sampled_from(("none", "log1p"))),
        mean=draw(st.one_of(st.floats(-1e6, 1e6), st.integers(-(2**60), 2**60))),
        std=draw(st.one_of(st.floats(-10, 1e6), st.sampled_from((0, 0.0, 3)))),
    )


@st.composite
def pipeline_st(draw) -> tuple[FieldSpec, ...]:
    names = draw(st.lists(st.sampled_from(NAMES), min_size=1, max_size=6, unique=True))
    return tuple(draw(spec_st(name)) for name in names)


def plain_st(spec: FieldSpec):
    """Values of the kind the spec's type reads (often valid), mixed with anything at all."""
    plain = {"number": st.floats(allow_nan=False, allow_infinity=False), "integer": st.integers(-(2**63), 2**63 - 1),
             "string": st.sampled_from(spec.values) if spec.values else text_st, "bool": st.booleans()}[spec.type]
    return st.one_of(plain, plain, plain, wire_value_st)


def request_of(fields: dict, text: dict) -> kpb.DecisionRequest:
    request = kpb.DecisionRequest(pipeline="p")
    for name, value in fields.items():
        if value is None:
            request.fields[name]
        else:
            request.fields[name].CopyFrom(to_value(value))
    for name, value in text.items():
        request.text_fields[name] = value
    return kpb.DecisionRequest.FromString(request.SerializeToString())


def norm(x):
    """Comparable form: arrays by dtype, shape and bytes; dicts by key order, value types and reprs (NaN, -0.0)."""
    if isinstance(x, np.ndarray):
        return ("array", x.dtype.str, x.shape, x.tobytes())
    if isinstance(x, dict):
        return ("dict", tuple((k, type(v).__name__, repr(v)) for k, v in x.items()))
    if isinstance(x, tuple):
        return tuple(norm(e) for e in x)
    return x


def outcome(call):
    try:
        return ("ok", norm(call()))
    except Exception as exc:  # any error: the compiled codec must raise the same one
        return ("error", type(exc).__name__, str(exc))


def both(fields: tuple[FieldSpec, ...]):
    width = sum(spec.width for spec in fields)
    return ReferenceRowCodec("pipé", fields, width), compiled.RowCodec("pipé", fields, width)


@settings(max_examples=examples(400), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), fields=pipeline_st())
def test_random_requests_read_encode_and_hash_the_same(data, fields):
    reference, codec = both(fields)
    given_fields = data.draw(st.fixed_dictionaries(
        {}, optional={**{spec.name: plain_st(spec) for spec in fields}, "unknown": wire_value_st, "ünknown": wire_value_st}))
    text = data.draw(st.dictionaries(st.sampled_from(["note", "ñote"]), text_st, max_size=2))
    request = request_of(given_fields, text)
    digests = provenance.text_digests(request.text_fields)
    assert outcome(lambda: codec.read(request.fields)) == outcome(lambda: reference.read(request.fields))
    assert outcome(lambda: codec.read_encode_hash(request, digests)) == outcome(
        lambda: reference.read_encode_hash(request, digests))


@settings(max_examples=examples(400), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), fields=pipeline_st())
def test_random_values_encode_and_hash_the_same(data, fields):
    reference, codec = both(fields)
    names = [spec.name for spec in fields]
    values = data.draw(st.fixed_dictionaries({spec.name: st.one_of(plain_st(spec), python_value_st) for spec in fields}))
    if data.draw(st.integers(0, 7)) == 0:  # now and then a field is missing
        del values[data.draw(st.sampled_from(names))]
    digests = data.draw(st.one_of(st.dictionaries(text_st, text_st, max_size=2),
                                  st.dictionaries(st.one_of(text_st, st.integers()), python_value_st, max_size=2)))
    assert outcome(lambda: codec.encode(values)) == outcome(lambda: reference.encode(values))
    assert outcome(lambda: codec.input_hash(values, digests)) == outcome(lambda: reference.input_hash(values, digests))


def test_the_wire_reader_ignores_other_request_fields_and_takes_each_field_once():
    fields = (FieldSpec("x", "number", required=True, encode="raw"),
              FieldSpec("t", "string", default="", values=("a", "b"), encode="onehot"))
    reference, codec = both(fields)
    request = kpb.DecisionRequest(pipeline="p", tenant="t", request_id="r", idempotency_key="k", priority=3,
                                  timeout_ms=2**40)
    request.fields["x"].number_value = 2.5
    request.fields["t"].string_value = "b"
    request.text_fields["story"] = "ünï" * 400  # longer than the stack buffer of the hash text
    digests = provenance.text_digests(request.text_fields)
    assert outcome(lambda: codec.read_encode_hash(request, digests)) == outcome(
        lambda: reference.read_encode_hash(request, digests))
    # A message that is not a DecisionRequest goes through its `fields` map, as the reference does.
    holder = kpb.DecisionRequest()
    holder.fields["x"].int_value = 7

    class Fields:
        fields = holder.fields

    assert outcome(lambda: codec.read_encode_hash(Fields(), {})) == outcome(lambda: reference.read_encode_hash(Fields(), {}))


def test_many_fields_use_the_heap_and_agree():
    fields = tuple(FieldSpec(f"f{i:03d}", "number", default=float(i), encode="standardize", mean=1.0, std=3.0)
                   for i in range(150))
    reference, codec = both(fields)
    request = request_of({"f007": 0.25, "f149": -3.5}, {})
    assert outcome(lambda: codec.read_encode_hash(request, {})) == outcome(lambda: reference.read_encode_hash(request, {}))


def test_a_width_that_does_not_match_the_fields_fails_as_the_reference_does():
    fields = (FieldSpec("t", "string", default="a", values=("a", "b", "c"), encode="onehot"),)
    for width in (1, 2, 5):
        reference, codec = ReferenceRowCodec("p", fields, width), compiled.RowCodec("p", fields, width)
        assert outcome(lambda: codec.encode({"t": "b"})) == outcome(lambda: reference.encode({"t": "b"}))


# One field per pipeline, every awkward value: the cases random draws reach only rarely.
EDGE_SPECS = (
    FieldSpec("n", "number", default=0.0, encode="raw"),
    FieldSpec("nl", "number", default=0.0, encode="standardize", transform="log1p", mean=1.0, std=2.0),
    FieldSpec("nb", "number", default=2.0**60, min=2**53 + 1, max=2**60, encode="raw"),  # bounds no double holds
    FieldSpec("nn", "number", default=0.0, max=float("nan"), encode="raw"),
    FieldSpec("i", "integer", default=0, encode="raw"),
    FieldSpec("ih", "integer", default=1, min=0.5, max=10.5, encode="standardize", mean=3, std=2),
    FieldSpec("il", "integer", default=0, encode="standardize", transform="log1p", mean=0.0, std=1.0),
    FieldSpec("iw", "integer", default=0, min=-1e30, max=float("inf"), encode="raw"),
    FieldSpec("s", "string", default="", values=("a", "it's", "ü", "a\\b", "a"), encode="onehot"),
    FieldSpec("sa", "string", default="x"),
    FieldSpec("b", "bool", default=False, encode="bool"),
    FieldSpec("br", "bool", default=True, encode="raw"),
)
EDGE_VALUES = (
    None, 0.0, -0.0, 0.5, -0.5, -1.0, -1, 0, 1, 10, 11, 9.5, 10.5, 2.0**53, 2**53 + 1, 2.0**60, 2**60,
    float("nan"), float("inf"), float("-inf"), 3.5e38, -3.5e38, 3.4028234663852886e38, 3.4028235677973366e38,
    1e300, 5e-324, 2**63 - 1, -(2**63), 2.0**63, True, False, "", "a", "it's", "ü", "a\\b", "A", "\x00", "1.5",
)


@pytest.mark.parametrize("spec", EDGE_SPECS, ids=lambda spec: spec.name)
def test_edge_values_agree(spec):
    reference, codec = both((spec,))
    for value in EDGE_VALUES:
        request = request_of({spec.name: value}, {})
        assert outcome(lambda: codec.read(request.fields)) == outcome(lambda: reference.read(request.fields)), value
        assert outcome(lambda: codec.read_encode_hash(request, {})) == outcome(
            lambda: reference.read_encode_hash(request, {})), value
        if value is not None:
            values = {spec.name: value}
            assert outcome(lambda: codec.encode(values)) == outcome(lambda: reference.encode(values)), value
            assert outcome(lambda: codec.input_hash(values, {})) == outcome(
                lambda: reference.input_hash(values, {})), value
