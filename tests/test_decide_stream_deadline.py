"""A DecideStream request waiting in its model's queue is answered DEADLINE_EXCEEDED at its deadline, on both
front ends, as a unary Decide is. The asyncio front end's stream path (kernel/pipelines/stream.py) had no
deadline timer: the lane noticed the deadline only at its next look at the queue (stream audit, 2026-11-27)."""

from __future__ import annotations

import re
import time

import grpc
import pytest

from claims_support import build_small_model, claim_request, copy_pipelines
from conftest import start_kernel
from examples.claims import data
from kernel._proto.aios.kernel.v1 import kernel_pb2_grpc as kgrpc

WINDOW_US = 3_000_000  # the claims model's static window here: a lone request waits this long for company


@pytest.fixture(scope="module", params=["sync", "aio"])
def kernel(request, tmp_path_factory):
    models = build_small_model(tmp_path_factory.mktemp("models"), provider="cpu")
    toml = models / "claims_triage" / "1" / "model.toml"
    text = toml.read_text(encoding="utf-8")
    assert "max_batch_size = 64\n" in text, "the claims model.toml no longer has the line this extends"
    toml.write_text(text.replace("max_batch_size = 64\n", f"max_batch_size = 64\nmax_queue_delay_us = {WINDOW_US}\n"
                                                          "preferred_batch_sizes = [64]\n"), encoding="utf-8")
    pipelines = copy_pipelines(tmp_path_factory.mktemp("pipelines"))
    server = start_kernel(models, request.param, pipelines=str(pipelines), pipeline_poll_s=0,
                          data_dir=str(tmp_path_factory.mktemp("data")))
    yield server
    server.stop(grace=2)


def test_a_streamed_decision_held_by_a_static_window_is_answered_at_its_deadline(kernel):
    executed = kernel.hub.get("claims_triage").stats.execution_count
    request = claim_request(data.generate_cases(1, seed=9)[0], request_id="hurried", timeout_ms=100)
    with grpc.insecure_channel(f"127.0.0.1:{kernel.port}") as channel:
        started = time.monotonic()
        (answer,) = list(kgrpc.DecisionServiceStub(channel).DecideStream(iter([request]), timeout=60))
        took = time.monotonic() - started
    assert answer.request_id == "hurried" and answer.error_code == "DEADLINE_EXCEEDED", answer
    # The kernel's own count of its wait (the client's clock adds the call's set-up on a busy CI machine):
    # at the 100 ms deadline, not at a later look at the queue (920 ms in one run before the fix).
    waited_ms = float(re.search(r"after ([0-9.]+) ms in the queue", answer.error_message).group(1))
    assert waited_ms < 400, answer.error_message
    assert took < WINDOW_US / 1e6 / 2, f"answered after {took:.3f} s"
    assert kernel.hub.get("claims_triage").stats.execution_count == executed  # it never ran
