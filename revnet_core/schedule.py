"""The learning-rate schedule of every trainer: linear warmup, then cosine decay to a floor."""

from __future__ import annotations

import math
from typing import Callable


def warmup_steps(steps: int, warmup: int | None = None) -> int:
    """``warmup`` when given, else a tenth of the run's ``steps``, at most 100 (``--warmup``'s default)."""
    return min(100, steps // 10) if warmup is None else warmup


def cosine_schedule(warmup: int, total: int, min_ratio: float) -> Callable[[int], float]:
    """LR multiplier for the optimizer step about to run (0-based): linear warmup, then cosine to min_ratio."""

    def factor(i: int) -> float:
        if i < warmup:
            return (i + 1) / warmup
        progress = min(1.0, (i - warmup) / max(1, total - warmup))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor
