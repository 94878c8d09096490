"""pytest-benchmark microbenchmarks of a decision's field work (skipped by default; `make bench-micro`).

One benchmark round = read + encode + input hash of 200 claims requests (bench/prepare_micro.py's
workload and contenders); divide by 200 for the cost per request. ``python -m bench.prepare_micro``
runs the same contenders alternating A/B and prints the ratio.
"""

from __future__ import annotations

import pytest

from bench.prepare_micro import contenders, workload

REQUESTS = 200

_pipeline, _cases = workload(REQUESTS)
_works = contenders(_pipeline)


@pytest.mark.parametrize("name", [name for name in _works if name != "harness"])
def test_read_encode_hash_200_claims_requests(benchmark, name):
    work, cases = _works[name], _cases

    def one_round() -> None:
        for request, digests in cases:
            work(request, digests)

    benchmark.extra_info["requests_per_round"] = REQUESTS
    benchmark(one_round)
