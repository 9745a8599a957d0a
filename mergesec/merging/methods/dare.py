"""DARE (Yu et al. 2024): drop and rescale each task vector, then add (``dare_linear``) or take
the TIES sign-elected disjoint mean (``dare_ties``)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from torch import Tensor

from mergesec.core.bounds import DropFraction, FiniteFloat, Seed
from mergesec.core.registry import register_op
from mergesec.merging.methods.ties import elect_sign_disjoint_mean, trim_top_k_inclusive
from mergesec.merging.per_key import (
    SCALES_TASK_VECTORS,
    accumulate,
    check_fraction,
    merge_per_key,
    stacked,
)
from mergesec.models.state_dict import StateDict


def key_seed(seed: int, key: str, index: int) -> int:
    """A 63-bit generator seed derived from (seed, tensor name, expert index), stable across runs."""
    digest = hashlib.blake2b(f"{seed}\x00{key}\x00{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def dare(tv: Tensor, drop_rate: float, seed: int) -> Tensor:
    """DARE: drop each entry with probability ``drop_rate``, rescale the kept ones by 1/(1−p)."""
    if drop_rate == 0:
        return tv
    gen = torch.Generator(device="cpu").manual_seed(seed)
    keep = (torch.rand(tv.shape, generator=gen) >= drop_rate).to(tv.device)
    return tv * keep / (1.0 - drop_rate)


def _dare_merge(
    base: StateDict,
    experts: Sequence[StateDict],
    *,
    drop_rate: float,
    coefficient: float,
    seed: int,
    elect: bool,
) -> StateDict:
    """θ_0 + coefficient · (Σ_i or the TIES disjoint mean over i, by ``elect``) DARE(τ_i)."""
    check_fraction("drop_rate", drop_rate, low_open=False, high_open=True)

    def combine(key: str, b: Tensor, ts: list[Tensor]) -> Tensor:
        def dropped(i: int, t: Tensor) -> Tensor:
            return dare(t - b, drop_rate, key_seed(seed, key, i))

        if elect:
            merged = elect_sign_disjoint_mean(stacked(ts, dropped), inplace=True)
        else:
            merged = accumulate((dropped(i, t) for i, t in enumerate(ts)), fresh=True)
        return merged.mul_(coefficient).add_(b)

    return merge_per_key(base, experts, combine)


@register_op(
    "merge",
    "dare_linear",
    searchable=("coefficient", "drop_rate"),
    traits=(SCALES_TASK_VECTORS,),
)
def dare_linear(
    base: StateDict,
    experts: Sequence[StateDict],
    *,
    drop_rate: DropFraction = 0.5,
    coefficient: FiniteFloat = 1.0,
    seed: Seed = 0,
) -> StateDict:
    """DARE then task arithmetic: θ_0 + coefficient · Σ_i DARE(τ_i)."""
    return _dare_merge(
        base, experts, drop_rate=drop_rate, coefficient=coefficient, seed=seed, elect=False
    )


@register_op(
    "merge",
    "dare_ties",
    searchable=("coefficient", "drop_rate"),
    traits=(SCALES_TASK_VECTORS,),
)
def dare_ties(
    base: StateDict,
    experts: Sequence[StateDict],
    *,
    drop_rate: DropFraction = 0.5,
    coefficient: FiniteFloat = 1.0,
    seed: Seed = 0,
) -> StateDict:
    """DARE, then TIES sign election and disjoint mean (no magnitude trimming, as mergekit's
    ``dare_ties``): θ_0 + coefficient · merged."""
    return _dare_merge(
        base, experts, drop_rate=drop_rate, coefficient=coefficient, seed=seed, elect=True
    )


@register_op("merge", "dare_ties_released", searchable=("coefficient", "drop_rate", "k"))
def dare_ties_released(
    base: StateDict,
    experts: Sequence[StateDict],
    *,
    drop_rate: float = 1e-5,
    k: float = 0.3,
    coefficient: float = 1.0,
    seed: int = 0,
) -> StateDict:
    """DARE-TIES as released with Trap² (``task_merger.py``, ``dare-ties``): DARE on each task
    vector, then the whole of TIES on the dropped vectors, its top-``k`` trim included (the
    released inclusive trim, ``trim_top_k_inclusive``, per tensor), sign election and disjoint
    mean: θ_0 + coefficient · merged. The defaults are the released search's starting point
    (``dare_pruning_coeffs`` 1e-5, ``topK`` 30 %); ``merge/dare_ties`` is the trim-free form."""
    check_fraction("drop_rate", drop_rate, low_open=False, high_open=True)
    check_fraction("k", k)

    def combine(key: str, b: Tensor, ts: list[Tensor]) -> Tensor:
        def trimmed(i: int, t: Tensor) -> Tensor:
            return trim_top_k_inclusive(dare(t - b, drop_rate, key_seed(seed, key, i)), k)

        merged = elect_sign_disjoint_mean(stacked(ts, trimmed), inplace=True)
        return merged.mul_(coefficient).add_(b)

    return merge_per_key(base, experts, combine)
