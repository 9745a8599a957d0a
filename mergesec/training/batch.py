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


def length_grouped(
    lengths: Sequence[int], batch_size: int, pool: int, seed: int | None
) -> list[list[int]]:
    """Training batches (lists of indices) of examples of similar length, still in random order.

    The indices are shuffled with ``seed``; each run of ``pool`` × ``batch_size`` of them is sorted
    by length and cut into batches, and the batches are shuffled again by the same generator, so
    a batch is padded to about its own examples' length while every epoch still draws new batches
    in a new order. With ``seed`` None nothing is shuffled (runs of the split's order, sorted).
    ``pool`` 1 gives the plain order's batches (``chunks(shuffled(n, seed), batch_size)``). The
    batch count is always that of the plain order (⌈n / batch_size⌉): only the last pool can be
    partial.
    """
    if batch_size < 1 or pool < 1:
        raise ValueError(f"need batch_size >= 1 and pool >= 1, got {batch_size} and {pool}")
    if pool == 1:
        return list(chunks(shuffled(len(lengths), seed), batch_size))
    rng = random.Random(seed) if seed is not None else None
    order = list(range(len(lengths)))
    if rng is not None:
        rng.shuffle(order)  # the same draw as shuffled(n, seed)
    span = pool * batch_size
    batches: list[list[int]] = []
    for start in range(0, len(order), span):
        run = sorted(order[start : start + span], key=lambda j: lengths[j])
        batches.extend(chunks(run, batch_size))
    if rng is not None:
        rng.shuffle(batches)
    return batches
