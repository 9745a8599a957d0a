"""A seeded subset of a split (to be shared with the training layer)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any


def fixed_subset(split: Sequence, n: int, seed: int = 0) -> Any:
    """``n`` examples of ``split`` drawn without replacement with ``seed`` (all when fewer)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if n >= len(split):
        return split
    idx = sorted(random.Random(seed).sample(range(len(split)), n))
    if hasattr(split, "subset"):
        return split.subset(idx)
    return [split[i] for i in idx]
