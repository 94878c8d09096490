"""pytest-benchmark microbenchmarks of the scheduler's decision cost (skipped by default; `make bench-micro`).

One benchmark round = 8 submits + one batch decision, its start and completion with 1,000
items queued; divide by 8 for the cost per request. The items come from the
same pool as in ``python -m bench.scheduler_micro --rounds 3000``, which runs
this workload A/B and prints the ratio.
"""

from __future__ import annotations

import pytest

from bench.scheduler_micro import prepare
from kernel.scheduling import implementations

POOL_ROUNDS = 3000  # rounds' worth of pre-built items, reused cyclically (as the CLI's --rounds 3000)


@pytest.mark.parametrize("cls", implementations(), ids=lambda cls: cls.name)
def test_round_with_1000_queued(benchmark, cls):
    sched, one_round = prepare(cls, 1000, POOL_ROUNDS)
    benchmark.extra_info["requests_per_round"] = 8
    benchmark(one_round)
    assert sched.load(next(iter(sched.stats()["models"])))[0] >= 1000
