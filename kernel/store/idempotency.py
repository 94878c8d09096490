"""Idempotency keys: the answer stored per (tenant, key), kept for a retention period.

``Decide`` looks a key up before deciding and stores the answer after:
same key + same request gives the stored answer; same key + a different
request is FAILED_PRECONDITION. "The same request" is ``request_hash``: the
request's content without the caller's request id, timeout and priority,
which a retry may change (a caller retrying at a higher priority asks for
the same decision sooner, not for another one).

Expiry uses the wall clock, because it is persisted and must mean the same
after a restart. Writes are not fsynced by default (``durable=False``): a
process crash loses nothing (WAL) but the keys of decisions recorded just
before it, as does a power loss; both are stored again at the next start
from those decisions' audit records (``restore_answers``), which name their
request's hash. Pass ``durable=True`` to fsync
each put (about 5x slower per put here: "Local store" in bench/RESULTS.md;
concurrent puts share a group commit either way).
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
from collections.abc import Callable

from .._proto.aios.kernel.v1 import kernel_pb2 as kpb
from ..errors import FailedPrecondition, InvalidArgument, quote
from ..limits import MAX_KEY_CHARS, check_identifier  # (with the kernel's other limits on identifiers: kernel/limits.py says why)

PURGE_EVERY = 1000  # puts between sweeps of expired keys
PURGE_BATCH = 1000  # rows deleted per sweep, so a sweep never holds the write lock long
MAX_UNWRITTEN = 100_000  # answers kept in memory while the store cannot write them (~1 KB each)
# (meta key) set once the answers stored before the audit_sequence column have it filled (fill_old_sequences)
OLD_SEQUENCES_FILLED = "idempotency.old_sequences_filled"


_INT64 = 1 << 63


def request_hash(request: kpb.DecisionRequest) -> str:
    """SHA-256 (hex) of what makes two requests "the same" for an idempotency key.

    A whole number means the same sent either way: as ``int_value`` or as ``number_value`` (800 and 800.0,
    JavaScript's numbers, -0.0 and 0), as the pipeline reads it. Hashing the Value's kind too made a Node
    client's retry of a Python client's call a FAILED_PRECONDITION "different request" (cross-language audit).
    """
    return _canonical_hash(request, keep_priority=False)


def matches(stored_hash: str, request: kpb.DecisionRequest, digest: str) -> bool:
    """Whether a request whose ``request_hash`` is ``digest`` is the one stored under ``stored_hash``, also when
    that was stored by an earlier kernel (``earlier_request_hashes``): a retry across the upgrade."""
    return stored_hash == digest or stored_hash in earlier_request_hashes(request)


def earlier_request_hashes(request: kpb.DecisionRequest) -> tuple[str, str]:
    """``request_hash`` as earlier kernels computed it: with the priority (2026-11-27, sessions 17-18), and
    before that also with each Value's kind as sent. Only looked at when the current hash differs."""
    with_priority = _without_call_details(request, keep_priority=True)
    as_sent = hashlib.sha256(with_priority.SerializeToString(deterministic=True)).hexdigest()
    return _canonical_hash(request, keep_priority=True), as_sent


def _canonical_hash(request: kpb.DecisionRequest, keep_priority: bool) -> str:
    return hashlib.sha256(canonical_request(request, keep_priority).SerializeToString(deterministic=True)).hexdigest()


def canonical_request(request: kpb.DecisionRequest, keep_priority: bool = False) -> kpb.DecisionRequest:
    """A copy of ``request`` as ``request_hash`` reads it: without the call details, each whole number an int."""
    copy = _without_call_details(request, keep_priority)
    for value in copy.fields.values():
        if value.WhichOneof("kind") == "number_value":
            number = value.number_value
            if math.isfinite(number) and number == int(number) and -_INT64 <= number < _INT64:
                value.int_value = int(number)
    return copy


def _without_call_details(request: kpb.DecisionRequest, keep_priority: bool = False) -> kpb.DecisionRequest:
    """A copy of ``request`` without what differs between a call and its retry (request id, timeout, priority)."""
    copy = kpb.DecisionRequest()
    copy.CopyFrom(request)
    copy.request_id = ""
    copy.timeout_ms = 0
    if not keep_priority:
        copy.priority = 0
    return copy


def check_key(key: str, field: str = "idempotency_key") -> None:
    check_identifier(key, field, MAX_KEY_CHARS)


class IdempotencyStore:
    """Stored answers by (tenant, idempotency key), in the data directory's database."""

    def __init__(self, db, retention_hours: float = 24.0, clock: Callable[[], int] = time.time_ns,
                 durable: bool = False):
        if not retention_hours > 0:
            raise InvalidArgument(f"idempotency retention_hours must be > 0, got {retention_hours}")
        self._db = db
        self.retention_ns = int(retention_hours * 3600 * 1e9)
        self._clock = clock  # wall clock: expiry is persisted
        self._durable = durable
        self._puts = 0
        # Answers sent whose entry could not be written (a full disk): (tenant, key) -> (request_hash, response,
        # expires_unix_ns), served to retries like stored ones and written by the next put that succeeds.
        self._unwritten: dict[tuple[str, str], tuple[str, bytes, int, int]] = {}  # (..., audit sequence)
        self._unwritten_lock = threading.Lock()
        self._flushing = threading.Lock()

    def keep_unwritten(self, tenant: str, key: str, request_hash: str, response: bytes,
                       audit_sequence: int = -1) -> bool:
        """Keep an answer whose ``put`` failed in memory (False when ``MAX_UNWRITTEN`` are kept already).

        It was sent: a retry of its key must get it back, not a second decision, audit record and review (an
        upgrade audit: on a full disk, 43 retried keys were decided twice before the audit log filled too). A
        later successful ``put`` writes it; a restart instead re-stores it from its audit record, since the
        review mark stored with the store's writes stays below it (``restore_answers``)."""
        with self._unwritten_lock:
            if len(self._unwritten) >= MAX_UNWRITTEN and (tenant, key) not in self._unwritten:
                return False
            self._unwritten[(tenant, key)] = (request_hash, bytes(response), self._clock() + self.retention_ns,
                                              audit_sequence)
            return True

    def check_writable(self, key: str) -> None:
        """Refuse a new decision with ``key`` at once (StoreBusy: UNAVAILABLE, retry-after-ms) while the store
        refuses writes: its answer could not be stored under its key. Decided all the same, it was answered OK
        with its entry kept only in memory (and a lock held elsewhere stalled every such answer by the 10 s busy
        timeout, one after the other); refused before it is decided, its retry decides it once the store is back."""
        self._db.check_writable(f"a new decision with idempotency_key {key!r} was not started (its answer could not "
                                "be stored under the key)")

    def unwritten(self) -> int:
        """Answers kept in memory until the store takes writes again."""
        return len(self._unwritten)

    def lowest_unwritten_sequence(self) -> int | None:
        """The lowest audit sequence an answer kept in memory cites (None when none does): the review mark must stay
        below it, or a restart would not re-store that answer from its record, and a retry would decide again."""
        if not self._unwritten:
            return None
        with self._unwritten_lock:
            cited = [entry[3] for entry in self._unwritten.values() if entry[3] >= 0]
        return min(cited) if cited else None

    def get(self, tenant: str, key: str) -> tuple[str, bytes] | None:
        """``(request_hash, response_bytes)`` stored under the key, or None (never stored, or expired)."""
        check_key(key)
        if self._unwritten:
            kept = self._unwritten.get((tenant, key))
            if kept is not None and kept[2] > self._clock():
                return kept[0], kept[1]
        with self._db.read() as conn:
            found = conn.execute(
                "SELECT request_hash, response FROM idempotency WHERE tenant = ? AND key = ? AND expires_unix_ns > ?",
                (tenant, key, self._clock()),
            ).fetchone()
        return None if found is None else (found[0], bytes(found[1]))

    def check(self, tenant: str, key: str, request_hash: str) -> bytes | None:
        """The stored answer for this request, None if there is none; FAILED_PRECONDITION if the key was
        used with another request."""
        found = self.get(tenant, key)
        if found is None:
            return None
        if found[0] != request_hash:
            raise _reused(key)
        return found[1]

    def now(self) -> int:
        """The store's wall clock (ns), which expiry is read against."""
        return self._clock()

    def put(self, tenant: str, key: str, request_hash: str, response: bytes, audit_sequence: int = -1,
            decided_unix_ns: int = 0, durable: bool | None = None) -> bytes:
        """Store ``response`` under the key; returns the answer now stored. ``durable``: fsync this commit (None:
        as the store was made).

        The first answer stored wins: if another call stored one for the same
        request meanwhile, that one is kept and returned. A live key stored
        for a different request raises FAILED_PRECONDITION. ``decided_unix_ns``
        (0 = now): when the answer was decided; the key lives the retention
        period from then (an answer stored again from its audit record at a
        start keeps its own lifetime, not a new one).
        """
        check_key(key)
        now = self._clock()
        decided = decided_unix_ns or now
        response = bytes(response)

        def work(conn) -> bytes:
            found = conn.execute(
                "SELECT request_hash, response FROM idempotency WHERE tenant = ? AND key = ? AND expires_unix_ns > ?",
                (tenant, key, now),
            ).fetchone()
            if found is not None:
                if found[0] != request_hash:
                    raise _reused(key)
                return bytes(found[1])
            self._insert(conn, tenant, key, request_hash, response, decided, audit_sequence=audit_sequence)
            self._puts += 1  # works run one at a time (on the group's leader), so no lock
            if self._puts % PURGE_EVERY == 0:
                self._purge(conn, now)
            return response

        stored = self._db.transact(work, durable=self._durable if durable is None else durable)
        if self._unwritten and self._flushing.acquire(blocking=False):  # the store takes writes again
            try:  # (one caller at a time writes them; the others go on: a review audit saw every put redo it all)
                self._write_unwritten()
            finally:
                self._flushing.release()
        return stored

    def flush_unwritten(self) -> None:
        """Write the answers kept in memory now (the store takes writes again: its refusal listener), not only at
        the next put: while the store refused writes, Decides with keys were refused at entry, so no put came."""
        if self._unwritten and self._flushing.acquire(blocking=False):
            try:
                self._write_unwritten()
            finally:
                self._flushing.release()

    def _write_unwritten(self) -> None:
        """Write the answers kept in memory, ``PURGE_BATCH`` to a transaction; those expired meanwhile are
        dropped. Stops at the first batch that fails again (the rest stay kept for a later put)."""
        now = self._clock()
        with self._unwritten_lock:
            waiting = list(self._unwritten.items())
        for start in range(0, len(waiting), PURGE_BATCH):
            batch = waiting[start:start + PURGE_BATCH]

            def work(conn, batch=batch) -> None:
                for (tenant, key), (request_hash, response, expires, sequence) in batch:
                    if expires > now and conn.execute(
                            "SELECT 1 FROM idempotency WHERE tenant = ? AND key = ? AND expires_unix_ns > ?",
                            (tenant, key, now)).fetchone() is None:  # (else the first answer stored wins)
                        self._insert(conn, tenant, key, request_hash, response, now, expires, sequence)
            try:
                self._db.transact(work, durable=self._durable)
            except Exception:
                return
            with self._unwritten_lock:
                for pair, (request_hash, *_) in batch:
                    if self._unwritten.get(pair, (None,))[0] == request_hash:
                        del self._unwritten[pair]

    def _insert(self, conn, tenant: str, key: str, request_hash: str, response: bytes, now: int,
                expires: int | None = None, audit_sequence: int = -1) -> None:
        conn.execute("INSERT OR REPLACE INTO idempotency (tenant, key, request_hash, response, created_unix_ns,"
                     " expires_unix_ns, audit_sequence) VALUES (?, ?, ?, ?, ?, ?, ?)",
                     (tenant, key, request_hash, response, now, now + self.retention_ns if expires is None
                      else expires, audit_sequence))

    def fill_old_sequences(self, skip_tenant: str = "") -> int:
        """Set the ``audit_sequence`` column of the answers stored before it existed (schema version 4 and
        before: -1) from their bytes, once per store (a meta key says it was done); returns how many rows.

        ``highest_sequence`` reads the column alone, so the answers an older kernel stored were never seen by a
        start checking the log against the store: records lost after the review mark (an async-mode power cut,
        a log rolled back) went unseen, fsync mode started instead of refusing, and a retried key replayed a
        sequence number that named another decision (an upgrade audit). Answers that cite no record (audit off)
        keep -1; ``skip_tenant``'s rows (the resolutions' own, not decisions) are left alone."""
        with self._db.read() as conn:
            if conn.execute("SELECT 1 FROM meta WHERE key = ?", (OLD_SEQUENCES_FILLED,)).fetchone() is not None:
                return 0
        filled = 0
        for page in self._answer_pages("audit_sequence < 0", skip_tenant):
            found = [(answer.audit_sequence, tenant, key) for tenant, key, answer in page
                     if answer.audit_hash]  # it cites a record (audit off: none)
            if found:
                filled += self._db.transact(lambda conn, rows=found: conn.executemany(
                    "UPDATE idempotency SET audit_sequence = ? WHERE tenant = ? AND key = ? AND audit_sequence < 0",
                    rows).rowcount, durable=True)
        self._db.transact(lambda conn: conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, 1)",
                                                    (OLD_SEQUENCES_FILLED,)), durable=True)
        return filled

    def unmark_unrecorded(self, skip_tenant: str = "") -> int:
        """Set the ``audit_sequence`` column back to -1 for the answers stored as citing record #0 whose bytes cite
        no record (an unaudited kernel's, audit_mode off, stored them with the answer's 0); returns how many.

        Read as record #0 seen by the store, they made the next start with the log on refuse in fsync mode ("the
        audit log ends at record #0 but the ... store saw records up to #0") and, in async mode, forget every such
        answer as citing a lost record. Only rows at 0 are read (the partial index): after one pass, the few
        answers that do cite record #0."""
        unmarked = 0
        for page in self._answer_pages("audit_sequence >= 0 AND audit_sequence = 0", skip_tenant,
                                       "INDEXED BY idempotency_by_sequence"):
            found = [(tenant, key) for tenant, key, answer in page if not answer.audit_hash]
            if found:
                unmarked += self._db.transact(lambda conn, rows=found: conn.executemany(
                    "UPDATE idempotency SET audit_sequence = -1 WHERE tenant = ? AND key = ? AND audit_sequence = 0",
                    rows).rowcount, durable=True)
        return unmarked

    def _answer_pages(self, where: str, skip_tenant: str, index: str = ""):
        """The stored answers matching ``where`` (but ``skip_tenant``'s), as pages of (tenant, key, Decision), in key
        order, a read transaction a page (a day of keyed answers may be millions of rows); rows whose bytes are not
        a Decision are left out (nothing of ours)."""
        after = ("", "")
        while True:
            with self._db.read() as conn:
                rows = conn.execute(f"SELECT tenant, key, response FROM idempotency {index} WHERE {where}"
                                    " AND (tenant, key) > (?, ?) AND tenant != ? ORDER BY tenant, key LIMIT ?",
                                    (*after, skip_tenant, PURGE_BATCH)).fetchall()
            if not rows:
                return
            after = rows[-1][:2]
            page = []
            for tenant, key, response in rows:
                try:
                    page.append((tenant, key, kpb.Decision.FromString(response)))
                except Exception:  # (not a decision: nothing of ours, left alone)
                    continue
            yield page

    def highest_sequence(self) -> int:
        """The highest audit sequence a stored answer cites (-1 when none does): the log must hold it."""
        with self._db.read() as conn:
            found = conn.execute("SELECT max(audit_sequence) FROM idempotency INDEXED BY idempotency_by_sequence"
                                 " WHERE audit_sequence >= 0").fetchone()[0]
        return -1 if found is None else found

    def forget_recorded_from(self, sequence: int, skip_tenant: str = "") -> int:
        """Delete the entries whose answer cites audit sequence ``sequence`` or later (all tenants' but
        ``skip_tenant``'s); returns how many went.

        For a start that accepts lost records (async mode after a power cut): their sequence numbers go to
        new decisions, so a stored answer citing one would be replayed naming another caller's record (an
        upgrade audit: a retry was answered audit_sequence 901, and #901 was then another request's decision).
        Forgotten, the key's retry is decided anew, on the record; the lost decision is gone either way. Answers
        stored before the ``audit_sequence`` column existed are read from their bytes, a page at a time."""
        stale = []
        with self._db.read() as conn:
            rows = conn.execute("SELECT tenant, key, response FROM idempotency"
                                " WHERE audit_sequence < 0 AND tenant != ?", (skip_tenant,))
            while page := rows.fetchmany(PURGE_BATCH):
                for tenant, key, response in page:
                    try:
                        if kpb.Decision.FromString(response).audit_sequence >= sequence:
                            stale.append((tenant, key))
                    except Exception:  # (not a decision: nothing of ours, left alone)
                        continue

        def work(conn) -> int:
            gone = conn.execute("DELETE FROM idempotency WHERE audit_sequence >= ? AND tenant != ?",
                                (sequence, skip_tenant)).rowcount
            conn.executemany("DELETE FROM idempotency WHERE tenant = ? AND key = ?", stale)
            return gone + len(stale)

        return self._db.transact(work, durable=True)

    def forget_callers_under(self, tenant: str) -> int:
        """Delete callers' answers stored under ``tenant``, one the kernel keeps its own entries under (with no
        request hash: a caller's answer always has one); returns how many went. A kernel before the reserved
        tenants (limits.RESERVED_TENANT_PREFIX) stored a Decide's answer there, and a review's resolution then
        answered it ('review:<id>') or failed for good ('recording:<id>')."""
        return self._db.transact(lambda conn: conn.execute(
            "DELETE FROM idempotency WHERE tenant = ? AND request_hash != ''", (tenant,)).rowcount, durable=True)

    def purge_expired(self) -> int:
        """Delete expired keys (at most PURGE_BATCH); returns how many went."""
        now = self._clock()
        return self._db.transact(lambda conn: self._purge(conn, now), durable=self._durable)

    @staticmethod
    def _purge(conn, now: int) -> int:
        return conn.execute(
            "DELETE FROM idempotency WHERE (tenant, key) IN"
            " (SELECT tenant, key FROM idempotency WHERE expires_unix_ns <= ? LIMIT ?)",
            (now, PURGE_BATCH),
        ).rowcount


