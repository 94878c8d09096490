"""A request's absolute deadline: the caller's gRPC deadline and a request-level timeout, whichever is sooner.

One rule for ModelInfer (Triton's ``timeout`` parameter, µs) and Decide
(``timeout_ms``): the gRPC deadline is the client's own instant; a request
timeout counts from ``arrived_ns``, when the call reached the kernel (before
it waited for a handler thread; see kernel/api/registration.py), or from now
if that is unknown. Anything further out than a day means "no deadline"
(clients send "infinite" ones). A deadline already passed is
DEADLINE_EXCEEDED at once, before any work: not a full queue.
"""

from __future__ import annotations

from ..errors import DeadlineExceeded
from .types import NO_DEADLINE

MAX_DEADLINE_NS = 86_400 * 10**9


def request_deadline(now: int, call_deadline_ns: int | None, timeout_ns: int, arrived_ns: int | None = None) -> int:
    """Absolute ``time.monotonic_ns()`` deadline, or NO_DEADLINE; raises DeadlineExceeded if it has passed."""
    deadline = NO_DEADLINE
    if call_deadline_ns is not None and call_deadline_ns - now < MAX_DEADLINE_NS:
        deadline = call_deadline_ns
    if 0 < timeout_ns < MAX_DEADLINE_NS:
        by_request = (arrived_ns or now) + timeout_ns
        deadline = by_request if deadline == NO_DEADLINE else min(deadline, by_request)
    if deadline != NO_DEADLINE and deadline <= now:
        since = f", {(now - arrived_ns) / 1e6:.1f} ms after it arrived" if arrived_ns else ""
        raise DeadlineExceeded(f"the request's deadline passed {(now - deadline) / 1e6:.1f} ms before the kernel "
                               f"could start it{since}")
    return deadline
