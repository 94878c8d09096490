"""A model failing on every request is logged within a budget, not a line per request.

A real kernel and tritonclient; the log is read with caplog. The poison model (``lookup``) refuses an index
outside its table, the way a real model fails on an input it cannot take.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import tritonclient.grpc as tc
from conftest import start_kernel

from kernel.testing import onnx_models


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("failing-models")
    onnx_models.save(onnx_models.lookup(), root / "lookup" / "1" / "model.onnx")
    onnx_models.save(onnx_models.lookup(), root / "other" / "1" / "model.onnx")
    return root


def _poison() -> tc.InferInput:
    x = tc.InferInput("x", [1, 1], "FP32")
    x.set_data_from_numpy(np.array([[100.0]], np.float32))
    return x


def test_a_model_failing_on_every_request_logs_a_few_lines_and_counts_the_rest(repo, caplog):
    server = start_kernel(repo)
    try:
        client = tc.InferenceServerClient(f"127.0.0.1:{server.port}")
        caplog.set_level(logging.WARNING, logger="aios")
        for _ in range(40):
            with pytest.raises(tc.InferenceServerException) as refused:
                client.infer("lookup", [_poison()])
            assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"  # every caller still gets its answer
        with pytest.raises(tc.InferenceServerException):
            client.infer("other", [_poison()])  # another model has a budget of its own
    finally:
        server.stop(grace=0)
    lines = [r.getMessage() for r in caplog.records if "model lookup/1 refused" in r.getMessage()]
    assert 1 <= len(lines) <= 10  # (the budget: 10 lines a 10-second window; 40 calls take far less)
    assert any("model other/1 refused" in r.getMessage() for r in caplog.records)


def test_the_line_after_a_full_budget_says_how_many_were_not_logged():
    from kernel.observability.log_budget import LogBudget, not_logged

    now = [10**12]
    budget = LogBudget(lines=2, every_s=10, clock=lambda: now[0])
    assert [budget.take(), budget.take(), budget.take(), budget.take()] == [0, 0, None, None]
    now[0] += 10 * 10**9  # the window ends
    skipped = budget.take()
    assert skipped == 2 and "2 more like it not logged" in not_logged(skipped)


def test_a_model_returning_nan_for_every_decision_logs_within_the_budget(claims_models, tmp_path, caplog):
    """A NaN-producing model behind a pipeline: every Decide takes the fallback, and the log gets a few lines."""
    import shutil

    from claims_support import UNSURE_CASE, faulty_claims_model
    from conftest import start_claims_kernel

    from kernel._proto.aios.kernel.v1 import kernel_pb2 as kpb
    from kernel.decision_client import DecisionClient

    models = tmp_path / "models"
    shutil.copytree(claims_models, models)
    good = models / "claims_triage" / "1"
    faulty_claims_model(good, models / "claims_triage" / "2", "nan")  # the newest version: the pipeline's
    server = start_claims_kernel(models, tmp_path)
    try:
        caplog.set_level(logging.WARNING, logger="aios")
        case = dict(UNSURE_CASE, claim_amount=9_000_000.0)  # standardized far above 1: the NaN branch
        with DecisionClient(f"127.0.0.1:{server.port}") as client:
            outcomes = [client.decide("claims_triage", case).outcome for _ in range(30)]
        assert outcomes == [kpb.FALLBACK] * 30  # every caller still gets the pipeline's fallback
    finally:
        server.stop(grace=0)
    lines = [r for r in caplog.records if "returned non-finite scores" in r.getMessage()]
    assert 1 <= len(lines) <= 10
