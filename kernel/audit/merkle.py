"""RFC 9162 Merkle tree over the log: roots, inclusion and consistency proofs.

``MerkleTree`` caches the hashes of complete subtrees from height
``CACHE_LEVEL`` up (4 bytes a record, all levels together: 2 for the lowest);
smaller subtrees are rehashed from their leaves on demand (at most 15
hashes). It keeps the newest leaf hashes in memory; once a leaf reader is set
(``keep_recent``: the live log reads them back from its segments), older ones
are dropped as their subtrees are cached and read from disk when a proof or a
root needs them — only proofs about old records and roots at old sizes do, at
most 16 leaves each. Keeping every leaf (32 bytes a record) grew a long-lived
kernel's memory by ~35 MiB per million records (a soak audit). Any MTH the RFC's recursion asks
for is then a right fold over O(log n) cached subtrees, so a root or a proof
costs O(log n) hashes. The cache is filled lazily: a root or a proof first
catches up with the leaves appended since (``catch_up``), which keeps the
append itself cheap — the writer only appends each group's leaves.

A tree may start from an archive **base** (``MerkleTree(base_size, peaks)``,
kernel/audit/base.py): the records before ``base_size`` are gone, and only
the peaks of ``[0, base_size)`` stand for them. Nodes fully before the base
are then peaks (or the tree refuses with ``Archived``), nodes straddling it
are hashed from peaks and newer leaves, and levels of the cache start at
their first node fully after it. Every root of a size >= ``base_size`` and
every proof about newer records needs nothing else.

``CompactRange`` computes roots of a growing prefix with O(log n) memory; the
verifier uses it. ``verify_inclusion``/``verify_consistency`` are the RFC's
client-side algorithms, for callers of the kernel that want to check proofs.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable

from .errors import AuditCorrupt

_sha256 = hashlib.sha256

EMPTY_ROOT = _sha256(b"").digest()
CACHE_LEVEL = 4  # subtrees of 2**4 leaves and up are cached
KEEP_LEAVES = 1 << 16  # newest leaves kept in memory once a reader is set (2 MiB): tickets and checkpoints use them
_BLOCK = (1 << CACHE_LEVEL) - 1


def node_hash(left: bytes, right: bytes) -> bytes:
    return _sha256(b"\x01" + left + right).digest()


def split_point(n: int) -> int:
    """The largest power of two smaller than ``n`` (n >= 2): where RFC 9162 splits D[n]."""
    return 1 << ((n - 1).bit_length() - 1)


class Archived(ValueError):
    """A root or proof needs records archived from this log (before its base): ask the archive."""


def _fold(peaks: list[bytes]) -> bytes:
    """MTH of consecutive complete subtrees of decreasing size: hash them right to left."""
    acc = peaks[-1]
    for peak in reversed(peaks[:-1]):
        acc = _sha256(b"\x01" + peak + acc).digest()
    return acc


fold_peaks = _fold


def _reduce(level: bytes | bytearray) -> bytes:
    """Root of a complete subtree given its 2**h leaf hashes, concatenated."""
    while len(level) > 32:
        level = b"".join([_sha256(b"\x01" + level[i:i + 64]).digest() for i in range(0, len(level), 64)])
    return bytes(level)


class MerkleTree:
    """Cached subtree hashes plus the newest leaves (all of them until ``keep_recent``); thread-safe."""

    __slots__ = ("_leaves", "_first", "_levels", "_starts", "_lock", "_read_leaves", "_keep", "base_size",
                 "_peaks", "_aligned", "_head")

    def __init__(self, base_size: int = 0, peaks: list[tuple[int, bytes]] | tuple = ()) -> None:
        self._leaves = bytearray()  # leaf hashes from index _first on
        self._first = base_size  # leaves before it were dropped: _read_leaves(start, count) gives them back
        self._levels: list[bytearray] = []  # _levels[i]: subtrees of height CACHE_LEVEL + i, from node _starts[i] on
        self._starts: list[int] = []  # first node of each level wholly at or after the base (0 without one)
        self._lock = threading.Lock()
        self._read_leaves: Callable[[int, int], bytes] | None = None
        self._keep = 0
        self.base_size = base_size  # records [0, base_size) are archived: only their peaks are here
        self._peaks: dict[tuple[int, int], bytes] = {}  # (height, node index) -> hash, for the base's peaks
        position = 0
        for height, digest in peaks:
            self._peaks[height, position >> height] = digest
            position += 1 << height
        if position != base_size:
            raise ValueError(f"the peaks cover {position} leaves, not the base's {base_size}")
        self._aligned = (base_size + _BLOCK) & ~_BLOCK  # first leaf of the first block wholly after the base
        self._head = b""  # leaves [base_size, _aligned) once dropped from _leaves: no cached block to check them

    @property
    def size(self) -> int:
        return self._first + (len(self._leaves) >> 5)

    def keep_recent(self, read_leaves: Callable[[int, int], bytes], keep: int = KEEP_LEAVES) -> None:
        """From now on keep only about the newest ``keep`` leaves in memory (at most twice that): older ones come
        from ``read_leaves(start, count)``, their concatenated hashes, when needed."""
        with self._lock:
            self._read_leaves, self._keep = read_leaves, keep
            self._drop_old()

    def _drop_old(self) -> None:
        """Drop leaves whose subtree of 2**CACHE_LEVEL is cached and that are not among the newest ``_keep``."""
        if not self._levels:
            return
        cached = (self._starts[0] + (len(self._levels[0]) >> 5)) << CACHE_LEVEL  # leaves folded into level 0
        until = min(cached, self.size - self._keep) & ~_BLOCK
        if until > self._first:
            if self._first < self._aligned:  # the base's partial block: kept (at most 15 hashes), see _leaf_bytes
                self._head = bytes(self._leaves[:(self._aligned - self._first) << 5])
            del self._leaves[:(until - self._first) << 5]
            self._first = until

    def append_leaves(self, hashes: bytes | bytearray) -> None:
        """Add leaf hashes (concatenated 32-byte digests) at the end."""
        with self._lock:
            self._leaves += hashes
            if self._read_leaves is not None and len(self._leaves) > (self._keep << 6):
                self._drop_old()

    def _leaf_bytes(self, start: int, count: int) -> bytes | bytearray:
        """The hashes of leaves [start, start + count), from memory or, for dropped ones, from the reader."""
        if start >= self._first:
            offset = (start - self._first) << 5
            return self._leaves[offset:offset + (count << 5)]
        if start < self.base_size:
            raise Archived(f"record {start} was archived from this log (records 0..{self.base_size - 1})")
        if start < self._aligned:  # within the base's partial block (callers never ask across a block boundary)
            offset = (start - self.base_size) << 5
            return self._head[offset:offset + (count << 5)]
        cut = min(start + count, self._first)
        # Whole blocks of 2**CACHE_LEVEL leaves, each checked against its cached subtree hash (every dropped leaf's
        # block is cached; _first is a block boundary): a segment changed on disk after the open is refused here,
        # never served as a proof (a review audit).
        low, high = start & ~_BLOCK, (cut + _BLOCK) & ~_BLOCK
        blocks = self._read_leaves(low, high - low)
        if len(blocks) != (high - low) << 5:
            raise AuditCorrupt(f"the audit log's leaves {low}..{high - 1} could not be read back "
                               f"({len(blocks)} bytes): a segment was changed or removed after the log was opened")
        level = self._levels[0]
        span = 32 << CACHE_LEVEL
        for offset in range(0, len(blocks), span):
            node = (low >> CACHE_LEVEL) + offset // span - self._starts[0]
            if _reduce(blocks[offset:offset + span]) != level[node << 5:(node + 1) << 5]:
                raise AuditCorrupt(f"the audit log's records {low + (offset >> 5)}..{low + (offset >> 5) + _BLOCK} "
                                   "no longer hash to what the log held when it was opened: a segment was changed "
                                   "on disk since; run `aios-kernel audit verify` on the log")
        older = blocks[(start - low) << 5:(cut - low) << 5]
        return older + self._leaves[:(start + count - cut) << 5]

    def leaf(self, index: int) -> bytes:
        with self._lock:  # (dropping old leaves moves the others)
            return bytes(self._leaf_bytes(index, 1))

    def catch_up(self) -> None:
        """Fill the subtree cache up to the current size."""
        with self._lock:
            self._catch_up()

    def _catch_up(self) -> None:
        leaves = self._leaves
        n = self.size
        first = self._first  # (dropped leaves are all cached already: only newer ones are folded here)
        base = self.base_size
        height = CACHE_LEVEL
        index = 0
        while n >> height:
            if index == len(self._levels):
                self._levels.append(bytearray())
                self._starts.append((base + (1 << height) - 1) >> height)
            level, start = self._levels[index], self._starts[index]
            have, want = start + (len(level) >> 5), n >> height
            if index == 0:
                span = 32 << height
                for j in range(have, want):
                    offset = j * span - (first << 5)
                    level += _reduce(leaves[offset:offset + span])
            else:
                below, below_start = self._levels[index - 1], self._starts[index - 1]
                for j in range(have, want):
                    offset = (2 * j - below_start) << 5
                    level += _sha256(b"\x01" + below[offset:offset + 64]).digest()
            height += 1
            index += 1
        if self._read_leaves is not None:
            self._drop_old()

    def _subtree(self, height: int, index: int) -> bytes:
        """Hash of the complete subtree of 2**height leaves starting at leaf index << height."""
        start = index << height
        if start < self.base_size:
            peak = self._peaks.get((height, index))
            if peak is not None:
                return peak
            if start + (1 << height) <= self.base_size:  # wholly archived, and not a peak: gone with the records
                raise Archived(f"the subtree of records {start}..{start + (1 << height) - 1} was archived from "
                               f"this log (records 0..{self.base_size - 1})")
            return _sha256(b"\x01" + self._subtree(height - 1, 2 * index)
                           + self._subtree(height - 1, 2 * index + 1)).digest()  # straddles the base
        if height >= CACHE_LEVEL:
            offset = (index - self._starts[height - CACHE_LEVEL]) << 5
            return bytes(self._levels[height - CACHE_LEVEL][offset:offset + 32])
        return _reduce(self._leaf_bytes(start, 1 << height))

    def peaks(self, size: int) -> list[tuple[int, bytes]]:
        """(height, hash) of the complete subtrees [0, size) splits into, tallest first: an archive base's."""
        with self._lock:
            self._check_size(size)
            self._catch_up()
            found, position = [], 0
            for height in range(size.bit_length() - 1, -1, -1):
                if size >> height & 1:
                    found.append((height, self._subtree(height, position >> height)))
                    position += 1 << height
            return found

    def _mth(self, start: int, end: int) -> bytes:
        """MTH(D[start:end]) for a range of the RFC's recursion (start aligned to the range's split)."""
        size = end - start
        if size == 0:
            return EMPTY_ROOT
        peaks = []
        position = start
        for height in range(size.bit_length() - 1, -1, -1):
            if size >> height & 1:
                if position & ((1 << height) - 1):
                    raise ValueError(f"range [{start}, {end}) is not a subtree of the log")
                peaks.append(self._subtree(height, position >> height))
                position += 1 << height
        return _fold(peaks)

    def _check_size(self, size: int) -> None:
        if not 0 <= size <= self.size:
            raise ValueError(f"tree size {size} is beyond the {self.size} leaves of the log")
        if size < self.base_size:
            raise Archived(f"tree size {size} is before this log's archive base ({self.base_size} records archived)")

    def root(self, size: int | None = None) -> bytes:
        """MTH of the first ``size`` leaves (all of them by default)."""
        with self._lock:
            size = self.size if size is None else size
            self._check_size(size)
            self._catch_up()
            return self._mth(0, size)

    def inclusion_proof(self, index: int, size: int) -> list[bytes]:
        """RFC 9162 §2.1.3.1 PATH(index, D[size]), bottom-up."""
        with self._lock:
            self._check_size(size)
            if not 0 <= index < size:
                raise ValueError(f"leaf {index} is not in a tree of size {size}")
            if index < self.base_size:
                raise Archived(f"record {index} was archived from this log (records 0..{self.base_size - 1})")
            self._catch_up()
            path = []
            start, end = 0, size
            while end - start > 1:
                k = split_point(end - start)
                if index < start + k:
                    path.append(self._mth(start + k, end))
                    end = start + k
                else:
                    path.append(self._mth(start, start + k))
                    start += k
            path.reverse()
            return path

    def consistency_proof(self, old_size: int, new_size: int) -> list[bytes]:
        """RFC 9162 §2.1.4.1 PROOF(old_size, D[new_size]), for 0 < old_size <= new_size."""
        with self._lock:
            self._check_size(new_size)
            if not 0 < old_size <= new_size:
                raise ValueError(f"old size {old_size} must be in 1..{new_size}")
            self._check_size(old_size)
            self._catch_up()
            proof = []
            start, end, m, complete = 0, new_size, old_size, True
            while True:
                if m == end - start:
                    if not complete:
                        proof.append(self._mth(start, end))
                    break
                k = split_point(end - start)
                if m <= k:
                    proof.append(self._mth(start + k, end))
                    end = start + k
                else:
                    proof.append(self._mth(start, start + k))
                    start += k
                    m -= k
                    complete = False
            proof.reverse()
            return proof


