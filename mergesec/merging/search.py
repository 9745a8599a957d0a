"""Helpers of a searched merge: the candidate settings, and merging one into a live module."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mergesec.core.registry import is_search
from mergesec.models.state_dict import StateDict


def candidates(params: dict[str, Any]) -> list[dict[str, Any]]:
    """Every combination of the searched parameters, the fixed ones filled in."""
    searched = {k: v["search"] for k, v in params.items() if is_search(v)}
    fixed = {k: v for k, v in params.items() if not is_search(v)}
    if not searched:
        return [fixed]
    names = list(searched)
    return [
        fixed | dict(zip(names, combo, strict=True))
        for combo in itertools.product(*searched.values())
    ]


def merge_into_module(
    op_fn: Callable[..., StateDict],
    base: Mapping[str, Tensor],
    experts: Sequence[Mapping[str, Tensor]],
    params: dict[str, Any],
    module: nn.Module,
) -> None:
    """Merge key by key (as ``stream_merge`` does) and copy each result into ``module``'s weights.

    ``module``'s state dict must have every key of ``base``; memory holds one tensor per expert.
    """
    sd = module.state_dict()
    missing = [k for k in base if k not in sd]
    if missing:
        raise ValueError(f"key {missing[0]!r} of the base is not a weight of the model")
    with torch.no_grad():
        for key in base:
            merged = op_fn({key: base[key]}, [{key: e[key]} for e in experts], **params)[key]
            sd[key].copy_(merged)
