"""One decision per idempotency key, also while the first is still being made.

The idempotency store is read before a decision and written once the
decision is durable. Between the two, a second call with the same key — a
hedged request, or the retry of a client whose own deadline passed while the
kernel was still deciding — found nothing stored and decided again: a second
audit record and, for an escalation, a second review for one key (six
concurrent calls with one key made six of each). So a keyed request *claims*
its key before it looks in the store, and the claim is released once its
answer is stored (or it ended without one). A call that finds its key
claimed is refused at once with ABORTED — gRPC's code for a conflict with
another call, retried as a whole — and a ``retry-after-ms`` hint; retried,
it finds the stored answer (``replayed``). The claim is taken before the
store lookup, so a call arriving just as the first one's answer is stored
either sees the claim or, once claimed itself, the stored answer.

A claim that outlives its request by far is taken over with an error in the
log: every path that ends a decision releases its claim, so that would be a
bug, and a key locked until the next restart is the worse outcome.

A durable task's attempt waits for the claim instead of being refused
(``wait_ns``): the task holds its key (the task store's reservation), so a
call holding the claim then is either a Decide about to be refused for that
reservation (it claims before it checks: the claim is what makes a racing
StartTask see it), or a Decide of the same request that claimed before the
task existed, whose stored answer the attempt then replays. Refused, the
attempt failed for good on a doomed Decide's claim (FAILED_PRECONDITION for
another request) or backed off for seconds (ABORTED), and the Decides it
answers waited on it (a race audit).
"""

from __future__ import annotations

import logging
import threading
import time

from ..errors import Aborted, FailedPrecondition, quote

log = logging.getLogger("aios.decisions")

# Past its deadline by this much, a claim is stale (the audit wait and the store write are bounded by less).
STALE_AFTER_DEADLINE_NS = 60 * 10**9
STALE_WITHOUT_DEADLINE_NS = 600 * 10**9  # a request without any deadline: ten minutes
MAX_HINT_MS = 100  # the hint: how long the first call has taken so far (decisions take milliseconds), at most this


class Claim:
    __slots__ = ("key", "request_hash", "started_ns", "stale_ns")

    def __init__(self, key: tuple[str, str], request_hash: str, started_ns: int, deadline_ns: int | None):
        self.key = key
        self.request_hash = request_hash
        self.started_ns = started_ns
        self.stale_ns = (started_ns + STALE_WITHOUT_DEADLINE_NS if deadline_ns is None
                         else max(started_ns, deadline_ns) + STALE_AFTER_DEADLINE_NS)


class KeyClaims:
    """The (tenant, idempotency key) pairs whose decisions are being made now."""

    def __init__(self, clock=time.monotonic_ns):
        self._clock = clock
        self._lock = threading.Lock()
        self._released = threading.Condition(self._lock)  # (waited on only by claims given a wait_ns)
        self._held: dict[tuple[str, str], Claim] = {}

    def __len__(self) -> int:
        return len(self._held)

    def claim(self, tenant: str, key: str, request_hash: str, deadline_ns: int | None, wait_ns: int = 0) -> Claim:
        """Take ``key`` for a decision about to be made (release it with ``release``). Raises ABORTED, with
        a retry hint, while another call holds it for the same request; FAILED_PRECONDITION for another —
        after waiting up to ``wait_ns`` for it to be released (a task's attempt: the module docstring)."""
        now = self._clock()
        pair = (tenant, key)
        give_up = now + wait_ns
        with self._lock:
            while True:
                held = self._held.get(pair)
                if held is not None and now > held.stale_ns:
                    log.error("the claim on idempotency key %r (tenant %r) was never released (%.0f s old): taken "
                              "over; this is a bug", key, tenant, (now - held.started_ns) / 1e9)
                    held = None
                if held is None:
                    claim = self._held[pair] = Claim(pair, request_hash, now, deadline_ns)
                    return claim
                if now >= give_up:
                    break
                self._released.wait((give_up - now) / 1e9)
                now = self._clock()
        if held.request_hash != request_hash:
            raise FailedPrecondition(
                f"idempotency_key {quote(key)} is in use by another call with a different request; "
                "use a new key for a new request")
        hint = max(1, min(MAX_HINT_MS, -(-(now - held.started_ns) // 10**6)))
        raise Aborted(
            f"a call with idempotency_key {quote(key)} and the same request is being decided now; retry after "
            f"{hint} ms to get its answer (replayed)", trailers=(("retry-after-ms", str(hint)),))

    def held_hash(self, tenant: str, key: str) -> str | None:
        """The request hash of the call deciding with ``key`` now, or None."""
        held = self._held.get((tenant, key))
        return None if held is None else held.request_hash

    def release(self, claim: Claim | None) -> None:
        """Give the key back (no-op for None, or for a claim already released or taken over)."""
        if claim is None:
            return
        with self._lock:
            if self._held.get(claim.key) is claim:
                del self._held[claim.key]
                self._released.notify_all()
