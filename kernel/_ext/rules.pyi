from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

OPCODES: dict[str, int]
FLAGS: dict[str, int]

class Kernel:
    n_numeric: int
    n_coded: int
    def __init__(self, instructions: Sequence[tuple[int, int, int, int, float]], luts: np.ndarray,
                 rule_registers: Sequence[int], order: Sequence[int], n_numeric: int = ..., n_coded: int = ...) -> None: ...
    def run(self, numeric: list[np.ndarray], coded: list[np.ndarray], n: int,
            want_masks: bool) -> tuple[np.ndarray, np.ndarray | None]: ...

def encode_rows(rows: list[dict[str, Any]], specs: tuple[tuple[str, int, dict[Any, int] | None], ...],
                fallback: Callable[[int, Any], float | int]) -> tuple[list[np.ndarray], list[np.ndarray]]: ...
