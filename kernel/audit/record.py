"""The record format: canonical bytes, the RFC 9162 leaf hash, and how a record is stored.

A record's canonical bytes are the ``AuditRecord`` serialized deterministically
with ``hash`` cleared (``sequence`` and ``prev_hash`` set). Its hash is the
RFC 9162 leaf hash ``SHA-256(0x00 || canonical bytes)``, so one digest serves
both the chain (the next record's ``prev_hash``) and the Merkle tree.

On disk a record is stored as ``canonical bytes || 0x22 0x20 || hash``: the
two bytes are the protobuf tag of field 4 (``hash``, length 32), so the stored
bytes parse as the complete record, hash included, while the canonical bytes
are recovered exactly by dropping the last 34 bytes. Verifiers hash the bytes
that were stored and never depend on re-serializing a parsed message.
"""

from __future__ import annotations

import hashlib

from .._proto.aios.kernel.v1 import kernel_pb2

AuditRecord = kernel_pb2.AuditRecord

HASH_BYTES = 32
GENESIS_PREV_HASH = bytes(HASH_BYTES)  # prev_hash of record 0
HASH_TRAILER = b"\x22\x20"  # protobuf tag of field 4 (hash, wire type 2) and its length, 32
TRAILER_BYTES = len(HASH_TRAILER) + HASH_BYTES

KIND_NAMES = {value: name for name, value in kernel_pb2.AuditKind.items()}

_sha256 = hashlib.sha256


def leaf_hash(canonical: bytes) -> bytes:
    """RFC 9162 leaf hash of one record's canonical bytes."""
    return _sha256(b"\x00" + canonical).digest()


def canonical_bytes(record: AuditRecord) -> bytes:
    """The bytes a record's hash covers: the record serialized deterministically without ``hash``."""
    if record.hash:
        copy = AuditRecord()
        copy.CopyFrom(record)
        copy.hash = b""
        record = copy
    return record.SerializeToString(deterministic=True)


def stored_bytes(canonical: bytes, digest: bytes) -> bytes:
    """What is written for a record: its canonical bytes with the hash field appended."""
    return canonical + HASH_TRAILER + digest


def split_stored(stored: bytes) -> tuple[bytes, bytes]:
    """(canonical bytes, stored hash) of a stored record; ValueError if it does not end with a hash field."""
    if len(stored) < TRAILER_BYTES or stored[-TRAILER_BYTES:-HASH_BYTES] != HASH_TRAILER:
        raise ValueError("the record does not end with its 32-byte hash field")
    return stored[:-TRAILER_BYTES], stored[-HASH_BYTES:]


class RecordWithTail:
    """An ``AuditRecord`` whose last fields come already encoded: stored as the record's deterministic
    bytes followed by ``tail``.

    Every field in ``tail`` has a higher number than any field set on
    ``record``, and is encoded as a deterministic serialization encodes it
    (map entries sorted by key), so the stored bytes are exactly the
    deterministic serialization of the whole record. The decision flow uses
    it for a record's inputs and model outputs, which it has as bytes already
    (kernel/pipelines/provenance.py): parsing them into the record only for
    the writer to serialize them again cost more than the rest of the record.
    """

    __slots__ = ("record", "tail")

    def __init__(self, record: AuditRecord, tail: bytes):
        self.record = record
        self.tail = tail

    @property
    def kind(self) -> int:
        return self.record.kind


def parse_stored(stored: bytes) -> AuditRecord:
    """The complete record (hash included) from its stored bytes."""
    return AuditRecord.FromString(stored)
