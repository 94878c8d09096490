"""What the audit log raises: its own errors, each tied to a gRPC status code."""

from __future__ import annotations

from ..errors import KernelError


class AuditError(KernelError):
    """The log cannot take or return records (writer failure, closed, corrupt files).

    UNAVAILABLE: a decision whose record is not durable must not be answered,
    and the caller may retry against a healthy replica.
    """

    code = "UNAVAILABLE"


class AuditTimeout(AuditError):
    """A record did not become durable within the time the caller gave (``sequence``: which, -1 if not one)."""

    code = "DEADLINE_EXCEEDED"
    sequence = -1


class AuditFilesGone(AuditError):
    """The files the writer has open are no longer the log's files: its directory, segment or checkpoint file
    was removed, renamed or replaced under it (``rm -rf data/audit``).

    Writing on would acknowledge records that exist only in unlinked files and vanish when the kernel
    stops, so the log fail-stops like after a failed write. ``message`` (logged) names the paths and what
    to do; ``summary`` is what callers are answered, without the server's paths.
    """

    def __init__(self, message: str, summary: str):
        super().__init__(message)
        self.summary = summary


class AuditCorrupt(AuditError):
    """The files on disk are not a log this kernel wrote (changed, removed or foreign bytes).

    Raised on open when the damage is anywhere but a torn tail, which is
    repaired; ``aios-kernel audit verify`` names the first bad record.
    """

    code = "FAILED_PRECONDITION"


class AuditFormatTooNew(AuditError):
    """A segment or checkpoint file of a newer format than this kernel reads: written by a newer kernel (a rollback),
    not damage. Said as such, so a rollback is not mistaken for tampering (an upgrade audit: it read "does not start
    with the expected file header" and `audit verify` "FAILED at record 0")."""

    code = "FAILED_PRECONDITION"


class AuditArchived(AuditError):
    """A read, root or proof that needs records archived from this log (``aios-kernel audit archive``): they
    are in the archive, which verifies and exports on its own; this log serves records from its base on."""

    code = "FAILED_PRECONDITION"
