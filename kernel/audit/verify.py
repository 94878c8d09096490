"""Full verification of a log directory: every frame, hash, link, sequence and signed checkpoint.

The walk goes record by record and stops at the first problem, naming the
first sequence number that is not what was written:

- a frame whose checksum fails, or that the file ends inside (torn or cut): that record;
- a stored hash that does not match the record's bytes: that record;
- a record whose ``sequence`` is not its position: the position, when a
  later record sits there (records removed or reordered), or the repeated
  number, when an earlier one does (a record inserted);
- a ``prev_hash`` that is not the previous record's hash: the previous record
  (the usual forgery edits a record and rehashes it, which breaks the link
  from the record after it);
- a signed checkpoint whose root the records do not reproduce: the first
  record after the last checkpoint that matched (the change is in between);
- a checkpoint for more records than the log holds: the first missing record;
- records but no signed checkpoint at all (the checkpoint file removed or
  emptied): nothing signed covers them, so a rewrite of the whole log would
  go unnoticed. A kernel never leaves that, even when it crashes: opening a
  new log signs and fsyncs a checkpoint for tree size 0 before it takes its
  first record, and later checkpoints only add to the file.

A directory with neither segments nor a checkpoint file is not a log at all
(a wrong path, such as the data directory instead of ``<data_dir>/audit``):
``not_a_log`` says so, and ``verify_directory`` fails it.

A segment's zero tail (preallocated space after its last record) is unused
space, not a problem; non-zero bytes inside it are a torn record. A log that
is open for writing (its ``LOCK`` held, as /proc/locks shows) may end in a
record still being written (written part-way over the zeros); that one is
left out, not failed.

Checkpoint signatures are checked with the given public key (an auditor's
own copy); without one, with ``public-key.pem`` from the directory, which
only shows the log is internally consistent.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path

from .checkpoints import FILE_NAME as CHECKPOINT_FILE
from .checkpoints import read_all, signature_ok
from .errors import AuditCorrupt, AuditError
from .keys import PUBLIC_KEY_FILE, key_id, load_public_key
from .merkle import CompactRange
from .recovery import writer_is_live
from .record import GENESIS_PREV_HASH, AuditRecord, split_stored
from .segments import MAGIC, SUFFIX, FrameScanner, frames_start, list_segments, segment_name


@dataclass
class VerifyResult:
    ok: bool
    records: int  # records that verified
    checkpoints: int  # signed checkpoints that verified
    signed_size: int  # records covered by the newest verified checkpoint
    first_bad_sequence: int | None  # None when ok, or when the damage is not in a record
    reason: str  # why it failed; when ok, a note (such as a record still being written) or ""
    key_id: str = ""
    elapsed_s: float = 0.0

    def describe(self) -> str:
        if self.ok:
            unsigned = self.records - self.signed_size
            tail = f"; the last {unsigned} are chained but not yet signed" if unsigned else ""
            note = f" ({self.reason})" if self.reason else ""
            key = f" (key {self.key_id})" if self.key_id else ""  # no checkpoint, no key was needed
            return (f"OK: {self.records} records and {self.checkpoints} signed checkpoints verified"
                    f"{key}{tail}{note}")
        if self.first_bad_sequence is None:  # the reason names what failed (checkpoints, the directory)
            return f"FAILED: {self.reason}"
        return f"FAILED at record {self.first_bad_sequence}: {self.reason}"


class _Failure(Exception):
    def __init__(self, sequence: int | None, reason: str):
        super().__init__(reason)
        self.sequence = sequence
        self.reason = reason


def verify_directory(directory: str | Path, public_key: bytes | None = None) -> VerifyResult:
    """Verify a log directory; ``public_key`` is the raw Ed25519 key checkpoints must be signed with."""
    directory = Path(directory)
    started = time.perf_counter()
    walk = _Walk(directory)
    try:
        if not directory.is_dir():
            raise _Failure(None, f"{directory} is not a directory")
        missing = not_a_log(directory)
        if missing is not None:
            raise _Failure(None, missing)
        walk.load_checkpoints(public_key)
        walk.records()
        walk.leftover_checkpoints()
        walk.some_checkpoint_signed()
    except _Failure as failure:
        return walk.result(False, failure.sequence, failure.reason, started)
    return walk.result(True, None, "", started)


def not_a_log(directory: Path) -> str | None:
    """Why ``directory`` holds no audit log, or None when it holds one (segments or a checkpoint file).

    An empty folder would otherwise verify (and export) as an empty log, hiding a wrong path. A
    checkpoint file alone still counts: records removed from under it are for verify to report.
    Raises OSError when the directory cannot be listed.
    """
    if (directory / CHECKPOINT_FILE).exists() or any(path.suffix == SUFFIX for path in directory.iterdir()):
        return None
    return (f"no audit log in {directory} (expected segment files such as {segment_name(0)} and "
            f"{CHECKPOINT_FILE}; the kernel keeps its log in <data_dir>/audit)")


class _Walk:
    def __init__(self, directory: Path):
        self.directory = directory
        self.checkpoints = []
        self.next_checkpoint = 0
        self.verified_checkpoints = 0
        self.signed_size = 0
        self.count = 0
        self.key_id = ""
        self.note = ""

    def result(self, ok: bool, sequence: int | None, reason: str, started: float) -> VerifyResult:
        return VerifyResult(ok, self.count, self.verified_checkpoints, self.signed_size, sequence, reason or self.note,
                            self.key_id, time.perf_counter() - started)

    def load_checkpoints(self, public_key: bytes | None) -> None:
        found, _, problem, torn = read_all(self.directory)
        if problem is not None and not torn:
            raise _Failure(None, f"{CHECKPOINT_FILE} is damaged after checkpoint #{len(found)}: {problem}")
        if public_key is None:
            path = self.directory / PUBLIC_KEY_FILE
            if found:
                try:
                    public_key = load_public_key(path)
                except AuditError as exc:
                    raise _Failure(None, f"no key to check checkpoint signatures with ({exc}); pass --from-key") from None
        if public_key is not None:
            self.key_id = key_id(public_key)
        previous = 0
        for number, checkpoint in enumerate(found):
            if checkpoint.key_id != self.key_id:
                raise _Failure(None, f"checkpoint #{number} (tree size {checkpoint.tree_size}) was signed by key "
                                     f"{checkpoint.key_id or '?'}, not by the trusted key {self.key_id}")
            if not signature_ok(checkpoint, public_key):
                raise _Failure(None, f"checkpoint #{number} (tree size {checkpoint.tree_size}): the signature does "
                                     f"not verify with key {self.key_id}")
            if checkpoint.tree_size < previous:
                raise _Failure(None, f"checkpoint #{number} (tree size {checkpoint.tree_size}) follows one at "
                                     f"{previous}: checkpoints never shrink")
            previous = checkpoint.tree_size
        self.checkpoints = found

    def _check_checkpoints(self, tree: CompactRange) -> None:
        checkpoints = self.checkpoints
        while self.next_checkpoint < len(checkpoints) and checkpoints[self.next_checkpoint].tree_size == tree.size:
            if tree.root() != checkpoints[self.next_checkpoint].root_hash:
                raise _Failure(self.signed_size, (
                    f"records {self.signed_size}..{tree.size - 1} do not reproduce the root signed for tree size "
                    f"{tree.size}: a record in that range was changed, removed, inserted or reordered"))
            self.signed_size = tree.size
            self.verified_checkpoints += 1
            self.next_checkpoint += 1

    def records(self) -> None:
        try:
            segments = list_segments(self.directory)
        except AuditCorrupt as exc:
            raise _Failure(None, str(exc)) from None
        tree = CompactRange()
        self._check_checkpoints(tree)
        previous = GENESIS_PREV_HASH
        parse = AuditRecord.FromString
        sequence = 0
        for number, (first, path) in enumerate(segments):
            if first != sequence:
                raise _Failure(sequence, (
                    f"segment {path.name} starts at record {first} where record {sequence} was expected: "
                    + ("records were removed" if first > sequence else "records were inserted or a segment duplicated")))
            data = path.read_bytes()
            try:
                start = frames_start(path, data, MAGIC)
            except AuditCorrupt as exc:
                raise _Failure(sequence, str(exc)) from None
            if start is None:
                raise _Failure(sequence, f"{path.name} ends inside its file header (cut short)")
            scanner = FrameScanner(data, start)
            for _, payload in scanner:
                try:
                    canonical, stored = split_stored(payload)
                except ValueError as exc:
                    raise _Failure(sequence, f"record {sequence}: {exc}") from None
                digest = sha256(b"\x00" + canonical).digest()
                if digest != stored:
                    raise _Failure(sequence, f"record {sequence}: its bytes do not match its hash (changed)")
                try:
                    record = parse(canonical)
                except Exception:  # DecodeError, or upb's own error on malformed bytes
                    raise _Failure(sequence, f"record {sequence}: not a valid AuditRecord") from None
                if record.hash:
                    raise _Failure(sequence, f"record {sequence}: its hashed bytes carry a second hash field")
                if record.sequence != sequence:
                    if record.sequence > sequence:
                        raise _Failure(sequence, (
                            f"record {sequence} is missing: record {record.sequence} is in its place "
                            f"(records removed or reordered)"))
                    # One number early: this record or the one before it is an extra one claiming that
                    # number (an insertion); further back: an old record copied here.
                    bad = record.sequence if record.sequence == sequence - 1 else sequence
                    raise _Failure(bad, (
                        f"the record at position {sequence} carries sequence {record.sequence}: a record was "
                        f"inserted, duplicated or moved"))
                if record.prev_hash != previous:
                    bad = max(sequence - 1, 0)
                    raise _Failure(bad, (
                        f"record {sequence}'s prev_hash is not the hash of record {sequence - 1}: record {bad} was "
                        f"changed after record {sequence} was written, or record {sequence} was forged"
                        if sequence else "record 0's prev_hash is not the genesis value (zeros)"))
                previous = digest
                tree.append(digest)
                sequence += 1
                self.count = sequence
                self._check_checkpoints(tree)
            if scanner.problem is not None:
                last = number == len(segments) - 1
                if last and scanner.torn and writer_is_live(self.directory):
                    self.note = (f"the log is open for writing: record {sequence} was still being written and "
                                 f"is not checked")
                    return
                what = "the file ends inside it (cut short, or a crash before it was acknowledged)" \
                    if scanner.torn and last else scanner.problem
                raise _Failure(sequence, f"record {sequence} in {path.name}: {what}")

    def some_checkpoint_signed(self) -> None:
        # The hash chain alone proves nothing against someone who rewrites every record; only a
        # signature does. A kernel signs tree size 0 before its first record (see the module
        # docstring), so records with no checkpoint at all mean the checkpoint file went missing.
        if self.count and not self.checkpoints:
            raise _Failure(None, (
                f"no signed checkpoint covers records 0..{self.count - 1}: {CHECKPOINT_FILE} is missing or "
                f"empty, so a rewrite of the whole log would go unnoticed"))

    def leftover_checkpoints(self) -> None:
        if self.next_checkpoint < len(self.checkpoints):
            size = self.checkpoints[self.next_checkpoint].tree_size
            raise _Failure(self.count, (
                f"a checkpoint was signed for {size} records but the log ends after {self.count}: "
                f"records from {self.count} on were removed"))
