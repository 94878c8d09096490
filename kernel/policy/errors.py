"""What the policy package reports: diagnostics with file and line, and the errors carrying them.

A policy file is checked as a whole: every problem found becomes a
``Diagnostic`` (``FILE:LINE: subject: reason``), errors refuse the file with
one ``PolicyError`` listing them all, warnings ride along on the loaded
``Policy``. ``PolicyInputError`` is the other kind of mistake: a batch handed to
``Policy.evaluate`` whose columns do not fit the policy's declared inputs.
Both are ``InvalidArgument`` so the API layer answers INVALID_ARGUMENT.
"""

from __future__ import annotations

from ..errors import InvalidArgument

ERROR = "error"
WARNING = "warning"


class Diagnostic:
    """One finding about a policy file, located at ``path:line`` (and ``column`` in an expression)."""

    __slots__ = ("path", "line", "column", "subject", "message", "severity", "excerpt")

    def __init__(self, path: str, line: int, subject: str, message: str, *,
                 column: int = 0, severity: str = ERROR, excerpt: str = ""):
        self.path = path
        self.line = line          # 1-based line in the file; 0 when unknown
        self.column = column      # 1-based column of the offending token; 0 when not pointing inside a line
        self.subject = subject    # what is wrong: "rule 'R3' when", "inputs.amount", "policy.hit_policy"
        self.message = message
        self.severity = severity
        self.excerpt = excerpt    # the offending expression with a caret line under it, for people

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.subject}: {self.message}"

    def __repr__(self) -> str:
        return f"Diagnostic({self.severity}, {self})"


class PolicyError(InvalidArgument):
    """A policy file that cannot be used; ``diagnostics`` lists every error found (warnings too)."""

    def __init__(self, diagnostics: list[Diagnostic]):
        self.diagnostics = list(diagnostics)
        errors = [d for d in self.diagnostics if d.severity == ERROR]
        first = errors[0] if errors else self.diagnostics[0]
        more = len(errors) - 1
        # Every error, not just the first: an upload's caller sees only this message (the status details are
        # bounded, kernel.errors.clamp, so a file with hundreds of errors shows as many as fit).
        message = str(first) + (f" (and {more} more error{'s' if more > 1 else ''}: "
                                + "; ".join(str(d) for d in errors[1:]) + ")" if more > 0 else "")
        super().__init__(message)
        self.path, self.line, self.subject, self.reason = first.path, first.line, first.subject, first.message

    @property
    def errors(self) -> list[Diagnostic]:
        return [d for d in self.diagnostics if d.severity == ERROR]


class PolicyInputError(InvalidArgument):
    """A batch whose columns do not match the policy (missing column, wrong type); names the field."""

    def __init__(self, field: str, message: str):
        super().__init__(f"field {field!r}: {message}")
        self.field = field
