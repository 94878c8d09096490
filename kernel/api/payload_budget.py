"""The bytes of large requests the kernel holds at once, across every call: bounded by ``payload_budget_bytes``.

Each request is bounded on its own (``max_message_bytes``, the element limits of kernel/limits.py, a stream's
``MAX_HELD_BYTES``), but nothing bounded their sum: 64 ModelInfer calls of 32 MiB each, or their decoded
tensors queued behind a slow model, held GBs until the process was OOM-killed and every call in flight was
lost. So a request larger than ``CHARGE_ABOVE`` is charged against one budget per kernel from the moment its
handler has it until its call ends (answered, failed, cancelled, past its deadline, its stream closed, the
kernel stopped): ModelInfer and each ModelStreamInfer request by their bytes on the wire or, when more, what
their decoded inputs hold (``tensors.decode_inputs``); Decide, StartTask and each DecideStream request by their
bytes (a DecideStream's once it is prepared, before it is queued). A request that would pass the budget is
refused at once with RESOURCE_EXHAUSTED naming the setting and a ``retry-after-ms`` hint (inside a stream, that
request's answer says so and the stream goes on), counted in ``refused``. A request larger than the whole
budget is taken while nothing else is held, so it can always run alone.

Answers are counted through their requests: a unary call's charge lasts until its answer is sent (its call's end),
a ModelStreamInfer request's until gRPC has taken its answer to send, so the answers of a stream whose client
stops reading stay charged (at most its window: scheduling/stream_window.py) until it reads, is cancelled or the
kernel stops. A DecideStream request's charge comes back once it is decided: a decision is small.

Small requests, the hot path (a tiny ModelInfer is a few hundred bytes), are not charged by their bytes: the
deserializer wraps a request of the charged types only past ``CHARGE_ABOVE`` (registration.py), so what a
small call pays is that one length compare and a type check. A small ModelInfer or ModelStreamInfer request
whose decoded form is past ``CHARGE_ABOVE`` (64 KiB of 1-byte strings hold ~4 MB; small typed INT64 values 16x
their bytes; parameters, map entries in upb, ~12x) is charged by that form from when it is decoded
(``charge_decoded``): only the checked decoder (typed contents, BYTES) makes such copies and measures them as it
goes, parameters are counted where they are read (``WorkItem.decoded_bytes``), the raw fast path's views hold
nothing past the request, so a tiny raw call pays one more compare. A small Decide,
StartTask or DecideStream request is not charged (their fields are bounded per request, kernel/limits.py).
"""

from __future__ import annotations

import threading

from ..errors import ResourceExhausted

SETTING = "payload_budget_bytes"
CHARGE_ABOVE = 64 << 10  # bytes on the wire: a request at most this large is not charged
# A hint: the budget frees as calls in flight are answered, about as often as their batches finish.
RETRY_AFTER_MS = 100


class PayloadBudget:
    """At most ``limit`` bytes of large requests held at once; ``held`` and ``refused`` are read by /metrics."""

    __slots__ = ("limit", "held", "refused", "_lock")

    def __init__(self, limit: int):
        self.limit = limit
        self.held = 0  # bytes charged now (read without the lock: a snapshot)
        self.refused = 0  # requests refused for want of room
        self._lock = threading.Lock()

    def charge(self, nbytes: int, what: str) -> Held:
        """``nbytes`` held for ``what`` (e.g. "ModelInfer") until the returned ``Held`` is released, or
        RESOURCE_EXHAUSTED."""
        self._take(nbytes, what)
        return Held(self, nbytes)

    def _take(self, nbytes: int, what: str) -> None:
        with self._lock:
            held = self.held
            if held + nbytes <= self.limit or held == 0:
                self.held = held + nbytes
                return
            self.refused += 1
        raise ResourceExhausted(
            f"{what} refused: the kernel holds {held:,} bytes of large requests in flight and this one needs "
            f"{nbytes:,} more (limit {self.limit:,}, the {SETTING} setting); retry after {RETRY_AFTER_MS} ms",
            trailers=(("retry-after-ms", str(RETRY_AFTER_MS)),),
        )

    def _give_back(self, nbytes: int) -> None:
        with self._lock:
            self.held -= nbytes


