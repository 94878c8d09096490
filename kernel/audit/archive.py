"""``aios-kernel audit archive LOG_DIR DEST``: move the oldest records out of a stopped kernel's log.

A log only grows, and a kernel's start reads all of it (~2.3 s per million
records on the development VM: bench/RESULTS.md). Archiving moves whole
segments, records ``[first, b)``, into ``DEST``, a log directory of its own
that ``audit verify`` and ``audit export`` read like any other, and leaves in
the live directory the small signed base that stands for them
(kernel/audit/base.py): the kernel then starts, proves and verifies from ``b``.

Steps, each before the next, so that a stop anywhere loses nothing:

1. take the log's lock (no kernel can start on it meanwhile) and verify the
   whole log strictly (every record signed: the kernel stopped cleanly);
2. pick ``b``: the newest segment boundary at or before ``--before``, or whose
   record is older than ``--older-than`` days (records are in time order: the
   writer stamps them as it writes);
3. sign a checkpoint for tree size ``b`` with the log's key; write ``DEST``:
   the segments, every checkpoint up to ``b`` and that one, the public keys, the
   previous base (an archive of an archived log starts where that one ended) and
   ``archive.json`` saying what it is; fsync it all and verify it strictly;
4. write the live directory's new base (atomically);
5. remove the archived segments. A stop between 4 and 5 leaves segments the base
   already covers: the kernel ignores them (with a WARNING) and running the
   command again removes them.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from . import checkpoints as cps
from .base import ARCHIVE_MARKER, FILE_NAME as BASE_FILE, ArchiveBase, write_base
from .errors import AuditError
from .keys import PUBLIC_KEY_FILE, PUBLIC_KEYS_DIR, load_or_create, published_keys
from .record import parse_stored
from .recovery import lock_directory, recover
from .segments import CHECKPOINT_MAGIC, MAGIC, FrameScanner, frame, frames_start, fsync_dir
from .verify import verify_directory

DAY_NS = 86_400 * 1_000_000_000


class ArchiveRefused(AuditError):
    """The archive could not run (exit 2): a live kernel, a log that does not verify, a destination in use."""

    code = "FAILED_PRECONDITION"


@dataclass
class ArchiveResult:
    first: int  # the first record archived
    end: int  # records before it are archived now (the live log's new base)
    segments: int
    bytes: int
    removed_leftovers: int  # segments a stopped earlier run left behind, removed now

    def summary(self, directory: Path, dest: Path) -> str:
        if self.end == self.first:
            left = f"; removed {self.removed_leftovers} segment(s) an earlier run left" if self.removed_leftovers else ""
            return f"{directory}: nothing to archive (the cut falls before record {self.first + 1}){left}"
        return (f"archived records {self.first}..{self.end - 1} ({self.end - self.first:,} records, {self.segments} "
                f"segment(s), {self.bytes:,} bytes) from {directory} to {dest}; the live log starts at record "
                f"{self.end} now. Keep {dest} with your records; `aios-kernel audit verify {dest}` checks it")


def archive(directory: Path, dest: Path, before: int | None = None, older_than_days: float | None = None,
            key_path: Path | None = None, now_unix_ns: int | None = None) -> ArchiveResult:
    """Archive the oldest whole segments of the stopped log in ``directory`` to the new directory ``dest``."""
    directory, dest = Path(directory), Path(dest)
    if (before is None) == (older_than_days is None):
        raise ArchiveRefused("give exactly one of --before SEQ and --older-than DAYS")
    if not (directory / cps.FILE_NAME).exists():
        raise ArchiveRefused(f"no audit log in {directory} (the kernel keeps its log in <data_dir>/audit)")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ArchiveRefused(f"{dest} exists and is not an empty folder: an archive goes into a new one")
    if dest.resolve().is_relative_to(directory.resolve()):
        raise ArchiveRefused(f"{dest} is inside the log directory {directory}: archive elsewhere")
    try:
        lock = lock_directory(directory)
    except AuditError:
        raise ArchiveRefused(f"a kernel has the audit log {directory} open: stop it first (archiving reads and "
                             "removes segments it may be writing)") from None
    try:
        return _archive_locked(directory, dest, before, older_than_days, key_path, now_unix_ns)
    finally:
        os.close(lock)


def _archive_locked(directory: Path, dest: Path, before: int | None, older_than_days: float | None,
                    key_path: Path | None, now_unix_ns: int | None) -> ArchiveResult:
    trusted = published_keys(directory)
    checked = verify_directory(directory, list(trusted.values()) or None, strict=True)
    if not checked.ok:
        raise ArchiveRefused(f"the log does not verify, so nothing was archived: {checked.describe()}")
    key_path = Path(key_path) if key_path is not None else directory / "signing-key.pem"
    if not key_path.is_file():
        raise ArchiveRefused(f"no signing key at {key_path}: pass --key with the kernel's audit_key")
    key = load_or_create(key_path)
    state = recover(directory)
    latest = cps.read_all(directory)[0][-1]
    if key.key_id != latest.key_id:
        raise ArchiveRefused(f"{key_path} holds key {key.key_id}, but the log's checkpoints are signed by "
                             f"{latest.key_id}: pass --key with the key the kernel signs with")
    first = state.tree.base_size
    cut = _cut(directory, state, before, older_than_days, now_unix_ns)
    if cut <= first:
        removed = _remove(state.leftovers, directory)
        return ArchiveResult(first, first, 0, 0, removed)
    archived = [path for start, path in state.segments if start < cut]
    checkpoint = cps.sign(key, cut, state.tree.root(cut))
    base = ArchiveBase(cut, tuple(state.tree.peaks(cut)), state.tree.leaf(cut - 1),
                       tuple(state.tree.inclusion_proof(cut - 1, cut)), checkpoint, str(dest.resolve()),
                       time.time_ns())
    size = _write_archive(directory, dest, archived, checkpoint, state, first, cut)
    copy = verify_directory(dest, list(trusted.values()), strict=True)
    if not copy.ok or copy.records != cut:
        raise ArchiveRefused(f"the archive in {dest} does not verify ({copy.describe()}); nothing was removed from "
                             f"{directory}")
    write_base(directory, base)
    removed = _remove(state.leftovers + archived, directory) - len(archived)
    return ArchiveResult(first, cut, len(archived), size, removed)


def _cut(directory: Path, state, before: int | None, older_than_days: float | None,
         now_unix_ns: int | None) -> int:
    """The newest segment boundary (or the end of the log) at or before ``before``, or before which every record
    is older than ``older_than_days``; the archive base when none qualifies."""
    size = state.tree.size
    boundaries = [start for start, _ in state.segments[1:]] + [size]
    if before is not None:
        return max((b for b in boundaries if b <= before), default=state.tree.base_size)
    limit = (time.time_ns() if now_unix_ns is None else now_unix_ns) - int(older_than_days * DAY_NS)
    cut = state.tree.base_size
    for boundary, (_, path) in zip(boundaries, state.segments):
        if _last_time(path) >= limit:
            break
        cut = boundary
    return cut


def _last_time(path: Path) -> int:
    """The time of a segment's last record (every record before it is as old or older)."""
    data = path.read_bytes()
    last = None
    for _, payload in FrameScanner(data, frames_start(path, data, MAGIC) or len(MAGIC)):
        last = payload
    return parse_stored(last).time_unix_ns if last is not None else 0