class CompactRange:
    """Root of a growing log with O(log n) memory: the peaks of its complete subtrees."""

    __slots__ = ("size", "_peaks")

    def __init__(self, size: int = 0, peaks: list[tuple[int, bytes]] | tuple = ()) -> None:
        self.size = size  # from an archive base: its size and peaks
        self._peaks: list[tuple[int, bytes]] = list(peaks)  # (height, hash), tallest first

    def append(self, leaf: bytes) -> None:
        peaks = self._peaks
        height, node = 0, leaf
        while peaks and peaks[-1][0] == height:
            node = _sha256(b"\x01" + peaks.pop()[1] + node).digest()
            height += 1
        peaks.append((height, node))
        self.size += 1

    def root(self) -> bytes:
        if not self._peaks:
            return EMPTY_ROOT
        return _fold([node for _, node in self._peaks])


def verify_inclusion(leaf: bytes, index: int, size: int, proof: list[bytes], root: bytes) -> bool:
    """RFC 9162 §2.1.3.2: does ``proof`` show leaf ``index`` with hash ``leaf`` in the tree ``root``?"""
    if not 0 <= index < size:
        return False
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == root


def verify_consistency(old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: list[bytes]) -> bool:
    """RFC 9162 §2.1.4.2: does ``proof`` show the tree ``old_root`` is a prefix of ``new_root``?"""
    if not 0 < old_size <= new_size:
        return False
    if old_size == new_size:
        return not proof and old_root == new_root
    if not proof:
        return False
    path = list(proof)
    if old_size & (old_size - 1) == 0:  # a power of two: the old root is itself a node of the path
        path.insert(0, old_root)
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    return sn == 0 and fr == old_root and sr == new_root
