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


def test_a_free_port_and_any_port_pass():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        free = sock.getsockname()[1]  # bound, not listening: the probe's own bind with SO_REUSEADDR still fails
    probe_listen_address("127.0.0.1", free)  # closed now: free
    probe_listen_address("127.0.0.1", 0)


@pytest.mark.parametrize("host,fragment", [
    ("no-such-host.invalid", "'no-such-host.invalid' does not resolve here"),
    ("192.0.2.1", "192.0.2.1 is not an address of this machine"),  # TEST-NET-1: nobody's
])
def test_a_host_the_kernel_cannot_listen_on_is_refused_in_words_before_anything_loads(host, fragment, model_repo,
                                                                                        tmp_path):
    """(Operator audit) they failed after every model had loaded, in gRPC's words ("add_port.cc"), and left
    start and deploy records in the audit log of a kernel that never served; port 0 was not checked at all."""
    for port in (8001, 0):
        with pytest.raises(OSError, match=f"cannot listen on {host}:{port}: {fragment}"):
            probe_listen_address(host, port)
    settings = dict(models=str(model_repo), data_dir=str(tmp_path / "data"), log_level="WARNING", host=host, port=0)
    with pytest.raises(OSError, match=fragment):
        KernelServer(load_settings(None, settings, environ={}))
    assert not (tmp_path / "data").exists()  # no data dir, no signing key, no audit log


def test_a_kernel_made_for_a_busy_port_fails_before_it_makes_anything(listener, model_repo, tmp_path):
    settings = dict(models=str(model_repo), data_dir=str(tmp_path / "data"), log_level="WARNING", port=listener)
    with pytest.raises(OSError, match="something already listens there"):
        KernelServer(load_settings(None, settings, environ={}))
    assert not (tmp_path / "data").exists()  # no data dir, no signing key, no audit log


def test_a_port_taken_before_start_fails_the_start_and_lets_go(model_repo, tmp_path):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings = dict(models=str(model_repo), data_dir=str(tmp_path / "data"), log_level="WARNING", port=port)
    refused = KernelServer(load_settings(None, settings, environ={}))  # free when the kernel is made...
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taker:  # ...taken before it starts
        taker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taker.bind(("127.0.0.1", port))
        taker.listen()
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


def test_a_low_open_file_limit_is_named_at_start():
    from kernel.server import low_descriptor_limit

    warning = low_descriptor_limit(512, soft=256)
    assert warning.startswith("open-file limit (RLIMIT_NOFILE) is 256: with workers = 512 the kernel may need about 1280")
    assert low_descriptor_limit(512, soft=1_048_576) == "" and low_descriptor_limit(512, soft=-1) == ""
