"""Triton's perf_analyzer drives the kernel unchanged (it needs ServerMetadata, ModelMetadata,
ModelConfig and ModelStatistics to start). Skipped, with the reason, only where the binary
cannot start on this machine; bench/perf_analyzer.py says how it is made to run.
"""

from __future__ import annotations

import pytest

from bench.perf_analyzer import PerfAnalyzerUnavailable, ensure_perf_analyzer, run_perf_analyzer
from conftest import start_kernel


@pytest.fixture(scope="module")
def perf_analyzer():
    try:
        return ensure_perf_analyzer()
    except PerfAnalyzerUnavailable as exc:
        pytest.skip(f"perf_analyzer cannot start here: {exc}")


@pytest.mark.parametrize("front_end", ["sync", "aio"])
def test_perf_analyzer_drives_the_kernel(perf_analyzer, model_repo, front_end):
    server = start_kernel(model_repo, front_end)
    try:
        stats_before = server.hub.get("tiny", "1").stats.inference_count
        result = run_perf_analyzer(
            f"127.0.0.1:{server.port}", "tiny", concurrency=4, measurement_ms=500,
            extra_args=["-x", "1", "-b", "2"], quiet=True,
        )
        served = server.hub.get("tiny", "1").stats.inference_count - stats_before
    finally:
        server.stop(grace=1)
    assert result["throughput"] > 0
    assert result["p99_us"] >= result["p50_us"] > 0
    # perf_analyzer's requests really reached the model (2 rows each, warm-up included).
    assert served >= 2 * result["request_count"] > 0
