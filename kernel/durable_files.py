"""Small files written whole or not at all, and made durable: the audit log's keys and base, uploaded pipelines.

A new temporary file beside the target (created afresh, ``O_EXCL``: one opened as found followed a link someone who
can write the folder planted under its name, and wrote over the file it pointed to, outside the data dir — an audit of
the key files, then the same in pipeline uploads), fsynced, renamed over the target, then the folder fsynced so the
rename itself survives a power cut. A failure leaves the target as it was and no half-written twin beside it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_whole(path: Path, data: bytes, temporary: Path | None = None) -> None:
    """Write ``data`` as ``path``, atomically and durably. ``temporary``: the twin's name, when readers of the folder
    must be able to tell it (a pipeline folder's watcher skips dot files); whatever is there already (a crash's
    leftover, a link) is removed first, and one put there again in between fails the write (EEXIST). By default a
    name of its own beside ``path``."""
    if temporary is None:
        temporary = path.with_name(f"{path.name}.tmp-{time.time_ns()}")
    else:
        temporary.unlink(missing_ok=True)
    try:
        with open(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644), "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except OSError:
        temporary.unlink(missing_ok=True)  # (a full disk: no half-written twin left in the folder)
        raise
    fsync_dir(path.parent)
