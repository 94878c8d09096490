"""The idempotency store, as the decision layer imports it (``kernel.tasks.IdempotencyStore``).

It lives with the storage backend (``kernel.store.idempotency``); this name
is the task layer's public surface for it.
"""

from ..store.idempotency import IdempotencyStore, request_hash

__all__ = ["IdempotencyStore", "request_hash"]
