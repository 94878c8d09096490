"""Which of gRPC core's two I/O paths a kernel process uses, chosen before grpc is imported.

grpcio 1.85 reads and writes sockets on its EventEngine's own threads by
default, and wakes the Python thread polling the completion queue for each
event: on the threaded front end every message crosses one more thread than
with the older iomgr path, where the polling thread does the socket work
itself. With iomgr (two of grpc's experiments turned off through
``GRPC_EXPERIMENTS``) the threaded front end served a lone tiny-model call
1.08-1.18x faster with ~35 µs less server CPU, and 1.09-1.13x at 16 and 64 in
flight; but all socket work then waits for that one thread, which under load
waits for the GIL: a priority-1 call next to a saturating neighbour had a
1.4-1.8x higher p99, and more answers with Triton's ``timeout`` arrived late.
So it is off by default (``grpc_iomgr = true`` for throughput-bound serving
without urgent traffic; bench/RESULTS.md, "gRPC's iomgr path"). grpc calls
these switches experiments; a grpcio that drops them ignores the variable,
and the kernel then runs on the EventEngine as before. Only the serve command chooses (grpc
reads the variable once, when it starts), only for the threaded front end,
and never over a ``GRPC_EXPERIMENTS`` the operator set.
"""

from __future__ import annotations

import os
import sys

ENV = "GRPC_EXPERIMENTS"
IOMGR = "-event_engine_listener,-event_engine_for_all_other_endpoints"

_chosen: str | None = None


def choose(front_end: str, iomgr: bool) -> str:
    """Set grpc's I/O path for this process (call before anything imports grpc); returns ``describe()``."""
    global _chosen
    if os.environ.get(ENV):
        _chosen = None  # the operator's choice: described from the variable
    elif not iomgr:
        _chosen = "event engine"
    elif front_end == "aio":  # ("auto" stays on the threaded front end when iomgr is asked)
        # (said on the start line: grpc_iomgr = true beside front_end = "aio" was dropped without a word)
        _chosen = "event engine (grpc_iomgr applies to the threaded front end only, not front_end = \"aio\")"
    elif "grpc" in sys.modules:
        _chosen = "event engine (grpc was imported before the kernel could choose iomgr)"
    else:
        os.environ[ENV] = IOMGR
        _chosen = "iomgr"
    return describe()


def describe() -> str:
    """The I/O path for the start line."""
    if _chosen is not None:
        return _chosen
    value = os.environ.get(ENV)
    return f"{ENV}={value} from the environment" if value else "event engine"
