"""The metrics endpoint: Prometheus' text format over HTTP on ``metrics_port``, ``/metrics`` (any path answers).

A registry of its own (not prometheus_client's global one, which a second kernel
in the same process — the tests — would share): the kernel's collector plus the
process' CPU, memory and open files (``process_*``) and the garbage collector's
counts (``python_gc_*``). The server runs on a thread of its own and answers each
scrape on a short-lived thread, so a slow scrape never holds a gRPC handler.

Each connection holds a thread and a descriptor of the kernel's process while it
is served, so both are bounded: a connection must send its request (and take
its answer) within ``SCRAPE_TIMEOUT_S``, and at most ``MAX_CONNECTIONS`` are
served at once; more are closed as they come. Without either, idle connections
each held a thread for good: 1,007 of them took a 1,024 open-file limit, and
gRPC could no longer accept a client.
"""

from __future__ import annotations

import logging
import socket
import sys
import threading
from wsgiref.simple_server import make_server

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer, _SilentHandler

from ..threads import name_native_thread
from .metrics import KernelCollector

log = logging.getLogger("aios.metrics")

SCRAPE_TIMEOUT_S = 10.0  # a connection's request must come, and its answer be taken, within this (Prometheus: 10 s)
MAX_CONNECTIONS = 8  # served at once: a scraper or two, each one scrape at a time; more are closed unanswered


class MetricsEndpoint:
    """Serving until ``close()``; ``port`` is the one bound (``metrics_port``, or the OS's pick for 0 in tests)."""

    def __init__(self, server, host: str, port: int):
        host = host.strip("[]")  # (an IPv6 address as gRPC takes it, "[::1]"; the socket wants it bare)
        registry = CollectorRegistry(auto_describe=False)
        self._collector = KernelCollector(server)
        registry.register(self._collector)
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
        try:
            self._httpd = make_server(host, port, make_wsgi_app(registry), _ServerFor(host),
                                      handler_class=_HandlerFor(SCRAPE_TIMEOUT_S))
        except OSError as exc:
            raise OSError(f"cannot serve metrics on {host}:{port} (metrics_port): {exc.strerror or exc}") from None
        self.port = self._httpd.server_port
        self._thread = threading.Thread(target=self._serve, name="aios-metrics", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        name_native_thread()
        self._httpd.serve_forever(poll_interval=0.5)

    def close(self) -> None:
        """Stop taking connections; one taken already is answered with the kernel-wide gauges only (the kernel's
        parts close next)."""
        self._collector.closed = True
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)


def _HandlerFor(timeout_s: float):
    """prometheus_client's quiet handler, with a time limit on each read and write of its connection."""

    class Handler(_SilentHandler):
        timeout = timeout_s  # (StreamRequestHandler sets it on the connection)

    return Handler


def _ServerFor(host: str):
    """ThreadingWSGIServer for an IPv6 ``host`` too (``address_family`` is a class attribute), serving at most
    ``MAX_CONNECTIONS`` connections at once."""

    class Server(ThreadingWSGIServer):
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        allow_reuse_address = True  # (a restart while the old socket is in TIME_WAIT must bind)

        def __init__(self, *args, **kwargs) -> None:
            self._places = threading.BoundedSemaphore(MAX_CONNECTIONS)
            super().__init__(*args, **kwargs)

        def process_request(self, request, client_address) -> None:
            if not self._places.acquire(blocking=False):
                self.shutdown_request(request)  # (closed unanswered: no thread, no descriptor kept)
                return
            try:
                super().process_request(request, client_address)  # (its thread gives the place back)
            except BaseException:
                self._places.release()
                raise

        def process_request_thread(self, request, client_address) -> None:
            # socketserver.ThreadingMixIn's, with the place given back before the connection is closed: given back
            # after, a scraper that saw one connection end and came at once found every place still taken (closed
            # unanswered; seen under load in tests/test_metrics_endpoint.py's idle-connections test).
            try:
                self.finish_request(request, client_address)
            except Exception:
                self.handle_error(request, client_address)
            finally:
                self._places.release()
                self.shutdown_request(request)

        def handle_error(self, request, client_address) -> None:
            # A client that went quiet past the timeout, or went away: nothing to report (socketserver printed a
            # traceback to stderr for each).
            if not isinstance(sys.exc_info()[1], (TimeoutError, ConnectionError)):
                log.warning("metrics: answering %s failed", client_address[0], exc_info=True)

    return Server
