"""Who asked for a change the audit log records: a model loaded or unloaded, a pipeline uploaded.

The RPC handler that makes the change says so around its call (``requested_by``), and the listeners that
write the record read it (``origin``) on the same thread: the model hub and the pipeline registry need not
know about callers. Empty means the kernel itself (its start, a change in the pipeline folder). Until RBAC
names an authenticated principal, the caller is its gRPC peer (an operator walk-through: an upload could not
be told apart from a file the folder watcher picked up).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_origin: ContextVar[str] = ContextVar("aios_origin", default="")


@contextmanager
def requested_by(who: str) -> Iterator[None]:
    token = _origin.set(who)
    try:
        yield
    finally:
        _origin.reset(token)


def origin() -> str:
    """Who asked for the change being made on this thread ("" for the kernel itself)."""
    return _origin.get()
