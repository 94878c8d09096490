"""The compiled request reader and one-row encoder (kernel/pipelines/rowcodec.py) against their
definitions: ``FieldSpec.read`` per field, the unknown/required checks, and ``encode_one``."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from examples.claims import data
from kernel._proto.aios.kernel.v1 import kernel_pb2 as kpb
from kernel.decision_client import to_value
from kernel.errors import InvalidArgument
from kernel.pipelines import load_pipeline
from kernel.pipelines.fields import FieldSpec, encode_one
from kernel.pipelines.rowcodec import RowCodec
from kernel.policy import load_policy

PIPELINE = Path(__file__).resolve().parent.parent / "examples" / "claims" / "pipelines" / "claims_triage.toml"

SPECS = (
    FieldSpec("amount", "number", required=True, min=0.0, max=1e6, encode="standardize", transform="log1p",
              mean=7.0, std=1.5),
    FieldSpec("score", "number", default=0.5, min=0.0, max=1.0, encode="raw"),
    FieldSpec("free", "number", default=0.0, encode="standardize", mean=3.0, std=2.0),
    FieldSpec("count", "integer", default=0, min=0, max=50, encode="raw"),
    FieldSpec("age", "integer", default=1, encode="standardize", transform="log1p", mean=1.0, std=0.5),
    FieldSpec("tier", "string", default="silver", values=("gold", "silver", "bronze"), encode="onehot"),
    FieldSpec("note", "string", default=""),
    FieldSpec("police", "bool", default=False, encode="bool"),
)
WIDTH = sum(spec.width for spec in SPECS)


def reference_read(fields: tuple[FieldSpec, ...], pipeline: str, given) -> dict:
    """What a request's fields mean, spelled out: unknown names first, then each field in order."""
    by_name = {spec.name: spec for spec in fields}
    for name in given:
        if name not in by_name:
            raise InvalidArgument(f"field '{name}' is not a field of pipeline '{pipeline}' "
                                  f"(fields: {', '.join(by_name)})")
    values = {}
    for spec in fields:
        if spec.name in given:
            values[spec.name] = spec.read(given[spec.name])
        elif spec.required:
            raise InvalidArgument(f"field '{spec.name}' is required by pipeline '{pipeline}'")
        else:
            values[spec.name] = spec.default
    return values


def outcome(call):
    try:
        return ("ok", call())
    except InvalidArgument as exc:
        return ("error", exc.message)


def same(a, b) -> bool:
    if a[0] != b[0]:
        return False
    if a[0] == "error":
        return a[1] == b[1]
    return a[1].keys() == b[1].keys() and all(
        type(a[1][k]) is type(b[1][k]) and (a[1][k] == b[1][k] or (isinstance(a[1][k], float) and math.isnan(a[1][k])))
        for k in a[1]
    )


values_st = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True), st.integers(-(2**63), 2**63 - 1), st.booleans(),
    st.sampled_from(["gold", "silver", "bronze", "platinum", ""]), st.text(max_size=5), st.none(),
)
VALID = {
    "amount": st.floats(0, 1e6), "score": st.floats(0, 1), "free": st.floats(-1e6, 1e6),
    "count": st.integers(0, 50), "age": st.integers(0, 10**6), "tier": st.sampled_from(["gold", "silver", "bronze"]),
    "note": st.text(max_size=5), "police": st.booleans(),
}
# Mostly valid values (so both paths are exercised), sometimes anything, sometimes an unknown name.


def mostly(valid, chance_of_anything: int = 12):
    """A valid value, and one time in ``chance_of_anything`` any value at all."""
    return st.tuples(st.integers(0, chance_of_anything - 1), valid, values_st).map(lambda t: t[1] if t[0] else t[2])


_mostly_valid = {name: mostly(valid) for name, valid in VALID.items()}
requests_st = st.tuples(
    st.fixed_dictionaries({}, optional=_mostly_valid),
    st.sampled_from(["amount"] * 4 + ["", "unknown"]),  # the required field mostly there, an unknown one rarely
    mostly(VALID["amount"]),
).map(lambda t: {**t[0], t[1]: t[2]} if t[1] else t[0])


@settings(max_examples=500, deadline=None)
@given(requests_st)
def test_compiled_reader_agrees_with_the_field_definitions(fields):
    request = kpb.DecisionRequest()
    for name, value in fields.items():
        if value is None:
            request.fields[name]  # an empty Value: present, of no kind
        else:
            request.fields[name].CopyFrom(to_value(value))
    codec = RowCodec("p", SPECS, WIDTH)
    expected = outcome(lambda: reference_read(SPECS, "p", request.fields))
    got = outcome(lambda: codec.read(request.fields))
    assert same(got, expected), (got, expected)
    if expected[0] == "ok":
        assert outcome(lambda: codec.encode(got[1]).tobytes()) == outcome(
            lambda: encode_one(SPECS, expected[1], WIDTH).tobytes())


def test_claims_cases_read_and_encode_exactly_as_defined():
    pipeline = load_pipeline(PIPELINE, load_policy)
    for case in data.generate_cases(500, seed=11):
        request = kpb.DecisionRequest()
        for name in data.REQUEST_FIELDS:
            request.fields[name].CopyFrom(to_value(case[name]))
        values = pipeline.codec.read(request.fields)
        assert values == reference_read(pipeline.fields, pipeline.name, request.fields)
        assert np.array_equal(pipeline.codec.encode(values), encode_one(pipeline.fields, values, pipeline.width))


def test_a_value_beyond_float32_is_refused_by_name():
    codec = RowCodec("p", SPECS, WIDTH)
    with pytest.raises(InvalidArgument, match="field 'free'"):
        codec.encode({**{s.name: s.default for s in SPECS}, "amount": 1.0, "free": 1e300})
