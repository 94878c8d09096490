"""How many examples each hypothesis test draws: the number written at the test, times ``AIOS_FUZZ_SCALE``.

One knob for every property and fuzz test, so a longer bug hunt is one
variable (``make fuzz`` runs them at 10×) and ``make test``'s second pass,
which runs the suites again on the pure-Python references, can draw fewer
(the first pass already drew the full count against the same properties, and
the differential tests compare the two implementations directly). CI's
10 minutes on a slow 2-core host are the reason the default is not higher.
"""

from __future__ import annotations

import os

SCALE = float(os.environ.get("AIOS_FUZZ_SCALE", "1"))


def examples(count: int) -> int:
    """``count`` scaled by ``AIOS_FUZZ_SCALE``, at least 10 (fewer finds little and shrinks nothing)."""
    return max(10, round(count * SCALE))
