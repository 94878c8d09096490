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
- a signed checkpoint whose root the records do not reproduce: the range from
  the first record after the last checkpoint that matched to the last one this
  checkpoint covers (``first_bad_sequence``..``last_bad_sequence``). The
  change is in between, and when the records after it were re-chained nothing
  narrows it further: the headline says "FAILED in records A..B";
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

Checkpoint signatures are checked with the given public keys (an auditor's
own copies; several across a key rotation, each checkpoint with the one its
``key_id`` names); without any, with the keys kept in the directory
(``public-keys/*.pem`` and ``public-key.pem``), which only shows the log is
internally consistent.

Records after the last signed checkpoint are chained but unsigned. A live
writer signs them within ``audit_checkpoint_ms``; on a log nobody has open
they are what a crash left, or what someone without the key appended (the
next start signs them). They pass, with a note, unless ``strict``.

What the next start signed is on the log too: its "kernel started" record
names the range it adopted (``recovery.adopted``). Only the hash chain vouched
for those records, so an insider who can write the directory can cut the
checkpoints back (as a crash tears the last one), rewrite the records after
the last one left, re-chain them, and have a restart sign them. The walk
lists every adopted range (a note), and ``strict`` fails one that holds a
"kernel stopping" record: a clean stop signs every record it wrote, so such
a range had its checkpoints cut (or the kernel crashed while stopping). It
also fails one that follows a clean stop with no kernel having opened the log
at that size (an open signs the size it finds, writer.py): those records were
appended to a stopped kernel's files, the easiest forgery of all. What
no walk can tell: a log cut back to one of its own checkpoints, with the
checkpoints after it removed, is a valid shorter log. A size noted earlier (an
earlier verify, ``GetCheckpoint``) catches that: ``min_records``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path

from .base import ARCHIVE_MARKER, FILE_NAME as BASE_FILE, base_problem, read_base
from .checkpoints import FILE_NAME as CHECKPOINT_FILE
from .checkpoints import read_all, signature_ok
from .errors import AuditCorrupt
from .keys import PUBLIC_KEY_FILE, PUBLIC_KEYS_DIR, key_id, published_keys
from .marker import marker_problem, read_marker, unsigned
from .merkle import CompactRange
from .recovery import LOCK_FILE, after_base, writer_is_live
from .._proto.aios.kernel.v1 import kernel_pb2 as kpb
from .record import GENESIS_PREV_HASH, AuditRecord, split_stored
from .segments import MAGIC, SUFFIX, FrameScanner, frames_start, list_segments, read_log_file, segment_name


@dataclass
class VerifyResult:
    ok: bool
    records: int  # records that verified
    checkpoints: int  # signed checkpoints that verified
    signed_size: int  # records covered by the newest verified checkpoint
    first_bad_sequence: int | None  # None when ok, or when the damage is not in a record
    reason: str  # why it failed; when ok, a note (such as a record still being written) or ""
    key_id: str = ""  # the key(s) the verified checkpoints were signed with, comma-separated, oldest first
    elapsed_s: float = 0.0
    last_bad_sequence: int | None = None  # the end of the bad range, when only a range is known
    writer_live: bool = False  # a kernel had the log open: an unsigned tail awaits its next checkpoint
    first_sequence: int = 0  # records before it were archived (the directory's archive base): not walked here
    live_copy: bool = False  # a backup of a running kernel's log: its unsigned tail is no crash's

    def describe(self) -> str:
        if self.ok:
            key = f" ({'keys' if ',' in self.key_id else 'key'} {self.key_id})" if self.key_id else ""
            note = f" ({self.reason})" if self.reason else ""
            walked = (f"{self.records} records" if not self.first_sequence else
                      f"records {self.first_sequence}..{self.records - 1} ({self.records - self.first_sequence}; "
                      f"0..{self.first_sequence - 1} were archived, under the signed base)")
            return (f"OK: {walked} and {self.checkpoints} signed checkpoints verified"
                    f"{key}{self._unsigned_tail()}{note}")
        if self.first_bad_sequence is None:  # the reason names what failed (checkpoints, the directory)
            return f"FAILED: {self.reason}"
        if self.last_bad_sequence is not None and self.last_bad_sequence != self.first_bad_sequence:
            return f"FAILED in records {self.first_bad_sequence}..{self.last_bad_sequence}: {self.reason}"
        return f"FAILED at record {self.first_bad_sequence}: {self.reason}"

    def _unsigned_tail(self) -> str:
        unsigned = self.records - self.signed_size
        if not unsigned:
            return ""
        tail = f"; the last {unsigned} are chained but not yet signed"
        if self.writer_live:
            return f"{tail} (the log is open: its next checkpoint signs them)"
        if self.live_copy:  # (a copy of a running kernel's log, or a backup restored: not a crash's tail)
            return (f"{tail} (records {self.signed_size}..{self.records - 1}: past the last checkpoint, as a copy of a "
                    f"running kernel's log ends; a kernel started on the copy signs them; --strict fails until then)")
        return (f"{tail} (records {self.signed_size}..{self.records - 1}: a crash leaves this, a clean stop never "
                f"does; the next start signs them; --strict fails here)")

# Ranges signed after unclean stops listed one by one in the OK line; more are summed up in one sentence.
MAX_RANGES_LISTED = 3


class _Failure(Exception):
    def __init__(self, sequence: int | None, reason: str, last: int | None = None):
        super().__init__(reason)
        self.sequence = sequence
        self.reason = reason
        self.last = last  # the end of the bad range, when only a range is known


def verify_directory(directory: str | Path, public_key: bytes | Iterable[bytes] | None = None,
                     strict: bool = False, min_records: int = 0, live_copy: bool = False,
                     progress: Callable[[str], None] | None = None, locked_here: bool = False,
                     accept_adopted: bool = False, accept_base: bool = False,
                     tree_head: tuple[int, bytes] | None = None) -> VerifyResult:
    """Verify a log directory.

    ``public_key``: the raw Ed25519 key checkpoints must be signed with, or several (a key rotation):
    each checkpoint is checked with the one its ``key_id`` names, and one signed by a key not among them
    fails. ``strict``: records no signed checkpoint covers fail too, unless a writer has the log open, and so
    does a range a start signed that holds a clean stop. ``min_records``: a log with fewer records fails (a
    size noted earlier: a log cut back to one of its checkpoints verifies otherwise). ``live_copy``: a copy of a
    running kernel's log (a backup): that it ends without a clean stop is expected, not noted. ``progress``: told
    how far the walk got after each segment (kernel/progress.py). ``locked_here``: the caller holds the log's writer
    lock (``audit archive``), so no writer is live: the lock seen in /proc/locks is its own (a session review: the
    archive's own lock made strict verification pass over unsigned records). ``accept_adopted``: with ``strict``,
    a range a start signed that holds a clean stop is noted, not failed; every other strict check stays.
    ``accept_base``: with ``strict``, an archive base without its archive signature (base.py) is noted, not failed.
    ``tree_head``: (size, root) noted outside the directory (``GetCheckpoint``): the records must give that root at
    that size. ``min_records`` catches a log cut back; this also catches one rewritten and re-signed by someone who
    holds the key, which the key cannot tell from the kernel's.
    """
    directory = Path(directory)
    started = time.perf_counter()
    walk = _Walk(directory)
    walk.live_copy = live_copy
    walk.progress = progress
    walk.live_writer = (lambda: False) if locked_here else (lambda: writer_is_live(directory))
    walk.head = tree_head
    try:
        if not directory.is_dir():
            raise _Failure(None, f"{directory} is not a directory")
        missing = not_a_log(directory)
        if missing is not None:
            raise _Failure(None, missing)
        walk.load_checkpoints(_trusted(public_key))
        walk.records()
        walk.leftover_checkpoints()
        walk.some_checkpoint_signed()
        walk.writer_live = walk.count > walk.signed_size and walk.live_writer() and not walk.lock_unexplained()
        walk.at_least(min_records)
        walk.held_to_head()
        walk.archive_whole()
        if strict:
            walk.all_signed()
        walk.recovery_notes(strict and not accept_adopted)
        walk.base_signed(strict and not accept_base)
        walk.key_epochs(strict)
    except FileNotFoundError as exc:
        if not walk.live_writer():
            return walk.result(False, None, f"cannot read the log: {exc}", started)
        # A monitor's verify meeting `audit archive` (it holds LOCK and removes the segments it archived) read as
        # damage (a helper's audit): said as what it likely is. Still no OK: what was not read was not verified.
        return walk.result(False, None, (
            f"{Path(exc.filename or '?').name} went away while verify read the log, and a process holds its "
            f"{LOCK_FILE}: most likely an `aios-kernel audit archive` moving segments out (a kernel removes none); "
            f"verify again once it is done"), started)
    except OSError as exc:  # a file that cannot be read (a folder in its place, no permission): no traceback
        return walk.result(False, None, f"cannot read the log: {exc}", started)
    except _Failure as failure:
        return walk.result(False, failure.sequence, failure.reason, started, failure.last)
    return walk.result(True, None, "", started)


def _trusted(public_key: bytes | Iterable[bytes] | None) -> dict[str, bytes] | None:
    """key_id -> raw key for the keys given, or None (use the directory's own)."""
    if public_key is None:
        return None
    keys = [public_key] if isinstance(public_key, (bytes, bytearray)) else list(public_key)
    return {key_id(bytes(raw)): bytes(raw) for raw in keys}


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
        self.key_ids: list[str] = []  # keys that signed the checkpoints, in order of first use
        self.note = ""
        self.writer_live = False
        self.stops: list[int] = []  # sequences of "kernel stopping" records
        # The records after which the log lay at rest, no kernel having it open: each clean stop, and the archive
        # base's last record (an archive runs on a stopped kernel's log): what follows one must follow an open.
        self.rests: dict[int, str] = {}
        self.base_checkpoint = None  # the archive base's checkpoint: signed at the cut, by no kernel opening the log
        self.head: tuple[int, bytes] | None = None  # (size, root) noted outside the directory (--tree-head)
        self.head_checked = False
        self.adopted: list[tuple[int, int, int]] = []  # (the start record's sequence, first, last adopted)
        self.last_event = ""  # the event of the last kernel CONFIG_CHANGE record
        self.trusted: dict[str, bytes] = {}
        self.base_size = 0  # records archived before this directory's first (its archive base)
        self.live_copy = False  # a backup of a running kernel's log: no clean stop at its end is expected
        self.progress: Callable[[str], None] | None = None  # told how far the walk got, after each segment
        self.key_returned = ""  # a checkpoint signed by a key an earlier rotation replaced ("" when none)
        self.live_writer: Callable[[], bool] = lambda: writer_is_live(directory)  # whether a writer has it open
        self.lock_note = ""  # why a held writer lock was not taken for a kernel writing the unsigned tail
        self.base_unsigned: str | None = None  # why the archive base is no proof of an archive (base.py), or None
        # archive.json: None when there is none, "" when the archive signed it, else why it shows nothing (marker.py)
        self.marker_unsigned: str | None = None

    def result(self, ok: bool, sequence: int | None, reason: str, started: float,
               last: int | None = None) -> VerifyResult:
        return VerifyResult(ok, self.count, self.verified_checkpoints, self.signed_size, sequence, reason or self.note,
                            ", ".join(self.key_ids), time.perf_counter() - started, last, self.writer_live,
                            self.base_size, self.live_copy)

    def load_checkpoints(self, trusted: dict[str, bytes] | None) -> None:
        try:
            found, _, problem, torn = read_all(self.directory)
        except AuditCorrupt as exc:  # its header (a traceback otherwise, where a damaged segment says FAILED)
            raise _Failure(None, exc.message) from None
        if problem is not None and not torn:
            raise _Failure(None, f"{CHECKPOINT_FILE} is damaged after checkpoint #{len(found)}: {problem}")
        if trusted is None and found:
            unreadable: list[str] = []
            trusted = published_keys(self.directory, unreadable)
            if unreadable:  # (skipped without a word, an operator walk-through: a damaged key file is news)
                self.note = "; ".join(filter(None, [self.note, *(f"skipped: {problem}" for problem in unreadable)]))
            if not trusted:
                raise _Failure(None, (f"no key to check checkpoint signatures with: {PUBLIC_KEY_FILE} and "
                                      f"{PUBLIC_KEYS_DIR}/ hold none; pass --from-key"))
        previous = 0
        replaced: dict[str, int] = {}  # key id -> the checkpoint that first had another key after it
        for number, checkpoint in enumerate(found):
            public_key = self._key_for(number, checkpoint, trusted)
            if number and found[number - 1].key_id != checkpoint.key_id:
                replaced.setdefault(found[number - 1].key_id, number)
                if checkpoint.key_id in replaced and not self.key_returned:
                    # A key rotated away from signs again: rotated back on purpose, or its private half (left in
                    # the data dir, a copy) used by someone else to sign past the rotation (an operator
                    # walk-through: verify took each checkpoint with whichever trusted key it named).
                    self.key_returned = (f"checkpoint #{number} (tree size {checkpoint.tree_size}) is signed by key "
                                         f"{checkpoint.key_id}, which another key replaced at checkpoint "
                                         f"#{replaced[checkpoint.key_id]}: a retired key signed again (rotated back "
                                         f"on purpose, or used by someone holding a copy of it)")
            if not signature_ok(checkpoint, public_key):
                raise _Failure(None, f"checkpoint #{number} (tree size {checkpoint.tree_size}): the signature does "
                                     f"not verify with key {checkpoint.key_id}")
            if checkpoint.tree_size < previous:
                raise _Failure(None, f"checkpoint #{number} (tree size {checkpoint.tree_size}) follows one at "
                                     f"{previous}: checkpoints never shrink")
            previous = checkpoint.tree_size
        self.checkpoints = found
        self.trusted = trusted or {}

    def key_epochs(self, strict: bool) -> None:
        """A retired key that signed again: noted, and ``strict`` fails on it."""
        if not self.key_returned:
            return
        if strict:
            raise _Failure(None, f"{self.key_returned}; if you rotated back to it, this log cannot pass --strict: "
                                 f"verify without it, which notes this")
        self.note = "; ".join(filter(None, [self.note, self.key_returned]))

    def _key_for(self, number: int, checkpoint, trusted: dict[str, bytes]) -> bytes:
        """The trusted key the checkpoint names (each key epoch is checked with its own key)."""
        public_key = trusted.get(checkpoint.key_id)
        if public_key is None:
            names = ", ".join(trusted)
            trust = f"the trusted key {names}" if len(trusted) == 1 else f"any of the trusted keys ({names})"
            raise _Failure(None, f"checkpoint #{number} (tree size {checkpoint.tree_size}) was signed by key "
                                 f"{checkpoint.key_id or '?'}, not by {trust}; if that key is yours (a rotation), "
                                 f"pass its public key with another --from-key")
        if checkpoint.key_id not in self.key_ids:
            self.key_ids.append(checkpoint.key_id)
        return public_key

    def _check_checkpoints(self, tree: CompactRange) -> None:
        if self.head is not None and tree.size == self.head[0]:
            self._check_head(tree)
        checkpoints = self.checkpoints
        while self.next_checkpoint < len(checkpoints) and checkpoints[self.next_checkpoint].tree_size == tree.size:
            if tree.root() != checkpoints[self.next_checkpoint].root_hash:
                # The chain links, so the records after a change were re-chained: only the checkpoints bound it.
                raise _Failure(self.signed_size, (
                    f"their hashes do not give the root signed in checkpoint #{self.next_checkpoint} (tree size "
                    f"{tree.size}): a record in this range was changed, removed, inserted or reordered, and the ones "
                    f"after it re-chained; the signed checkpoints narrow it no further"), tree.size - 1)
            self.signed_size = tree.size
            self.verified_checkpoints += 1
            self.next_checkpoint += 1

    def records(self) -> None:
        try:
            segments = list_segments(self.directory)
        except AuditCorrupt as exc:
            raise _Failure(None, str(exc)) from None
        tree, previous, segments = self._from_base(segments)
        self._check_checkpoints(tree)
        parse = AuditRecord.FromString
        sequence = tree.size
        for number, (first, path) in enumerate(segments):
            if first != sequence:
                raise _Failure(sequence, (
                    f"segment {path.name} starts at record {first} where record {sequence} was expected: "
                    + ("records were removed" if first > sequence else "records were inserted or a segment duplicated")))
            try:
                data = read_log_file(path)
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
                if record.kind == kpb.CONFIG_CHANGE and record.principal == "kernel":
                    self._kernel_event(sequence, record.payload)
                previous = digest
                tree.append(digest)
                sequence += 1
                self.count = sequence
                self._check_checkpoints(tree)
            if self.progress is not None:
                self.progress(f"{number + 1} of {len(segments)} segments, {sequence:,} records checked")
            if scanner.problem is not None:
                last = number == len(segments) - 1
                if last and scanner.torn and self.live_writer():
                    self.note = (f"the log is open for writing: record {sequence} was still being written and "
                                 f"is not checked")
                    return
                what = "the file ends inside it (cut short, or a crash before it was acknowledged)" \
                    if scanner.torn and last else scanner.problem
                raise _Failure(sequence, f"record {sequence} in {path.name}: {what}")

    def _from_base(self, segments: list) -> tuple[CompactRange, bytes, list]:
        """Where the walk starts: record 0, or the archive base (its peaks, the hash the next record chains to,
        and its signed checkpoint, checked here with the trusted keys); checkpoints before the base cover
        archived records, which the archive's own verify checks."""
        try:
            base = read_base(self.directory)
            segments, _ = after_base(segments, base, self.directory)
            if base is None:
                return CompactRange(), GENESIS_PREV_HASH, segments
        except AuditCorrupt as exc:
            raise _Failure(None, str(exc)) from None
        problem = base_problem(base, self.trusted.get)
        if problem is not None:
            raise _Failure(None, f"{BASE_FILE} (records 0..{base.tree_size - 1} archived): {problem}")
        if base.checkpoint.key_id not in self.key_ids:
            self.key_ids.append(base.checkpoint.key_id)
        self.base_unsigned = base.unsigned()
        self.base_checkpoint = base.checkpoint
        if base.ends_log and base.archive_signature:  # (signed: checked by base_problem above)
            self.rests[base.tree_size - 1] = f"the archive base at #{base.tree_size - 1}, the end of the log archived"
        self.base_size = self.count = self.signed_size = base.tree_size
        self.verified_checkpoints += 1  # the base's own
        while self.next_checkpoint < len(self.checkpoints) and \
                self.checkpoints[self.next_checkpoint].tree_size <= base.tree_size:
            if self.checkpoints[self.next_checkpoint].tree_size == base.tree_size and \
                    self.checkpoints[self.next_checkpoint].root_hash != base.checkpoint.root_hash:
                raise _Failure(None, f"checkpoint #{self.next_checkpoint} signs another root for tree size "
                                     f"{base.tree_size} than the archive base does")
            self.next_checkpoint += 1  # (signatures checked in load_checkpoints; their records are archived)
        return CompactRange(base.tree_size, base.peaks), base.last_hash, segments

    def _kernel_event(self, sequence: int, payload: bytes) -> None:
        """Note the kernel's own starts and stops (rare records: a JSON parse each)."""
        try:
            detail = json.loads(payload)
        except ValueError:
            return
        if not isinstance(detail, dict):
            return
        event = detail.get("event")
        self.last_event = event if isinstance(event, str) else ""
        if event == "kernel stopping":
            self.stops.append(sequence)
            self.rests[sequence] = f"the clean stop at #{sequence}"
        elif event == "kernel started":
            recovery = detail.get("recovery")
            adopted = recovery.get("adopted") if isinstance(recovery, dict) else None
            if isinstance(adopted, list) and len(adopted) == 2 and all(isinstance(n, int) for n in adopted):
                self.adopted.append((sequence, adopted[0], adopted[1]))

    def recovery_notes(self, strict: bool) -> None:
        """Say which records a start signed after the fact; ``strict``: fail a range holding a clean stop."""
        notes, plain = [], []
        for at, first, last in self.adopted:
            stopped = [s for s in self.stops if first <= s <= last]
            if first - 1 in self.rests and not self._opened_at(first):
                self._appended_after_stop(at, first, last, strict, notes)
                continue
            if stopped and strict:
                raise _Failure(first, (
                    f"signed only by the start recorded at #{at}, though record #{stopped[-1]} among them is a clean "
                    f"'kernel stopping', and a clean stop signs every record it wrote: the checkpoints that covered "
                    f"them were cut (or the kernel crashed while stopping), and only the hash chain vouches for "
                    f"them; check them with `aios-kernel audit export --from {first}` (`audit archive --accept-adopted` "
                    f"archives past them once checked)"), last)
            if stopped:  # (always said one by one: what --strict fails on)
                notes.append(f"records {first}..{last} were signed by the start at #{at}, after an unclean stop: "
                             f"only the hash chain vouched for them until then (record #{stopped[-1]} among them is "
                             f"a clean stop: --strict fails here)")
            else:
                plain.append((at, first, last))
        if len(plain) > MAX_RANGES_LISTED:  # a log after many crashes: its note stays a line, not kilobytes
            (_, first, _), (at, _, last) = plain[0], plain[-1]
            notes.insert(0, f"{len(plain)} ranges of records from {first} to {last} were signed by starts after "
                            f"unclean stops (the last at #{at}): only the hash chain vouched for each until then")
        else:
            notes[:0] = [f"records {first}..{last} were signed by the start at #{at}, after an unclean stop: only the "
                         f"hash chain vouched for them until then" for at, first, last in plain]
        kernels_log = bool(self.last_event)  # (a log written by a kernel starts with its "kernel started")
        if self.marker_unsigned:  # (anyone can write one: it does not stand in for the note below)
            notes.append(self.marker_unsigned)
        if self.marker_unsigned == "":  # a signed archive ends where it was cut, not at a stop
            notes.append(f"an archive ({ARCHIVE_MARKER}): records from {self.count} on are in the log it came from, "
                         f"whose {BASE_FILE} signs this one's end")
        elif kernels_log and self.last_event != "kernel stopping" and self.count == self.signed_size \
                and not self.live_copy and not self.live_writer():  # (a running kernel's: no stop yet)
            older = ("" if self.stops else
                     "; no record of this log is one, so it may also come from a kernel older than that record, "
                     "which stopped cleanly without it")
            notes.append("the log does not end with a 'kernel stopping' record: the kernel that wrote it crashed, "
                         "or records were removed back to a checkpoint (compare with a size noted earlier: "
                         f"--min-records){older}")
        if notes:
            self.note = "; ".join(filter(None, [self.note, *notes]))

    def _opened_at(self, size: int) -> bool:
        """Whether a kernel holding the key opened the log at ``size`` records: it signs the size it finds at open
        (writer.py), so two checkpoints of that size, signed at different times, stand there (a copied frame is
        the same one). The archive base's checkpoint is no open's: copied into the file, it made a whole-log archive's
        end look opened (a helper's audit)."""
        base = self.base_checkpoint
        return len({(c.time_unix_ns, c.signature) for c in self.checkpoints if c.tree_size == size and not (
            base is not None and (c.time_unix_ns, c.signature) == (base.time_unix_ns, base.signature))}) > 1

    def _appended_after_stop(self, at: int, first: int, last: int, strict: bool, notes: list[str]) -> None:
        """Records a start adopted that follow a clean stop (or an archive base), with no kernel having opened the
        log in between: the stop signed every record before them, so they were added to the files while no kernel
        had the log open."""
        said = (f"records {first}..{last} follow {self.rests[first - 1]}, yet no kernel opened the log before "
                f"them (a kernel signs the size it opens at): they were added to the files while no kernel had the log "
                f"open, and only the hash chain vouched for them until the start at #{at} signed them (so does a kernel "
                f"killed before its first checkpoint, if it predates the checkpoint signed at open, 2026-11-28)")
        if strict:
            raise _Failure(first, f"{said}; check them with `aios-kernel audit export --from {first}` (`audit archive "
                                  f"--accept-adopted` archives past them once checked)", last)
        notes.append(f"{said} (--strict fails here)")

    def base_signed(self, strict: bool) -> None:
        """An archive base with no archive signature: anyone can make one out of a checkpoint (base.py), so the
        records it says were archived may have been deleted; noted, and ``strict`` fails on it."""
        if self.base_unsigned is None:
            return
        if strict:
            raise _Failure(0, self.base_unsigned, self.base_size - 1)
        self.note = "; ".join(filter(None, [self.note, f"{self.base_unsigned} (--strict fails here)"]))

    def archive_whole(self) -> None:
        """An archive holds every record it was written with: ``archive.json`` names its end and root, and the
        archive signs it (marker.py). The live log's base, which signs the same end, is what an auditor holds the
        archive to (--min-records)."""
        try:
            marker = read_marker(self.directory)
        except (ValueError, KeyError, TypeError, OverflowError) as exc:
            raise _Failure(None, f"{ARCHIVE_MARKER} is not readable ({type(exc).__name__}: {exc})") from None
        if marker is None:
            return
        problem = marker_problem(marker, self.base_size, self.trusted.get)
        if problem is not None:
            raise _Failure(None, f"{ARCHIVE_MARKER}: {problem}")
        end = marker.end
        if self.count != end or not self.checkpoints or self.checkpoints[-1].root_hash != marker.root:
            change = ("" if self.count == end else
                      ": records were removed" if self.count < end else ": records were added after it")
            raise _Failure(min(end, self.count), (
                f"the archive was written with records up to {end - 1} ({ARCHIVE_MARKER}) and a checkpoint for them, "
                f"but holds {self.count} records{change}"), max(end - 1, self.count - 1))
        self.marker_unsigned = unsigned(marker, self.trusted.get) or ""

    def _check_head(self, tree: CompactRange) -> None:
        size, root = self.head
        if tree.root() != root:  # (every checkpoint may have matched: whoever holds the key signs any history)
            raise _Failure(self.base_size if size > self.base_size else None, (
                f"their hashes do not give the root of the tree head noted for {size} records "
                f"({root.hex()[:16]}…): the log is not the one that head was taken of: rewritten and re-signed by "
                f"someone holding the key, if its checkpoints verify, or an older copy of it (a backup restored) that a "
                f"kernel then wrote on, which signs its own records"), size - 1)
        self.head_checked = True

    def held_to_head(self) -> None:
        """--tree-head: the walk met the noted size (``_check_checkpoints`` compared the root there)."""
        if self.head is None or self.head_checked:
            return
        size = self.head[0]
        if size < self.base_size:
            raise _Failure(None, f"the tree head noted for {size} records cannot be checked here: records "
                                 f"0..{self.base_size - 1} were archived: hold the archive to it")
        self.at_least(size)  # (the walk ended before it: a log cut back, or an older copy of it)

    def at_least(self, min_records: int) -> None:
        if self.count < min_records:
            raise _Failure(self.count, (
                f"the log holds {self.count} records, fewer than the {min_records} expected: records from "
                f"{self.count} on were removed, with the checkpoints that covered them"), min_records - 1)

    def some_checkpoint_signed(self) -> None:
        # The hash chain alone proves nothing against someone who rewrites every record; only a
        # signature does. A kernel signs tree size 0 before its first record (see the module
        # docstring), so records with no checkpoint at all mean the checkpoint file went missing.
        if self.count and not self.checkpoints:
            raise _Failure(None, (
                f"no signed checkpoint covers records 0..{self.count - 1}: {CHECKPOINT_FILE} is missing or "
                f"empty, so a rewrite of the whole log would go unnoticed"))

    def all_signed(self) -> None:
        """--strict: every record under a signed checkpoint, unless a live writer is about to sign the tail."""
        if self.count > self.signed_size and not self.writer_live:
            raise _Failure(self.signed_size, (
                f"not covered by any signed checkpoint (the last covers {self.signed_size} records), and no kernel "
                f"has the log open: a crash leaves this, a clean stop never does, and so does someone without the "
                f"key who appended records; the next start signs them{self.lock_note}"), self.count - 1)

    def lock_unexplained(self) -> bool:
        """Whether the writer lock some process holds cannot be a kernel's that writes the unsigned tail: the tail
        follows a clean stop, and no kernel opened the log after it (an open signs the size it finds, writer.py).
        Anyone who can write the directory can hold a flock on its LOCK (a helper's audit: `flock LOCK sleep` made
        --strict pass records appended to a stopped kernel's log, "the log is open: its next checkpoint signs
        them")."""
        if self.signed_size - 1 not in self.rests or self._opened_at(self.signed_size):
            return False
        self.lock_note = (f" (a process holds the log's {LOCK_FILE}, but no kernel opened the log after "
                          f"{self.rests[self.signed_size - 1]}: it is not a kernel writing these records)")
        return True

    def leftover_checkpoints(self) -> None:
        if self.next_checkpoint < len(self.checkpoints):
            size = self.checkpoints[self.next_checkpoint].tree_size
            raise _Failure(self.count, (
                f"a checkpoint was signed for {size} records but the log ends after {self.count}: "
                f"records from {self.count} on were removed"))
