"""Batches: the dict a task kind yields, seeding, device transfer and seeded batch orders."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

import numpy as np
import torch

Batch = dict[str, torch.Tensor]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def to_device(batch: Batch, device: str) -> Batch:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def shuffled(n: int, seed: int | None) -> list[int]:
    """``range(n)`` as a list, shuffled with ``seed`` (in order when ``seed`` is None)."""
    order = list(range(n))
    if seed is not None:
        random.Random(seed).shuffle(order)
    return order


def chunks(order: Sequence[int], size: int) -> Iterator[list[int]]:
    for i in range(0, len(order), size):
        yield list(order[i : i + size])
