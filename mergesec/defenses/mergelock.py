"""MergeLock (Wang et al., "Model Unmerging"): random invertible matrices on each head's QK and VO.

Like PaRaMS the release computes the expert's function exactly while its task vector becomes
huge and unaligned, so merging it with other experts fails.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from mergesec.core.bounds import PositiveFloat, Seed
from mergesec.defenses import transforms as T
from mergesec.models.layout import TransformerLayout
from mergesec.models.state_dict import StateDict


def _random_invertible(
    batch: int, n: int, scale_min: float, scale_max: float, g: torch.Generator
) -> torch.Tensor:
    """``R·P·diag(s)``: Haar orthogonal ``R``, random permutation ``P``, ``s ~ log-U[min, max]``."""
    r = T.random_orthogonal(batch, n, g)
    p = T.random_permutation_matrix(batch, n, g)
    s = T.log_uniform(scale_min, scale_max, (batch, 1, n), g)
    return r @ p * s


def protect_mergelock(
    expert: Mapping[str, torch.Tensor],
    base: Mapping[str, torch.Tensor],
    layout: TransformerLayout,
    *,
    seed: Seed = 0,
    scale_min: PositiveFloat = 0.1,
    scale_max: PositiveFloat = 15.0,
) -> StateDict:
    """Release ``expert`` protected by MergeLock; returns a new state dict with the same function.

    Per layer and key/value head ``g`` (shared by the query heads of its group), two random
    invertible matrices ``A_g`` (QK branch) and ``B_g`` (VO branch):
    ``Q' = A Q``, ``K' = A^{-T} K``, ``V' = B V``, ``O' = O B^{-1}``, biases alike.
    Each matrix is random × permutation × scaling, ``R·P·diag(s)`` with ``R`` Haar orthogonal
    and ``s ~ log-U[scale_min, scale_max]`` (condition number at most ``scale_max/scale_min``).
    With rotary embeddings (llama family) ``A_g`` is a random scaled rotation on every rotary
    pair ``(i, i + head_dim/2)`` (scale log-U, uniform angle), the matrices that commute with the
    rotation; ``B_g`` keeps the general form. ``base`` is not used beyond the shared signature.
    Maths in float64, cast back to each tensor's dtype; draws from ``manual_seed(seed)``.
    """
    if not 0 < scale_min <= scale_max:
        raise ValueError(f"need 0 < scale_min <= scale_max, got {scale_min}, {scale_max}")
    del base
    g = torch.Generator().manual_seed(seed)
    n, hd = layout.num_kv_heads, layout.head_dim
    out: StateDict = dict(expert)
    for layer in range(layout.num_layers):
        parts = T.read_layer(expert, layout, layer, ("q", "k", "v", "o"))
        if layout.rope:
            a = T.random_rope_qk(n, hd, scale_min, scale_max, g)
        else:
            a = _random_invertible(n, hd, scale_min, scale_max, g)
        b = _random_invertible(n, hd, scale_min, scale_max, g)
        parts = T.apply_vo(T.apply_qk(parts, layout, a), layout, b)
        T.write_layer(out, layout, layer, parts)
    return out
