"""How sure a ratio measured over a few rounds is: a bootstrap interval for the median of per-round ratios.

A claim such as "the kernel ≥ 1.0× the naive server" rests on a handful of
alternating rounds on a noisy shared machine; the median and the min–max of
the per-round ratios say where it sits and how far single rounds stray, but
not whether the median itself could as well be below the line. Resampling
the rounds (with replacement) and taking the median each time gives that
interval without assuming a distribution. With few rounds it is wide, as it
should be: 4 rounds cannot bound a median tightly.
"""

from __future__ import annotations

import numpy as np

__all__ = ["median_interval"]


def median_interval(values, confidence: float = 0.95, resamples: int = 10_000, seed: int = 1) -> tuple[float, float] | None:
    """The ``confidence`` percentile bootstrap interval of the median of ``values`` (None for fewer than 3:
    an interval from two rounds means nothing). Deterministic for a given ``seed``."""
    data = np.asarray([v for v in values if v is not None], dtype=float)
    if len(data) < 3:
        return None
    rng = np.random.default_rng(seed)
    medians = np.median(data[rng.integers(0, len(data), size=(resamples, len(data)))], axis=1)
    tail = (1.0 - confidence) / 2 * 100
    low, high = np.percentile(medians, [tail, 100 - tail])
    return float(low), float(high)