def _reused(key: str) -> FailedPrecondition:
    return FailedPrecondition(
        f"idempotency_key {quote(key)} was used before with a different request; use a new key for a new request"
    )


def restore_answers(store: IdempotencyStore, records) -> int:
    """Store the answer of every keyed decision in ``records`` (audit records, read at start from the mark
    below which every entry was stored: kernel/pipelines/flow.py ``recorded_before``) that has none: a
    decision recorded just before the kernel was killed, whose key was not stored yet, is then replayed to
    its caller's retry instead of decided a second time. Returns how many were stored.

    The answer is the recorded decision with its audit sequence and hash, as it was sent. Records written
    before records carried their request's hash (``request_hash``) cannot be matched to a retry: skipped. A key
    lives the retention period from its decision's record (``time_unix_ns``): one whose period ended while the
    kernel was down is not stored again. (The mark rises only with escalations and stops, so after a kill it may
    lie days back: every keyed answer since, long expired and purged, came back for another whole period, and a
    key reused after its period was refused FAILED_PRECONDITION as used with another request.)
    """
    restored = 0
    now = store.now()
    for record in records:
        if not record.idempotency_key or not record.request_hash:
            continue
        if record.time_unix_ns and record.time_unix_ns + store.retention_ns <= now:
            continue  # expired while the kernel was down (or before the kill): nothing to replay
        if store.get(record.tenant, record.idempotency_key) is not None:
            continue  # stored before the stop (or a later use of the key: its own entry stands)
        answer = kpb.Decision()
        answer.CopyFrom(record.decision)
        answer.audit_sequence, answer.audit_hash = record.sequence, record.hash.hex()
        try:
            store.put(record.tenant, record.idempotency_key, record.request_hash.hex(), answer.SerializeToString(),
                      record.sequence, decided_unix_ns=record.time_unix_ns)
        except FailedPrecondition:
            continue
        restored += 1
    return restored

