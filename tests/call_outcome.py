"""How a gRPC call future ended, as the in-flight fuzz tests check it: its answer or none, its code, its details."""

from __future__ import annotations

import grpc


def outcome(future, timeout_s: float) -> tuple[object | None, grpc.StatusCode, str]:
    """``(answer, OK, "")``, or ``(None, code, details)``: CANCELLED for a future the test cancelled itself."""
    try:
        return future.result(timeout=timeout_s), grpc.StatusCode.OK, ""
    except grpc.FutureCancelledError:
        return None, grpc.StatusCode.CANCELLED, ""
    except grpc.RpcError as exc:
        return None, exc.code(), exc.details() or ""
