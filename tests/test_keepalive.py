"""A watch whose client vanished without closing its connection ends, and frees its place (``keepalive_s``).

A watch (WatchReviews, WatchTask, StreamAudit with follow) sends nothing while nothing happens, so a client gone
without a FIN (a laptop asleep behind a NAT that forgot it) never made a write fail: the watch held its place of
``max_watches``, and on the threaded front end a handler thread, for good, and once ``max_watches`` such
watches were held every new watch was refused. The kernel pings a silent connection every ``keepalive_s`` and
drops one that does not answer. Here the vanished client is a fault injected on purpose: a proxy between client
and kernel that goes silent, reading and writing nothing, with both its connections left open.
"""

from __future__ import annotations

import socket
import threading
import time

import grpc
import pytest

from conftest import start_kernel
from kernel._proto.aios.kernel.v1 import kernel_pb2 as kpb
from kernel._proto.aios.kernel.v1 import kernel_pb2_grpc as kgrpc
from kernel.config import SettingsError, load_settings

TIMEOUT_S = 20


class SilentPeerProxy:
    """Relays one port to another until ``silence()``; then relays nothing and closes nothing (injected fault)."""

    def __init__(self, target_port: int):
        self._target = target_port
        self._silent = threading.Event()
        self._sockets: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            kernel = socket.create_connection(("127.0.0.1", self._target))
            self._sockets += [client, kernel]
            for source, sink in ((client, kernel), (kernel, client)):
                threading.Thread(target=self._relay, args=(source, sink), daemon=True).start()

    def _relay(self, source: socket.socket, sink: socket.socket) -> None:
        source.settimeout(0.05)
        while not self._silent.is_set():
            try:
                data = source.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            if not data or self._silent.is_set():
                return  # (silent: what came is dropped, and nothing is closed)
            sink.sendall(data)

    def silence(self) -> None:
        self._silent.set()

    def close(self) -> None:
        self._listener.close()
        for sock in self._sockets:
            sock.close()


def watch_admitted(channel) -> bool:
    """Whether the kernel takes one more watch now (a WatchReviews, which then waits until its short deadline)."""
    try:
        list(kgrpc.ReviewServiceStub(channel).WatchReviews(kpb.WatchReviewsRequest(tenant="keepalive"), timeout=0.3))
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return False
        assert exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED, (exc.code(), exc.details())
    return True


@pytest.mark.parametrize("front_end", ["sync", "aio"])
def test_a_watch_whose_client_vanished_frees_its_place(model_repo, front_end):
    server = start_kernel(model_repo, front_end, workers=8, max_watches=1, keepalive_s=1, audit_stream_enabled=True)
    proxy = SilentPeerProxy(server.port)
    vanishing = grpc.insecure_channel(f"127.0.0.1:{proxy.port}")
    direct = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        follow = kgrpc.AuditServiceStub(vanishing).StreamAudit(kpb.StreamAuditRequest(follow=True), timeout=120)
        next(follow)  # the log's first record: the follow holds the one place of max_watches
        assert not watch_admitted(direct)
        proxy.silence()
        follow.cancel()  # (the client's RST_STREAM goes nowhere: to the kernel the client just went quiet)
        vanishing.close()
        deadline = time.monotonic() + TIMEOUT_S
        while not watch_admitted(direct):
            assert time.monotonic() < deadline, "the vanished client's watch still holds its place"
    finally:
        direct.close()
        proxy.close()
        server.stop(grace=1)


@pytest.mark.parametrize("value", [0, 0.5, 86_401])
def test_keepalive_s_out_of_range_is_refused_naming_it(value):
    with pytest.raises(SettingsError, match="keepalive_s"):
        load_settings(None, {"keepalive_s": value}, environ={})
