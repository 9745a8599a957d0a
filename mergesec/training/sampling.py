"""A fixed, seeded subset of a split (validation subsets, Gram samples, an attacker's examples)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any


def fixed_subset(split: Sequence, n: int | None, seed: int = 0, *, in_order: bool = True) -> Any:
    """``n`` examples of ``split`` drawn without replacement with ``seed``; all when ``n`` is None
    or not smaller than the split.

    The draw is ``random.Random(seed).sample(range(len(split)), n)``. ``in_order`` keeps the drawn
    examples in split order; otherwise they come in the order drawn. A split with a ``subset(idx)``
    method (image sets) returns that; any other split returns a list.
    """
    if n is not None and n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if n is None or n >= len(split):
        return split if hasattr(split, "subset") else list(split)
    idx = random.Random(seed).sample(range(len(split)), n)
    if in_order:
        idx.sort()
    if hasattr(split, "subset"):
        return split.subset(idx)
    return [split[i] for i in idx]
