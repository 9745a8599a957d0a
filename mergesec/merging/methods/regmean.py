"""RegMean (Jin et al. 2023): the Linear weights that best reproduce every expert's outputs on its
own inputs, from the experts' input Gram matrices (``merging.grams``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor

from mergesec.core.bounds import FiniteFloat, Probability
from mergesec.core.registry import GRAMS, register_op
from mergesec.merging.per_key import SCALES_RESULT, check_fraction, mean, merge_per_key
from mergesec.models.state_dict import StateDict


def _shrink_off_diagonal(gram: Tensor, alpha: float) -> Tensor:
    return alpha * gram + (1 - alpha) * torch.diag_embed(torch.diagonal(gram))


def regmean_linear(
    weights: Sequence[Tensor], grams: Sequence[Tensor], *, alpha: float = 0.95
) -> Tensor:
    """RegMean for one Linear weight ``[out, in]``: the W minimising Σ_i ‖X_i Wᵀ − X_i W_iᵀ‖².

    With input Gram matrices G_i = X_iᵀX_i (off-diagonals scaled by ``alpha``), the solution is
    W = (Σ_i W_i G_i)(Σ_i G_i)⁻¹ (the paper's (ΣG_i)⁻¹ Σ G_i W_i for weights stored ``[in, out]``).
    Solved in float64; if Σ G_i is singular (an input feature never active), a tiny ridge pulls
    the unconstrained directions to the mean weight. Returns the dtype of ``weights[0]``.
    """
    if len(weights) != len(grams) or not weights:
        raise ValueError(
            f"need one Gram matrix per weight, got {len(weights)} weights and {len(grams)} grams"
        )
    check_fraction("alpha", alpha, low_open=False)
    n_in = weights[0].shape[1]
    for i, (w, g) in enumerate(zip(weights, grams, strict=True)):
        if w.dim() != 2 or tuple(g.shape) != (n_in, n_in) or w.shape != weights[0].shape:
            raise ValueError(
                f"weight {i} has shape {tuple(w.shape)} and Gram {tuple(g.shape)}; "
                f"expected {tuple(weights[0].shape)} and ({n_in}, {n_in})"
            )
    gs = [_shrink_off_diagonal(g.double(), alpha) for g in grams]
    ws = [w.double() for w in weights]
    g_sum = sum(gs)
    rhs = sum(w @ g for w, g in zip(ws, gs, strict=True))
    chol, info = torch.linalg.cholesky_ex(g_sum)
    if info.item() != 0:
        eps = 1e-8 * max(torch.diagonal(g_sum).abs().max().item(), 1e-30)
        g_sum = g_sum + eps * torch.eye(n_in, dtype=g_sum.dtype, device=g_sum.device)
        rhs = rhs + eps * torch.stack(ws).mean(0)
        chol = torch.linalg.cholesky(g_sum)
    # W Σ G = rhs with Σ G symmetric  <=>  Σ G Wᵀ = rhsᵀ
    return torch.cholesky_solve(rhs.T, chol).T.to(weights[0].dtype)


@register_op("merge", "regmean", searchable=("coefficient", "alpha"), traits=(GRAMS, SCALES_RESULT))
def regmean(
    base: StateDict,
    experts: Sequence[StateDict],
    *,
    grams: Sequence[Mapping[str, Tensor]] | None = None,
    alpha: Probability = 0.95,
    coefficient: FiniteFloat = 1.0,
) -> StateDict:
    """RegMean (Jin et al. 2023): θ_0 + coefficient · (R − θ_0).

    ``grams[i]`` maps state-dict weight keys of expert i to its input Gram matrix (see
    ``collect_linear_grams`` and ``grams_by_weight_key``). For 2-D keys with grams, R is
    ``regmean_linear``; every other key takes the mean of the experts.
    """
    if grams is None:
        raise ValueError(
            "merge/regmean needs one dict of input Gram matrices per expert (grams=...)"
        )
    if len(grams) != len(experts):
        raise ValueError(f"merge/regmean got {len(grams)} Gram dicts for {len(experts)} experts")

    def combine(key: str, b: Tensor, ts: list[Tensor]) -> Tensor:
        have = [key in g for g in grams]
        if any(have) and not all(have):
            raise ValueError(f"key {key!r} has Gram matrices for only some experts")
        if all(have) and b.dim() == 2:
            r = regmean_linear(ts, [g[key].to(b.device) for g in grams], alpha=alpha).float()
        else:
            r = mean(ts)
        return b + coefficient * (r - b)

    return merge_per_key(base, experts, combine)


GramSample = Literal["class_balanced", "random"]


@register_op("merge", "regmean_released", searchable=("coefficient", "alpha"), traits=(GRAMS,))
def regmean_released(
    base: StateDict,
    experts: Sequence[StateDict],
    *,
    grams: Sequence[Mapping[str, Tensor]] | None = None,
    alpha: float = 0.5,
    gram_examples: int = 100,
    gram_sample: GramSample = "class_balanced",
    coefficient: float = 1.0,
) -> StateDict:
    """RegMean with the settings of Trap²'s released RegMean configuration
    (``alpha_regmean`` 0.5; Gram matrices from ``gram_examples`` = 100 validation examples drawn
    ``class_balanced``, i.e. ``grams_data_distribution: class-wise``); the maths is
    ``merge/regmean``'s. ``gram_examples`` and ``gram_sample`` do not enter the merge itself: they
    tell the merge step which validation examples to compute each expert's ``grams`` on."""
    if gram_examples < 1:
        raise ValueError(f"gram_examples must be >= 1, got {gram_examples}")
    return regmean(base, experts, grams=grams, alpha=alpha, coefficient=coefficient)
