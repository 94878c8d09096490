"""Per-request outcome codes (small ints in the per-request arrays) and the mapping of a gRPC error onto
them, telling the client's own DEADLINE_EXCEEDED from the kernel's; counts every non-OK message."""

from __future__ import annotations

import re

import grpc
import grpc.aio
import numpy as np

CLIENT_DEADLINE_DETAILS = "Deadline Exceeded"  # what the client's own gRPC says when its deadline passes

# status codes as small ints in the per-request arrays
OK, REFUSED, EXPIRED, CLIENT_DEADLINE, CANCELLED, UNAVAILABLE, INTERNAL, OTHER, PENDING = range(9)
CODE_NAMES = ["OK", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED(kernel)", "DEADLINE_EXCEEDED(client)", "CANCELLED",
              "UNAVAILABLE", "INTERNAL", "OTHER", "NO_ANSWER"]
_GRPC_TO_CODE = {grpc.StatusCode.RESOURCE_EXHAUSTED: REFUSED, grpc.StatusCode.CANCELLED: CANCELLED,
                 grpc.StatusCode.UNAVAILABLE: UNAVAILABLE, grpc.StatusCode.INTERNAL: INTERNAL}

ERROR_DETAILS: dict = {}  # (status, details with numbers masked) -> count: what the non-OK answers said


def classify_error(exc: grpc.aio.AioRpcError) -> tuple[int, float]:
    code = exc.code()
    key = (code.name, re.sub(r"[0-9a-f]{16}|\d+(\.\d+)?", "N", exc.details() or "")[:160])
    if key not in ERROR_DETAILS and len(ERROR_DETAILS) >= 40:
        key = (code.name, "(other details)")
    ERROR_DETAILS[key] = ERROR_DETAILS.get(key, 0) + 1
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return (CLIENT_DEADLINE if (exc.details() or "") == CLIENT_DEADLINE_DETAILS else EXPIRED), np.nan
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        retry = np.nan
        for key, value in exc.trailing_metadata() or ():
            if key == "retry-after-ms":
                try:
                    retry = float(value)
                except ValueError:
                    pass
        return REFUSED, retry
    return _GRPC_TO_CODE.get(code, OTHER), np.nan