class Held:
    """One call's charge, given back once however often ``release`` is called (from any thread)."""

    __slots__ = ("_budget", "nbytes", "_lock")

    def __init__(self, budget: PayloadBudget, nbytes: int):
        self._budget = budget
        self.nbytes = nbytes
        self._lock = threading.Lock()

    def grow(self, extra: int, what: str) -> None:
        """Charge ``extra`` more (what the decoded request holds past its bytes), or RESOURCE_EXHAUSTED (the
        charge made so far stays until ``release``)."""
        if extra <= 0:
            return
        with self._lock:
            budget = self._budget
            if budget is None:  # released already (the call ended): nothing to hold it for
                return
            budget._take(extra, what)
            self.nbytes += extra

    def release(self) -> None:
        with self._lock:
            budget, self._budget = self._budget, None
        if budget is not None:
            budget._give_back(self.nbytes)


def hold_call(budget: PayloadBudget | None, received, what: str, on_end) -> tuple[object, Held | None]:
    """A large unary request (``registration.Received``) charged until its call ends: ``on_end(release)``
    registers the release with the call (it returns False if the call has ended already: released at once).
    Returns the message and its ``Held`` (None without a budget)."""
    if budget is None:
        return received.message, None
    held = budget.charge(received.nbytes, what)
    if not on_end(held.release):
        held.release()
    return received.message, held


def charge_decoded(budget: PayloadBudget | None, held: Held | None, decoded: int, what: str, on_end) -> Held | None:
    """A unary request's charge once its inputs are decoded (``decoded``: ``WorkItem.decoded_bytes``): a large one's
    (``held``) grows to that when it is more than its bytes; a small one whose decoded form is past ``CHARGE_ABOVE``
    (64 KiB of 1-byte strings hold ~4 MB) is charged by it now, until its call ends (``on_end``, as ``hold_call``'s).
    Returns the call's ``Held`` (None: nothing charged), or RESOURCE_EXHAUSTED (what was charged stays till the end)."""
    if held is not None:
        held.grow(decoded - held.nbytes, what)
        return held
    if budget is None or decoded <= CHARGE_ABOVE:
        return None
    held = budget.charge(decoded, what)
    if not on_end(held.release):
        held.release()
    return held


class StreamCharges:
    """What a client stream's requests hold of the budget: each request past ``CHARGE_ABOVE`` is charged as it is
    read (``take``) and given back as its answer goes out (``give_back``); whatever is still held when the stream
    ends comes back at once (``close``), however it ends. A small request costs a compare each way."""

    __slots__ = ("_budget", "_what", "_held", "_closed", "_lock")

    def __init__(self, budget: PayloadBudget | None, what: str):
        self._budget = budget
        self._what = what
        self._held = 0  # charged for requests not answered yet
        self._closed = False
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> int:
        """Charge a request of ``nbytes`` on the wire; what was charged (0 for a small one, or once the stream
        ended), to hand to ``give_back`` with its answer; RESOURCE_EXHAUSTED if it would pass the budget."""
        if nbytes <= CHARGE_ABOVE or self._budget is None:
            return 0
        return self._add(nbytes)

    def grow(self, charged: int, nbytes: int, extra: int) -> int:
        """The charge of a request of ``nbytes`` (``charged`` so far) once its decoded inputs are found to hold
        ``extra`` more than its bytes: raised by ``extra``, or, for a small request whose decoded form is past
        ``CHARGE_ABOVE`` (64 KiB of 1-byte strings hold ~4 MB), charged whole now (a stream computes what each
        request holds anyway). RESOURCE_EXHAUSTED leaves it as it was."""
        if extra <= 0 or self._budget is None:
            return charged
        if charged:
            return charged + self._add(extra)
        if nbytes + extra > CHARGE_ABOVE:
            return self._add(nbytes + extra)
        return 0

    def _add(self, nbytes: int) -> int:
        with self._lock:
            if self._closed:  # nothing will answer it: not held
                return 0
            self._budget._take(nbytes, self._what)
            self._held += nbytes
        return nbytes

    def give_back(self, charged: int) -> None:
        """A request's answer went out: what ``take`` (and ``grow``) charged for it comes back."""
        if not charged:
            return
        with self._lock:
            if self._closed:  # given back with the rest already
                return
            self._held -= charged
            self._budget._give_back(charged)

    def close(self) -> None:
        """The stream ended: every charge still held comes back (once; later calls do nothing)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            held, self._held = self._held, 0
            if held:
                self._budget._give_back(held)
