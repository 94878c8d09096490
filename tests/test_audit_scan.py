"""The open's fast first pass over a segment (kernel/audit/scan.py) and its compiled twin (ext/auditscan.pyx):
the same frames accepted, the same leaves and index, the same stopping point, on random segments with random
damage; and the open built on it accepts and refuses as the frame-by-frame scan does (the audit suites)."""

from __future__ import annotations

import importlib
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fuzz_budget import examples

from kernel import accel
from kernel.audit import scan as reference
from kernel.audit.record import HASH_TRAILER
from kernel.audit.segments import MAGIC, FrameScanner

try:
    compiled = None if accel.FORCE_PURE else importlib.import_module("kernel._ext.auditscan")
except ImportError:
    compiled = None
IMPLEMENTATIONS = [pytest.param(reference, id="reference")] + (
    [] if compiled is None else [pytest.param(compiled, id="cython")])


def frame(payload: bytes) -> bytes:
    return len(payload).to_bytes(4, "little") + zlib.crc32(payload).to_bytes(4, "little") + payload


records = st.builds(lambda body, digest: body + HASH_TRAILER + digest,
                    st.binary(max_size=64), st.binary(min_size=32, max_size=32))  # ("unhashed" damage: one without)
damage = st.one_of(
    st.none(),
    st.tuples(st.just("flip"), st.integers(0, 10_000), st.integers(1, 255)),
    st.tuples(st.just("cut"), st.integers(0, 10_000)),
    st.tuples(st.just("unhashed"), st.integers(0, 40)),
)


def segment(payloads: list[bytes], hurt, zero_tail: int) -> bytes:
    if hurt is not None and hurt[0] == "unhashed" and payloads:
        index = hurt[1] % len(payloads)
        payloads = [*payloads[:index], payloads[index][:-34] + b"no hash field here", *payloads[index + 1:]]
    data = bytearray(MAGIC + b"".join(frame(p) for p in payloads) + bytes(zero_tail))
    if hurt is not None and hurt[0] == "flip" and len(data) > len(MAGIC):
        data[len(MAGIC) + hurt[1] % (len(data) - len(MAGIC))] ^= hurt[2]
    if hurt is not None and hurt[0] == "cut":
        del data[len(MAGIC) + hurt[1] % (len(data) - len(MAGIC) + 1):]
    return bytes(data)


def run(module, data: bytes, sequence: int, mask: int):
    leaves, index = bytearray(), []
    end, after = module.scan_sound(data, len(MAGIC), sequence, mask, 3, leaves, index)
    return end, after, bytes(leaves), index


@pytest.mark.skipif(compiled is None, reason="the compiled twin is not built (or AIOS_PURE_PYTHON=1)")
@settings(max_examples=examples(300), deadline=None)
@given(st.lists(records, max_size=40), damage, st.integers(0, 300), st.integers(0, 1000),
       st.sampled_from([0, 1, 3, 255]))
def test_both_forms_take_the_same_frames_and_stop_at_the_same_byte(payloads, hurt, zero_tail, sequence, mask):
    data = segment(payloads, hurt, zero_tail)
    assert run(compiled, data, sequence, mask) == run(reference, data, sequence, mask)


@pytest.mark.parametrize("module", IMPLEMENTATIONS)
@settings(max_examples=examples(100), deadline=None)
@given(payloads=st.lists(records, max_size=30), hurt=damage, zero_tail=st.integers(0, 300))
def test_every_frame_taken_is_one_the_frame_scanner_accepts_with_its_hash(module, payloads, hurt, zero_tail):
    """What the pass takes is exactly the scanner's first frames that end in a hash field, no more."""
    data = segment(payloads, hurt, zero_tail)
    end, after, leaves, index = run(module, data, 0, 0)
    expected = []
    for offset, payload in FrameScanner(data, len(MAGIC)):
        if len(payload) < 34 or payload[-34:-32] != HASH_TRAILER:
            break
        expected.append((offset, payload[-32:]))
    assert after == len(expected) and leaves == b"".join(digest for _, digest in expected)
    assert index == [(i, 3, offset) for i, (offset, _) in enumerate(expected)]
    assert end == (expected[-1][0] + 8 + len(payloads_at(data, expected[-1][0])) if expected else len(MAGIC))


def payloads_at(data: bytes, offset: int) -> bytes:
    length = int.from_bytes(data[offset:offset + 4], "little")
    return data[offset + 8:offset + 8 + length]
