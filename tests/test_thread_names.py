"""The kernel's threads carry their names into the OS, and bench/thread_cpu.py groups CPU by them."""

from __future__ import annotations

import os
import sys
import threading

import pytest

from bench.thread_cpu import _group, _threads
from kernel.pipelines.finisher import BatchFinisher
from kernel.threads import name_native_thread

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="thread names via prctl are Linux's")


def test_a_thread_names_itself_and_the_benchmark_groups_it():
    named = threading.Event()
    done = threading.Event()

    def body():
        name_native_thread()
        named.set()
        done.wait(10)

    worker = threading.Thread(target=body, name="aios-grpc_12")
    worker.start()
    try:
        assert named.wait(10)
        names = {name for name, *_ in _threads(os.getpid()).values()}
        assert "aios-grpc_12" in names
        assert _group("aios-grpc_12") == "aios-grpc" and _group("aios-lane-cpu-0") == "aios-lane-cpu"
    finally:
        done.set()
        worker.join(10)


def test_the_decision_finisher_is_named_in_the_os():
    finisher = BatchFinisher(lambda group: [], name="aios-decide")
    try:
        for _ in range(1000):  # the thread names itself as it starts
            if "aios-decide" in {name for name, *_ in _threads(os.getpid()).values()}:
                break
            threading.Event().wait(0.005)
        else:
            raise AssertionError("no thread named aios-decide")
    finally:
        finisher.close()
