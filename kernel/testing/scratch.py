"""Scratch folders for tests and their child kernels, removed when the process that made them exits.

Every started kernel needs a data dir of its own (an audit log with preallocated segments, an SQLite store); made
with a bare ``tempfile.mkdtemp`` they outlived the run: a ``make test`` left ~1,000 of them in /tmp, and a CI
machine or a developer's laptop filled up run by run. They now live under one root per process, deleted at exit
(a test that must keep a data dir across a restart passes the same folder again, which stays until then).
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
import threading
from pathlib import Path

_lock = threading.Lock()
_root: Path | None = None


def scratch_root() -> Path:
    """This process's scratch root, made on first use and removed (with everything in it) at exit."""
    global _root
    with _lock:
        if _root is None:
            _root = Path(tempfile.mkdtemp(prefix="aios-scratch-"))
            atexit.register(shutil.rmtree, _root, True)
        return _root


def scratch_dir(prefix: str = "aios-data-") -> Path:
    """A fresh, empty folder under the scratch root."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir=scratch_root()))
