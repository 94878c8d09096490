"""bench.decide_bench's summary: ratios per calls-in-flight level and each side's peak against the other's."""

from __future__ import annotations

import pytest

from bench.decide_bench import summarise


def _run(config: str, round_no: int, throughput: float) -> dict:
    return {"config": config, "round": round_no, "throughput": throughput, "p50_ms": 1.0, "p99_ms": 2.0,
            "server_cpu_us_per_call": 100.0}


def test_a_sweep_reports_each_level_and_the_peaks_against_each_other():
    # ModelInfer peaks at 64, Decide at 128: the peak ratio compares those two, per round too.
    rates = {("infer", 16): (100, 110), ("infer", 64): (200, 190), ("infer", 128): (150, 160),
             ("decide", 16): (50, 60), ("decide", 64): (120, 100), ("decide", 128): (170, 150)}
    runs = [_run(f"{name} c{level}", r, rate[r]) for (name, level), rate in rates.items() for r in (0, 1)]
    configs = [f"{name} c{level}" for level in (16, 64, 128) for name in ("infer", "decide")]
    ratios = summarise(runs, configs)["ratios"]
    assert ratios["decide c64/infer c64"]["median_of_medians"] == pytest.approx(110 / 195)
    peak = ratios["decide/infer peak"]
    assert peak["levels"] == "c128 vs c64"
    assert peak["median_of_medians"] == pytest.approx(160 / 195)
    assert (peak["min"], peak["max"]) == (pytest.approx(150 / 190), pytest.approx(170 / 200))


def test_one_level_keeps_the_plain_names_and_no_peak():
    runs = [_run("infer", 0, 200.0), _run("decide", 0, 150.0)]
    ratios = summarise(runs, ["infer", "decide"])["ratios"]
    assert set(ratios) == {"decide/infer"} and ratios["decide/infer"]["median_of_medians"] == pytest.approx(0.75)
