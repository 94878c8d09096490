"""The metrics endpoint: Prometheus' text format over HTTP on ``metrics_port``, ``/metrics`` (any path answers).

A registry of its own (not prometheus_client's global one, which a second kernel
in the same process — the tests — would share): the kernel's collector plus the
process' CPU, memory and open files (``process_*``) and the garbage collector's
counts (``python_gc_*``). The server runs on a thread of its own and answers each
scrape on a short-lived thread, so a slow scrape never holds a gRPC handler.
"""

from __future__ import annotations

import logging
import threading
from wsgiref.simple_server import make_server

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer, _SilentHandler

from ..threads import name_native_thread
from .metrics import KernelCollector

log = logging.getLogger("aios.metrics")


class MetricsEndpoint:
    """Serving until ``close()``; ``port`` is the one bound (``metrics_port``, or the OS's pick for 0 in tests)."""

    def __init__(self, server, host: str, port: int):
        registry = CollectorRegistry(auto_describe=False)
        registry.register(KernelCollector(server))
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
        try:
            self._httpd = make_server(host, port, make_wsgi_app(registry), _ServerFor(host),
                                      handler_class=_SilentHandler)
        except OSError as exc:
            raise OSError(f"cannot serve metrics on {host}:{port} (metrics_port): {exc.strerror or exc}") from None
        self.port = self._httpd.server_port
        self._thread = threading.Thread(target=self._serve, name="aios-metrics", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        name_native_thread()
        self._httpd.serve_forever(poll_interval=0.5)

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)


def _ServerFor(host: str):
    """ThreadingWSGIServer for an IPv6 ``host`` too (``address_family`` is a class attribute)."""
    import socket

    class Server(ThreadingWSGIServer):
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        allow_reuse_address = True  # (a restart while the old socket is in TIME_WAIT must bind)

    return Server
