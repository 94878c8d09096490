"""Arrival schedules (send offsets in seconds from a run's start): Poisson, and Poisson with bursts."""

from __future__ import annotations

import numpy as np


def poisson(rng: np.random.Generator, rate: float, start: float, end: float) -> np.ndarray:
    """Arrival times of a Poisson process of ``rate``/s on [start, end)."""
    if rate <= 0 or end <= start:
        return np.empty(0)
    n = rng.poisson(rate * (end - start))
    return np.sort(rng.uniform(start, end, n))


def bursty_trace(seed: int, base_rps: float, factor: float, burst_s: float, gap_s: float, warmup_s: float,
                 window_s: float) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """Poisson at ``base_rps`` over warm-up + window, plus bursts (window only) in which the rate is
    ``factor`` × base: burst starts are ``burst_s`` + Exp(``gap_s``) apart. Returns (times, bursts)."""
    rng = np.random.default_rng(seed)
    end = warmup_s + window_s
    bursts = []
    t = warmup_s + rng.exponential(gap_s)
    while t + burst_s <= end:
        bursts.append((t, t + burst_s))
        t += burst_s + rng.exponential(gap_s)
    parts = [poisson(rng, base_rps, 0.0, end)]
    parts += [poisson(rng, (factor - 1) * base_rps, a, b) for a, b in bursts]
    return np.sort(np.concatenate(parts)), bursts
