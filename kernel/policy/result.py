"""What evaluating a policy on a batch returns: one entry per row, as arrays."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


class PolicyResult:
    """Per-row outcome of a policy over a batch of ``n`` rows.

    ``action``    object array of action names (the default rule's action when no rule matches)
    ``fired``     list of tuples of rule ids, in hit-policy output order; the default rule's id
                  when no other rule matched (built on first access: the compiled evaluator keeps
                  rule indices until someone asks)
    ``escalate``  bool array: the case goes to a human
    ``adjust``    float64 array: sum of the score adjustments of the fired rules
    ``error``     object array: None, or why the row has no well-defined outcome (a UNIQUE
                  policy where several rules match); such a row gets the default action,
                  ``escalate`` True, adjust 0, and ``fired`` lists every matching rule
    """

    __slots__ = ("action", "escalate", "adjust", "error", "_fired", "_make_fired")

    def __init__(self, action: np.ndarray, escalate: np.ndarray, adjust: np.ndarray, error: np.ndarray,
                 fired: list | None = None, make_fired: Callable[[], list] | None = None):
        self.action = action
        self.escalate = escalate
        self.adjust = adjust
        self.error = error
        self._fired = fired
        self._make_fired = make_fired

    @property
    def fired(self) -> list[tuple[str, ...]]:
        if self._fired is None:
            self._fired = self._make_fired()
            self._make_fired = None
        return self._fired

    def __len__(self) -> int:
        return len(self.action)

    def row(self, i: int) -> dict:
        """Row ``i`` as plain Python values (for tests, the CLI and logs)."""
        return {
            "action": str(self.action[i]),
            "fired": list(self.fired[i]),
            "escalate": bool(self.escalate[i]),
            "adjust": float(self.adjust[i]),
            "error": self.error[i],
        }

    def rows(self) -> list[dict]:
        return [self.row(i) for i in range(len(self))]
