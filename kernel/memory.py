"""Giving the memory of an unloaded model version back to the operating system.

A dropped version's onnxruntime sessions are freed at once, but glibc's
allocator keeps what they held (weights of tens of MB were allocated from its
heap once its mmap threshold had risen) until a later allocation trims it:
six reloads of a 34 MB model with 4 instances on a quiet server held 0.5 to
0.7 GB more than one copy needs, and an unload gave none of it back until
unrelated traffic did (a scheduling audit; measured: ``malloc_trim(0)`` after
the drop returned the server to its size before the load within a second).
So the kernel trims once a version is dropped, after a short pause that lets
the thread of the version's last batch let go of it. Nothing happens where
the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time

from .threads import libc

log = logging.getLogger("aios.memory")

TRIM_AFTER_DROP_S = 0.5
_pending = threading.Event()
_trim = None


def _malloc_trim():
    global _trim
    if _trim is None:
        try:
            _trim = libc().malloc_trim
            _trim.argtypes, _trim.restype = [ctypes.c_size_t], ctypes.c_int
        except (OSError, AttributeError):  # not glibc (musl, macOS): its allocator does its own returning
            _trim = False
    return _trim


def release_soon() -> None:
    """Return freed heap memory to the OS TRIM_AFTER_DROP_S from now, on a thread of its own (once for drops
    that come together); never blocks its caller."""
    if _pending.is_set() or not _malloc_trim():
        return
    _pending.set()

    def release() -> None:
        time.sleep(TRIM_AFTER_DROP_S)
        _pending.clear()
        try:
            _malloc_trim()(0)
        except Exception:  # (a C library that refuses: nothing is lost but the memory)
            log.debug("malloc_trim failed", exc_info=True)

    threading.Thread(target=release, name="aios-release-memory", daemon=True).start()
