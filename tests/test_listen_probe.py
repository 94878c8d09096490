"""``probe_listen_address``: a port another socket listens on is refused before the kernel loads anything."""

from __future__ import annotations

import socket

import pytest

from conftest import start_kernel
from kernel.config import load_settings
from kernel.server import KernelServer, probe_listen_address


@pytest.fixture
def listener():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_a_port_someone_listens_on_is_refused(listener):
    with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{listener}: something already listens there"):
        probe_listen_address("127.0.0.1", listener)
    with pytest.raises(OSError, match="something already listens there"):  # the wildcard covers it too
        probe_listen_address("0.0.0.0", listener)


def test_a_free_port_any_port_and_names_left_to_grpc_pass():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        free = sock.getsockname()[1]  # bound, not listening: the probe's own bind with SO_REUSEADDR still fails
    probe_listen_address("127.0.0.1", free)  # closed now: free
    probe_listen_address("127.0.0.1", 0)
    probe_listen_address("no-such-host.invalid", 8001)  # gRPC's bind reports what is wrong with the name


def test_a_kernel_started_on_a_busy_port_fails_before_loading_models_and_lets_go(listener, model_repo, tmp_path):
    settings = dict(models=str(model_repo), data_dir=str(tmp_path / "data"), log_level="WARNING")
    refused = KernelServer(load_settings(None, {**settings, "port": listener}, environ={}))
    with pytest.raises(OSError, match="something already listens there"):
        refused.start()
    assert refused.hub.loaded() == []  # nothing loaded, so nothing recorded as deployed
    assert refused.decisions.audit.closed  # and the audit log let go of its directory
    # The same data directory serves again in this process (its lock is free).
    again = start_kernel(model_repo, data_dir=settings["data_dir"])
    try:
        assert again.hub.loaded()
    finally:
        again.stop(grace=1)
