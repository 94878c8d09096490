"""A real kernel killed (SIGKILL) at random instants under a mixed load, restarted on its data dir each time: nothing
answered is lost, no key is decided twice, every escalation keeps its review, every resolution is recorded once and
linked, every task ends, and the log verifies strictly (tests/kill_cycles.py). ``make fuzz`` runs ten times the cycles.

A failure names its seed; the same seed draws the same kill delays and load (where the kill lands still depends on
the host's timing). The fsync run uses the kernel whose durable steps pause (tests/_slow_steps_kernel.py), so kills
land between steps more often, and kills some kernels in their SIGTERM drain."""

from __future__ import annotations

import pytest

import kill_cycles
from claims_support import build_small_model, copy_pipelines
from fuzz_budget import SCALE


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return build_small_model(tmp_path_factory.mktemp("claims_models"))


@pytest.mark.parametrize("seed, audit_mode, slow_steps", [(1, "fsync", True), (2, "async", False)])
def test_random_kills_lose_nothing_answered(models, tmp_path, seed, audit_mode, slow_steps):
    kill_cycles.run(models, copy_pipelines(tmp_path / "pipelines"), tmp_path / "data", seed,
                    cycles=max(2, round(3 * SCALE)), audit_mode=audit_mode, max_delay_s=1.0,
                    kill_in_drain=slow_steps, slow_steps=slow_steps)
