"""Storage backends. ``local`` (this package, the default): one SQLite file per data directory.

The rest of the kernel sees a backend as a ``Database``-like object with two
record sets, ``.tasks`` and ``.reviews`` (insert / get / compare-and-set
replace / scans), an ``IdempotencyStore`` over it, and in-process change
feeds. Writes are group-committed (``Database.transact``: concurrent writers
share one transaction and one fsync, each keeps its own result or error;
``after_commit`` hooks publish changes once durable). A clustered backend (NATS JetStream KV and streams) implements the
same small interfaces.
"""

from .feed import Feed, Subscription
from .idempotency import IdempotencyStore, request_hash
from .schema import MIGRATIONS
from .sqlite import DATABASE_FILE, Database, open_database

__all__ = ["DATABASE_FILE", "Database", "Feed", "IdempotencyStore", "MIGRATIONS", "Subscription", "open_database", "request_hash"]
