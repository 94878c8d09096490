"""The pipeline row codecs against their definitions: ``FieldSpec.read`` per field, the unknown/required
checks, ``encode_one`` and ``provenance.input_hash``. Every test runs against the reference
(kernel/pipelines/rowcodec.py) and the compiled twin (ext/rowcodec.pyx, skipped when not built or
with ``AIOS_PURE_PYTHON=1``); tests/test_pipeline_codec_differential.py compares the two directly."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fuzz_budget import examples

from examples.claims import data
from kernel._proto.aios.kernel.v1 import kernel_pb2 as kpb
from kernel.decision_client import to_value
from kernel.errors import InvalidArgument, quote
from kernel import accel
from kernel.pipelines import load_pipeline, provenance
from kernel.pipelines.fields import FieldSpec, encode_one
from kernel.pipelines.rowcodec import RowCodec as ReferenceRowCodec
from kernel.policy import load_policy

try:
    from kernel._ext.rowcodec import RowCodec as CompiledRowCodec
except ImportError:  # not built: the compiled side is skipped
    CompiledRowCodec = None

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

_NO_COMPILED = pytest.mark.skipif(CompiledRowCodec is None or accel.FORCE_PURE,
                                  reason="compiled row codec not built or AIOS_PURE_PYTHON=1")
CODECS = [pytest.param(ReferenceRowCodec, id="reference"),
          pytest.param(CompiledRowCodec, id="compiled", marks=_NO_COMPILED)]


def reference_read(fields: tuple[FieldSpec, ...], pipeline: str, given) -> dict:
    """What a request's fields mean, spelled out: unknown names first, then each field in order."""
    by_name = {spec.name: spec for spec in fields}
    for name in given:
        if name not in by_name:
            raise InvalidArgument(f"field {quote(name)} is not a field of pipeline '{pipeline}' "
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


def request_of(fields: dict, text: dict | None = None) -> kpb.DecisionRequest:
    request = kpb.DecisionRequest(pipeline="p")
    for name, value in fields.items():
        if value is None:
            request.fields[name]  # an empty Value: present, of no kind
        else:
            request.fields[name].CopyFrom(to_value(value))
    for name, value in (text or {}).items():
        request.text_fields[name] = value
    # As the server sees it: parsed from the wire.
    return kpb.DecisionRequest.FromString(request.SerializeToString())


def defined(fields: tuple[FieldSpec, ...], width: int, pipeline: str, request, digests: dict):
    """What ``read_encode_hash`` must return, from the definitions alone."""
    values = reference_read(fields, pipeline, request.fields)
    return values, encode_one(fields, values, width), provenance.input_hash(pipeline, values, digests)


@pytest.mark.parametrize("codec_class", CODECS)
@settings(max_examples=examples(500), deadline=None)
@given(fields=requests_st, text=st.dictionaries(st.sampled_from(["note", "story", "ünï"]), st.text(max_size=8),
                                                max_size=2))
def test_codec_agrees_with_the_field_definitions(codec_class, fields, text):
    request = request_of(fields, text)
    digests = provenance.text_digests(request.text_fields)
    codec = codec_class("p", SPECS, WIDTH)
    expected = outcome(lambda: reference_read(SPECS, "p", request.fields))
    got = outcome(lambda: codec.read(request.fields))
    assert same(got, expected), (got, expected)
    if expected[0] == "ok":
        assert outcome(lambda: codec.encode(got[1]).tobytes()) == outcome(
            lambda: encode_one(SPECS, expected[1], WIDTH).tobytes())
        assert codec.input_hash(got[1], digests) == provenance.input_hash("p", expected[1], digests)
    fused = outcome(lambda: codec.read_encode_hash(request, digests))
    want = outcome(lambda: defined(SPECS, WIDTH, "p", request, digests))
    assert fused[0] == want[0], (fused, want)
    if want[0] == "ok":
        (values, row, digest), (want_values, want_row, want_digest) = fused[1], want[1]
        assert same(("ok", values), ("ok", want_values)) and list(values) == list(want_values)
        assert row.tobytes() == want_row.tobytes() and row.shape == want_row.shape == (1, WIDTH)
        assert digest == want_digest
    else:
        assert fused == want


@pytest.mark.parametrize("codec_class", CODECS)
def test_claims_cases_read_encode_and_hash_exactly_as_defined(codec_class):
    pipeline = load_pipeline(PIPELINE, load_policy)
    codec = codec_class(pipeline.name, pipeline.fields, pipeline.width)
    for i, case in enumerate(data.generate_cases(500, seed=11)):
        # Every fifth case leaves a field out (its default is used); some carry free text.
        fields = {name: case[name] for j, name in enumerate(data.REQUEST_FIELDS) if i % 5 or j != i % 8}
        request = request_of(fields, {"description": case["description"]} if i % 2 else None)
        digests = provenance.text_digests(request.text_fields)
        values = codec.read(request.fields)
        assert values == reference_read(pipeline.fields, pipeline.name, request.fields)
        assert np.array_equal(codec.encode(values), encode_one(pipeline.fields, values, pipeline.width))
        fused_values, row, digest = codec.read_encode_hash(request, digests)
        expected = defined(pipeline.fields, pipeline.width, pipeline.name, request, digests)
        assert fused_values == expected[0] and list(fused_values) == list(expected[0])
        assert row.tobytes() == expected[1].tobytes() and row.dtype == np.float32 and row.shape == (1, pipeline.width)
        assert digest == expected[2] == codec.input_hash(values, digests)


def test_the_pipeline_gets_the_compiled_codec_when_built():
    codec = load_pipeline(PIPELINE, load_policy).codec
    compiled = CompiledRowCodec is not None and not accel.FORCE_PURE
    assert type(codec) is (CompiledRowCodec if compiled else ReferenceRowCodec)
    assert accel.CHOSEN["row_codec"] == ("cython" if compiled else "python")


@pytest.mark.parametrize("codec_class", CODECS)
def test_a_value_beyond_float32_is_refused_by_name(codec_class):
    codec = codec_class("p", SPECS, WIDTH)
    with pytest.raises(InvalidArgument, match="field 'free'"):
        codec.encode({**{s.name: s.default for s in SPECS}, "amount": 1.0, "free": 1e300})
    with pytest.raises(InvalidArgument, match="field 'free'"):
        codec.read_encode_hash(request_of({"amount": 1.0, "free": 1e300}), {})


@pytest.mark.parametrize("codec_class", CODECS)
def test_an_unknown_name_is_shown_cut_and_quoted(codec_class):
    """(A workflow engine's audit) an unknown field's name, the caller's, was echoed whole: 100 KB of it made a
    ~1,800-character refusal (cut only by the message's own limit). Shown as ids are: quoted, cut at 80."""
    codec = codec_class("p", SPECS, WIDTH)
    with pytest.raises(InvalidArgument) as info:
        codec.read(request_of({"x" * 100_000: 1.0}).fields)
    assert f"field {'x' * 80!r}… (99920 more characters) is not a field of pipeline 'p'" in info.value.message
    with pytest.raises(InvalidArgument, match=r"field 'a\\nb' is not a field"):  # (a newline shown, not acted on)
        codec.read(request_of({"a\nb": 1.0}).fields)


@pytest.mark.parametrize("codec_class", CODECS)
def test_unknown_names_are_reported_before_other_mistakes(codec_class):
    codec = codec_class("p", SPECS, WIDTH)
    for fields in ({"zzz": 1.0}, {"amount": "gold", "zzz": 1.0}, {"amount": -5.0, "zzz": 1}, {"tier": 1, "zzz": 1}):
        request = request_of(fields)
        with pytest.raises(InvalidArgument, match="field 'zzz' is not a field of pipeline 'p'"):
            codec.read(request.fields)
        with pytest.raises(InvalidArgument, match="field 'zzz' is not a field of pipeline 'p'"):
            codec.read_encode_hash(request, {})


@pytest.mark.parametrize("codec_class", CODECS)
def test_what_the_wire_reader_does_not_know_takes_the_object_path(codec_class):
    # A Value with a member from a newer schema (field 9) keeps it as an unknown field; the kind the
    # codec reads is still number_value, so the request is valid and decided as the definitions say.
    value = kpb.Value(number_value=250.0).SerializeToString() + bytes([9 << 3, 1])
    entry = b"\x0a\x06amount\x12" + bytes([len(value)]) + value
    request = kpb.DecisionRequest.FromString(b"\x2a" + bytes([len(entry)]) + entry + b"\x7a\x03abc")
    codec = codec_class("p", SPECS, WIDTH)
    values, row, digest = codec.read_encode_hash(request, {})
    expected = defined(SPECS, WIDTH, "p", request, {})
    assert values == expected[0] and row.tobytes() == expected[1].tobytes() and digest == expected[2]


@pytest.mark.parametrize("codec_class", CODECS)
def test_minus_zero_is_the_same_input_as_zero(codec_class):
    # -0.0 == 0.0 for the model and the policy: one input hash, or replay and dedup tell them apart.
    codec = codec_class("p", SPECS, WIDTH)
    hashes = {codec.read_encode_hash(request_of({"amount": 1.0, "score": score, "free": free}), {})[2]
              for score, free in ((0.0, 0.0), (-0.0, 0.0), (0.0, -0.0), (-0.0, -0.0))}
    assert len(hashes) == 1
    assert codec.input_hash({**{s.name: s.default for s in SPECS}, "amount": 1.0, "free": -0.0}, {}) \
        == codec.input_hash({**{s.name: s.default for s in SPECS}, "amount": 1.0, "free": 0.0}, {})
