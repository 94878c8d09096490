"""BYTES tensor codec: the same tests against the pure-Python reference and the Cython twin."""

from __future__ import annotations

import importlib
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kernel import bytes_codec as reference


def _compiled():
    try:
        return importlib.import_module("kernel._ext.bytes_codec")
    except ImportError:
        return None


IMPLEMENTATIONS = [pytest.param(reference, id="reference")]
IMPLEMENTATIONS.append(
    pytest.param(_compiled(), id="cython", marks=pytest.mark.skipif(_compiled() is None, reason="extension not built (run `make build`)"))
)


@pytest.fixture(params=IMPLEMENTATIONS)
def codec(request):
    return request.param


def test_round_trip(codec):
    items = ["", "a", "héllo wörld", "x" * 1000, "\u0000nul"]
    buf = codec.encode(items)
    assert buf == reference.encode(items)
    assert codec.decode(buf, len(items)) == items


def test_bytes_items_are_passed_through(codec):
    assert codec.encode([b"ab", "c"]) == struct.pack("<I", 2) + b"ab" + struct.pack("<I", 1) + b"c"


@pytest.mark.parametrize(
    "buf,count,message",
    [
        (b"\x01\x00", 1, "element 0: buffer ends inside its 4-byte length prefix"),
        (b"\x05\x00\x00\x00abc", 1, "element 0: length 5 runs past the end"),
        (b"\x01\x00\x00\x00a\x00", 1, "1 bytes left over after 1 elements"),
        (b"\x01\x00\x00\x00\xff", 1, "element 0: not valid UTF-8"),
        (b"\x01\x00\x00\x00a", 2, "element 1: buffer ends inside"),
    ],
)
def test_malformed_buffers_are_named(codec, buf, count, message):
    with pytest.raises(ValueError) as info:
        codec.decode(buf, count)
    assert message in str(info.value)


@given(st.lists(st.text(max_size=40), max_size=30))
def test_implementations_agree_on_random_text(items):
    compiled = _compiled()
    buf = reference.encode(items)
    assert reference.decode(buf, len(items)) == items
    if compiled is not None:
        assert compiled.encode(items) == buf
        assert compiled.decode(buf, len(items)) == items


@given(st.binary(max_size=64), st.integers(min_value=0, max_value=8))
def test_implementations_agree_on_random_bytes(buf, count):
    compiled = _compiled()
    if compiled is None:
        pytest.skip("extension not built")
    outcomes = []
    for impl in (reference, compiled):
        try:
            outcomes.append(("ok", impl.decode(buf, count)))
        except ValueError as exc:
            outcomes.append(("error", str(exc)))
    assert outcomes[0] == outcomes[1]
