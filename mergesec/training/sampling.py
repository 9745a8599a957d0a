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


def split_labels(split: Sequence) -> list[int] | None:
    """The class label of every example of a split (``split.labels``, else each example's
    ``label``), or None for a split without labels (question answering)."""
    labels = getattr(split, "labels", None)
    if labels is not None:
        return [int(x) for x in labels]
    if len(split) and hasattr(split[0], "label"):
        return [int(e.label) for e in split]
    return None


def class_balanced_indices(labels: Sequence[int], n: int, seed: int = 0) -> list[int]:
    """``n`` indices (all when fewer) drawn as evenly over the classes as they allow: each class's
    examples in a seeded order, taken one class at a time in turn; returned in split order."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(y, []).append(i)
    queues = []
    for y in sorted(by_class):
        idx = by_class[y]
        rng.shuffle(idx)
        queues.append(idx)
    out: list[int] = []
    depth = 0
    while len(out) < n and any(depth < len(q) for q in queues):
        for q in queues:
            if depth < len(q) and len(out) < n:
                out.append(q[depth])
        depth += 1
    return sorted(out)
