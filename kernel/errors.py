"""Errors the kernel answers callers with, each tied to one gRPC status code.

Inner layers raise these without importing grpc; the API layer maps
``code`` to ``grpc.StatusCode`` and adds ``trailers`` (such as retry hints).
Anything else that escapes a handler is a bug: it becomes INTERNAL with a
request id that is also in the log.
"""

from __future__ import annotations


class KernelError(Exception):
    code = "INTERNAL"

    def __init__(self, message: str, trailers: tuple[tuple[str, str], ...] = ()):
        super().__init__(message)
        self.message = message
        self.trailers = trailers


class InvalidArgument(KernelError):
    code = "INVALID_ARGUMENT"


class NotFound(KernelError):
    code = "NOT_FOUND"


class ResourceExhausted(KernelError):
    code = "RESOURCE_EXHAUSTED"


class DeadlineExceeded(KernelError):
    code = "DEADLINE_EXCEEDED"


class Cancelled(KernelError):
    code = "CANCELLED"


class Unavailable(KernelError):
    code = "UNAVAILABLE"


class PermissionDenied(KernelError):
    code = "PERMISSION_DENIED"


class FailedPrecondition(KernelError):
    code = "FAILED_PRECONDITION"


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
