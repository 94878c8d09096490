"""The tamper-evident audit log: chained records, signed Merkle checkpoints, group-commit fsync.

Public surface:

- ``AuditLog.open(directory, mode="fsync", ...)``: append records, wait for
  durability, read them back (``read``), prove them (``inclusion_proof``,
  ``consistency_proof``, ``latest_checkpoint``); ``Ticket`` is what ``append`` returns;
  ``recovery`` says what the open found (unsigned records adopted, torn tails cut, a key change).
- ``verify_directory(directory, public_key=None, strict=False) -> VerifyResult``: full check of a log
  directory against one trusted key or several (a key rotation).
- ``iter_directory(directory, from_sequence, RecordFilter(...))``: read a log nobody is writing.
- ``export_jsonl(records, out)``: JSON Lines for outside tools.
- ``leaf_hash``/``canonical_bytes``/``checkpoint_signed_bytes``: the formats, for verifiers.
- ``AuditError`` (UNAVAILABLE), ``AuditTimeout`` (DEADLINE_EXCEEDED), ``AuditCorrupt`` (FAILED_PRECONDITION).
"""

from .checkpoints import signed_bytes as checkpoint_signed_bytes
from .errors import AuditCorrupt, AuditError, AuditTimeout
from .export import export_jsonl, record_to_json
from .merkle import verify_consistency, verify_inclusion
from .reader import RecordFilter, iter_directory
from .record import GENESIS_PREV_HASH, RecordWithTail, canonical_bytes, leaf_hash
from .verify import VerifyResult, verify_directory
from .writer import MODES, AuditLog, Ticket

__all__ = [
    "GENESIS_PREV_HASH", "MODES", "AuditCorrupt", "AuditError", "AuditLog", "AuditTimeout", "RecordFilter",
    "RecordWithTail",
    "Ticket", "VerifyResult", "canonical_bytes", "checkpoint_signed_bytes", "export_jsonl", "iter_directory",
    "leaf_hash", "record_to_json", "verify_consistency", "verify_directory", "verify_inclusion",
]
