"""Random identifiers (request and review ids) without a system call, or a GIL hand-off, each.

``os.urandom`` releases the GIL around its ``getrandom`` call; under load the
thread then waits to get it back behind the handler threads — ~40 µs a call
measured on the decision finisher's thread, which names a review for every
escalated decision while its whole group waits. Here ids are cut from a
4 KiB block of ``os.urandom`` bytes (the same source), one system call per
512 ids. A forked child starts with a fresh block: parent and child never
hand out the same bytes.
"""

from __future__ import annotations

import os
import threading

_BLOCK_BYTES = 4096

_lock = threading.Lock()
_block = b""
_used = 0


def random_hex(nbytes: int = 8) -> str:
    """``nbytes`` random bytes as lowercase hex (``os.urandom(nbytes).hex()``, from a shared block)."""
    global _block, _used
    with _lock:
        start = _used
        if start + nbytes > len(_block):
            _block = os.urandom(max(_BLOCK_BYTES, nbytes))
            start = 0
        _used = start + nbytes
        return _block[start:start + nbytes].hex()


def _forget_block() -> None:
    global _block, _used
    _block, _used = b"", 0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_block)
