"""Errors the kernel answers callers with, each tied to one gRPC status code.

Inner layers raise these without importing grpc; the API layer maps
``code`` to ``grpc.StatusCode`` and adds ``trailers`` (such as retry hints).
Anything else that escapes a handler is a bug: it becomes INTERNAL with a
request id that is also in the log.

A message is bounded and printable from the moment the error is made
(``clamp``): every way it leaves the kernel (a gRPC status's details on
either front end, a call answered later, a stream's per-message
``error_message``, a task's failure reason, a log line) reads ``message``.
gRPC sends the details in a header, so an unbounded message (one quoting a
4 MB id) turned the caller's NOT_FOUND into RESOURCE_EXHAUSTED "received
metadata size exceeds hard limit", and a newline in it went out raw. Where a
message names a caller's value, ``quote`` shows it: short and escaped.
"""

from __future__ import annotations

# At most this many UTF-8 bytes of a message (details): gRPC percent-encodes the non-ASCII ones in
# its grpc-message header (3 bytes each), and refuses a header block past 8 KiB by default.
MAX_DETAILS_BYTES = 2000
QUOTE_CHARS = 80  # characters of a caller's value that ``quote`` shows
_ENDING_ROOM = 48  # bytes kept for "… (N more characters)"


def _escaped(char: str) -> str:
    return repr(char)[1:-1] if not char.isprintable() else char


def clamp(text: str, limit: int = MAX_DETAILS_BYTES) -> str:
    """``text`` with every non-printable character escaped as ``repr`` escapes it (``\\n``, ``\\x1b``,
    ``\\u2028``), cut to at most ``limit`` UTF-8 bytes, ending "… (N more characters)" when cut.
    Idempotent: a clamped text comes back as it is."""
    if len(text) <= limit and text.isascii() and text.isprintable():  # (nearly every message)
        return text
    pieces = [_escaped(char) for char in text[:limit]]  # (escaping only lengthens: no more would fit)
    whole = "".join(pieces)
    if len(text) <= limit and len(whole.encode("utf-8")) <= limit:
        return whole
    budget, size, shown = limit - _ENDING_ROOM, 0, 0
    for piece in pieces:
        size += len(piece.encode("utf-8"))
        if size > budget:
            break
        shown += 1
    return f"{''.join(pieces[:shown])}… ({len(text) - shown} more characters)"


def quote(value: str, limit: int = QUOTE_CHARS) -> str:
    """A caller's value (an id, a name) as an error message or a log line shows it: ``repr``-quoted (so a
    newline or an escape sequence in it is shown, never acted on) and cut to ``limit`` characters."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}… ({len(value) - limit} more characters)"


class KernelError(Exception):
    code = "INTERNAL"

    def __init__(self, message: str, trailers: tuple[tuple[str, str], ...] = ()):
        message = clamp(message if isinstance(message, str) else str(message))
        super().__init__(message)
        self.message = message
        self.trailers = trailers


class InvalidArgument(KernelError):
    code = "INVALID_ARGUMENT"


class ModelRefusedInput(InvalidArgument):
    """The model itself (onnxruntime) refused one request's input at run time: the caller's own tensors for
    ModelInfer, but for a Decide an input the pipeline built from fields that passed every check — a fault of
    the model or the pipeline, which takes the pipeline's fallback (group_finish.py)."""


class NotFound(KernelError):
    code = "NOT_FOUND"


class ResourceExhausted(KernelError):
    code = "RESOURCE_EXHAUSTED"


class DeadlineExceeded(KernelError):
    code = "DEADLINE_EXCEEDED"


class DeadlineTooShort(DeadlineExceeded):
    """Refused at the model's queue with nothing ahead: the model's own predicted run, ``run_ns``, ends after the
    deadline. A request whose whole timeout is shorter than that run fails the same way however often it is sent
    (a durable task does not retry it: kernel/decisions.py ``_may_pass``); one that spent its time before the
    queue (a stall) may pass."""

    def __init__(self, message: str, run_ns: int):
        super().__init__(message)
        self.run_ns = run_ns


class Cancelled(KernelError):
    code = "CANCELLED"


# On an UNAVAILABLE the kernel sends before it decided anything: a retry cannot decide twice. gRPC's own
# UNAVAILABLEs lack it — "Cancelling all calls" at the end of a drain's grace, a connection lost mid-call —
# and after those a request may have been decided, so a client sends one again only with its idempotency key
# (a docs audit: both clients retried them, and a keyless request was decided twice).
NOT_DECIDED = (("aios-not-decided", "1"),)


class Unavailable(KernelError):
    """Unless given trailers of its own (a decision recorded all the same names its audit sequence), it says
    ``NOT_DECIDED``."""

    code = "UNAVAILABLE"

    def __init__(self, message: str, trailers: tuple[tuple[str, str], ...] = NOT_DECIDED):
        super().__init__(message, trailers)


class PermissionDenied(KernelError):
    code = "PERMISSION_DENIED"


class FailedPrecondition(KernelError):
    code = "FAILED_PRECONDITION"


class Aborted(KernelError):
    """A conflict with another call in progress (gRPC's code for "retry the whole call a little later")."""

    code = "ABORTED"


class Unimplemented(KernelError):
    """A part of a protocol this kernel does not offer (Triton answers UNSUPPORTED, UNIMPLEMENTED over gRPC)."""

    code = "UNIMPLEMENTED"


class Internal(KernelError):
    code = "INTERNAL"


def shutting_down(resume: str = "") -> Unavailable:
    """What an open watch (WatchReviews, WatchTask, StreamAudit following the log) ends with when the
    kernel starts to drain: a watch has no end of its own and would otherwise hold the drain for its
    whole grace period. ``resume`` says how to pick up where it ended, where a watch can."""
    return Unavailable("the kernel is shutting down; watch again after it restarts" + (f" ({resume})" if resume else ""))


class TransientError(Unavailable):
    """A step failed in a way that may pass if tried again (a busy dependency, a timeout).

    Durable tasks retry such failures with exponential backoff; any other
    exception fails the task at once.
    """