def _write_archive(directory: Path, dest: Path, segments: list[Path], checkpoint, state, first: int,
                   cut: int) -> int:
    dest.mkdir(parents=True, exist_ok=True)
    size = 0
    for path in segments:
        shutil.copyfile(path, dest / path.name)
        size += path.stat().st_size
    previous = directory / BASE_FILE
    if previous.exists():  # the archive starts where the earlier one ended: it keeps that base
        shutil.copyfile(previous, dest / BASE_FILE)
    covered = [c for c in cps.read_all(directory)[0] if c.tree_size <= cut]
    if not covered or covered[-1].tree_size != cut:
        covered.append(checkpoint)
    with open(dest / cps.FILE_NAME, "xb") as out:
        out.write(CHECKPOINT_MAGIC + b"".join(frame(c.SerializeToString()) for c in covered))
    keys = directory / PUBLIC_KEYS_DIR
    if keys.is_dir():
        shutil.copytree(keys, dest / PUBLIC_KEYS_DIR)
    if (directory / PUBLIC_KEY_FILE).exists():
        shutil.copyfile(directory / PUBLIC_KEY_FILE, dest / PUBLIC_KEY_FILE)
    (dest / ARCHIVE_MARKER).write_text(json.dumps({
        "archive_of": str(directory.resolve()), "first_record": first, "end_record": cut,
        "archived_unix_ns": time.time_ns(), "checkpoint_root": checkpoint.root_hash.hex(),
    }, indent=1) + "\n", encoding="utf-8")
    for path in dest.rglob("*"):
        fsync_dir(path)  # (opened read-only and fsynced: the same for a file as for a folder)
    fsync_dir(dest)
    fsync_dir(dest.parent)
    return size


def _remove(paths: list[Path], directory: Path) -> int:
    for path in paths:
        path.unlink()
    if paths:
        fsync_dir(directory)
    return len(paths)
