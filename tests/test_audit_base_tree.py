"""A Merkle tree that starts from an archive base gives the full tree's roots and proofs.

After ``aios-kernel audit archive`` only the peaks of the archived records
``[0, b)`` stay (kernel/audit/base.py). These tests build the same log twice,
once whole and once from ``b`` with only the peaks, and compare every root
of a size >= b, every inclusion proof of a record >= b and every consistency
proof from a size >= b; anything older is refused with ``Archived``, never
answered wrongly. Both trees keep few leaves in memory (``keep_recent``) so
the straddling block and the disk read-back are exercised too.
"""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fuzz_budget import examples
from kernel.audit.merkle import Archived, MerkleTree, verify_consistency, verify_inclusion


def leaf_hashes(count: int) -> list[bytes]:
    return [hashlib.sha256(b"\x00" + i.to_bytes(8, "big")).digest() for i in range(count)]


def trees(leaves: list[bytes], base: int, keep: int):
    """(the whole tree, the tree from ``base``), both keeping ``keep`` leaves in memory."""
    whole = MerkleTree()
    whole.append_leaves(b"".join(leaves))
    based = MerkleTree(base, whole.peaks(base))
    stored = b"".join(leaves)
    reader = (lambda start, count: stored[start << 5:(start + count) << 5])
    based.keep_recent(lambda start, count: reader(start, count) if start >= base else b"", keep)
    whole.keep_recent(reader, keep)
    split = base + (len(leaves) - base) // 2  # appended in two steps, with a root between (the cache fills twice)
    based.append_leaves(b"".join(leaves[base:split]))
    based.root()
    based.append_leaves(b"".join(leaves[split:]))
    return whole, based


@settings(max_examples=examples(60), deadline=None)
@given(st.data())
def test_roots_and_proofs_from_a_base_match_the_whole_tree(data):
    total = data.draw(st.integers(1, 300), label="records")
    base = data.draw(st.integers(1, total), label="archived")
    keep = data.draw(st.sampled_from([0, 16, 1 << 16]), label="keep")
    leaves = leaf_hashes(total)
    whole, based = trees(leaves, base, keep)
    assert based.size == whole.size == total
    for size in range(base, total + 1):
        assert based.root(size) == whole.root(size)
    for _ in range(20):
        size = data.draw(st.integers(base, total), label="size")
        if size > base:
            index = data.draw(st.integers(base, size - 1), label="index")
            proof = based.inclusion_proof(index, size)
            assert proof == whole.inclusion_proof(index, size)
            assert verify_inclusion(leaves[index], index, size, proof, whole.root(size))
        old = data.draw(st.integers(base, size), label="old")
        proof = based.consistency_proof(old, size)
        assert proof == whole.consistency_proof(old, size)
        assert verify_consistency(old, size, whole.root(old), whole.root(size), proof)
        assert based.leaf(data.draw(st.integers(base, total - 1), label="leaf")) if total > base else True


@pytest.mark.parametrize("total, base", [(40, 17), (64, 64), (100, 1), (33, 32)])
def test_what_needs_archived_records_is_refused(total, base):
    _, based = trees(leaf_hashes(total), base, 16)
    if base > 1:
        with pytest.raises(Archived):
            based.root(base - 1)
        with pytest.raises(Archived):
            based.consistency_proof(base - 1, total)
    with pytest.raises(Archived):
        based.inclusion_proof(base - 1, total)
    with pytest.raises(Archived):
        based.leaf(base - 1)


def test_peaks_must_cover_the_base():
    with pytest.raises(ValueError, match="cover"):
        MerkleTree(5, [(2, bytes(32))])
