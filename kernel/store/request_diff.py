"""Which parts of a request differ from the one stored under its idempotency key: what the refusal names.

"Another request under the key" said only that, and a workflow engine whose retry had changed a field had to
fetch the stored request and compare the two itself. Parts are compared as ``request_hash`` reads them (call
details left out, 800 and 800.0 the same), and named as the caller sent them, never with their values (a text
field may hold a customer's words).
"""

from __future__ import annotations

from .._proto.aios.kernel.v1 import kernel_pb2 as kpb
from ..errors import quote
from .idempotency import canonical_request

MAX_NAMED = 5  # parts named in a refusal; more are counted


def differing_parts(stored: kpb.DecisionRequest, request: kpb.DecisionRequest) -> list[str]:
    """The parts of ``request`` that differ from ``stored`` (``request.pipeline``, ``request.fields['x']``, ...),
    in the order of the message; empty when they read the same (a key stored under an older kernel's hash)."""
    was, now = canonical_request(stored), canonical_request(request)
    parts = ["request.pipeline"] if was.pipeline != now.pipeline else []
    for name in ("fields", "text_fields"):
        before, after = getattr(was, name), getattr(now, name)
        parts += [f"request.{name}[{quote(key)}]" for key in sorted(set(before) | set(after))
                  if key not in before or key not in after or before[key] != after[key]]
    return parts


def describe(parts: list[str]) -> str:
    """`` (it differs in ...)`` for a refusal's message, or "" when nothing is named."""
    if not parts:
        return ""
    more = f" and {len(parts) - MAX_NAMED} more" if len(parts) > MAX_NAMED else ""
    return f" (it differs in {', '.join(parts[:MAX_NAMED])}{more})"
