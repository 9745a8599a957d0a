"""SVD-based merges: TSV-Merge (task singular vectors) and CART (centred low-rank task vectors)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from mergesec.core.bounds import FiniteFloat, KeptFraction
from mergesec.core.registry import register_op
from mergesec.merging.per_key import SCALES_TASK_VECTORS, check_fraction, mean, merge_per_key
from mergesec.models.state_dict import StateDict


def _orthogonalize(m: Tensor) -> Tensor:
    """The nearest matrix with orthonormal columns (or rows, if wide): P Qᵀ from m = P Σ Qᵀ."""
    p, _, qh = torch.linalg.svd(m, full_matrices=False)
    return p @ qh


def tsv_matrix(
    tvs: Sequence[Tensor],
    rank_fraction: float,
    *,
    keep_null: bool = False,
    per_task: int | None = None,
) -> Tensor:
    """TSV-Merge of 2-D task vectors: Û diag(σ) V̂ᵀ from each task's top singular triplets.

    Each task keeps its top ``max(1, int(rank_fraction · min(m, n)))`` singular components
    (``per_task`` of them when given). The
    concatenated left and right singular vectors are replaced by their nearest orthonormal
    matrices, which removes the overlap between tasks' subspaces. Without ``keep_null``,
    components with zero singular value are dropped: their vectors are arbitrary and would only
    perturb the orthogonalisation. The released code keeps them (``keep_null``); on low-rank
    (LoRA) task vectors that changes the merge a lot, on full-rank ones hardly at all.
    """
    us, ss, vhs = [], [], []
    for tv in tvs:
        u, s, vh = torch.linalg.svd(tv, full_matrices=False)
        k = max(1, int(rank_fraction * s.numel())) if per_task is None else per_task
        if keep_null:
            keep = torch.ones(k, dtype=torch.bool, device=s.device)
        else:
            keep = s[:k] > s[0] * torch.finfo(s.dtype).eps * max(tv.shape)
        us.append(u[:, :k][:, keep])
        ss.append(s[:k][keep])
        vhs.append(vh[:k][keep])
    s_cat = torch.cat(ss)
    if s_cat.numel() == 0:
        return torch.zeros_like(tvs[0])
    u_orth = _orthogonalize(torch.cat(us, dim=1))
    vh_orth = _orthogonalize(torch.cat(vhs, dim=0))
    return (u_orth * s_cat) @ vh_orth


@register_op(
    "merge", "tsv", searchable=("coefficient", "rank_fraction"), traits=(SCALES_TASK_VECTORS,)
)
def tsv(
    base: StateDict,
    experts: Sequence[StateDict],
    *,
    rank_fraction: KeptFraction | None = None,
    coefficient: FiniteFloat = 1.0,
) -> StateDict:
    """Task Singular Vectors merge (TSV-M, Gargiulo et al. 2025): θ_0 + coefficient · merged.

    2-D tensors are merged with ``tsv_matrix`` keeping ``rank_fraction`` (default 1/N) of each
    task's singular components; other tensors (biases, norms, conv kernels) take the mean task
    vector, as the reference implementation does.
    """
    frac = 1.0 / len(experts) if rank_fraction is None else rank_fraction
    check_fraction("rank_fraction", frac)

    def combine(_key: str, b: Tensor, ts: list[Tensor]) -> Tensor:
        tvs = [t - b for t in ts]
        merged = tsv_matrix(tvs, frac) if b.dim() == 2 else mean(tvs)
        return b + coefficient * merged

    return merge_per_key(base, experts, combine)


def low_rank(m: Tensor, rank: int) -> Tensor:
    """Best rank-``rank`` approximation of a 2-D tensor (truncated SVD)."""
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


@register_op("merge", "cart", searchable=("coefficient", "rank_fraction"))
def cart(
    base: StateDict,
    experts: Sequence[StateDict],
    *,
    rank_fraction: KeptFraction = 0.16,
    coefficient: FiniteFloat = 1.0,
) -> StateDict:
    """CART (Choi et al. 2024, "Revisiting Weight Averaging for Model Merging").

    merged = θ_avg + coefficient · Σ_i LR_k(θ_i − θ_avg), with θ_avg the mean of the experts
    (= θ_0 + τ̄) and LR_k the truncated SVD keeping k = ceil(rank_fraction · min(m, n))
    components, applied to each centred task vector separately (the sum of the centred vectors
    is zero, so truncating their sum would give plain averaging). Tensors that are not 2-D get
    θ_avg, since their centred vectors sum to zero. With two experts the centred vectors are
    opposite and CART reduces to weight averaging.
    """
    check_fraction("rank_fraction", rank_fraction)

    def combine(_key: str, b: Tensor, ts: list[Tensor]) -> Tensor:
        avg = mean(ts)
        if b.dim() != 2:
            return avg
        k = max(1, math.ceil(rank_fraction * min(b.shape)))
        return avg + coefficient * sum(low_rank(t - avg, k) for t in ts)

    return merge_per_key(base, experts, combine)


@register_op("merge", "tsv_released", searchable=("coefficient",))
def tsv_released(
    base: StateDict, experts: Sequence[StateDict], *, coefficient: float = 1.0
) -> StateDict:
    """TSV-Merge as released with Trap² (``task_merger.py`` ``get_tsv_delta_w``, as in
    fusion_bench): each task keeps its top ``int(min(m, n) / N)`` singular triplets, the
    numerically zero ones included, and the SVDs run in float64; other tensors take the mean
    task vector. θ_0 + coefficient · merged. ``merge/tsv`` drops the null triplets."""

    def combine(_key: str, b: Tensor, ts: list[Tensor]) -> Tensor:
        tvs = [(t - b).double() for t in ts]
        if b.dim() != 2:
            return b + coefficient * mean([t - b for t in ts])
        per_task = int(min(b.shape) / len(ts))
        if per_task == 0:
            return b.clone()
        merged = tsv_matrix(tvs, 1.0, keep_null=True, per_task=per_task).float()
        return b + coefficient * merged

    return merge_per_key(base, experts, combine)


@register_op("merge", "cart_released", searchable=("coefficient", "rank_fraction"))
def cart_released(
    base: StateDict,
    experts: Sequence[StateDict],
    *,
    rank_fraction: float = 0.04,
    low_rank_weight: float = 0.1,
    coefficient: float = 1.0,
) -> StateDict:
    """CART as released with Trap² (``task_merger.py`` ``get_cart_delta_w``):
    θ_0 + coefficient · (τ̄ + low_rank_weight · Σ_i LR_k(τ_i − τ̄)), k = ceil(rank_fraction ·
    min(m, n)), SVDs in float64; tensors that are not 2-D get θ_0 + coefficient · τ̄. The
    coefficient scales the mean too, so the attacker's search reaches past plain averaging;
    ``low_rank_weight`` is fixed at 0.1 in the released search (``cart_scaling_coeffs``).
    ``merge/cart`` is the CART paper's form θ_avg + coefficient · Σ_i LR_k(θ_i − θ_avg)."""
    check_fraction("rank_fraction", rank_fraction)

    def combine(_key: str, b: Tensor, ts: list[Tensor]) -> Tensor:
        tvs = [(t - b).double() for t in ts]
        avg = torch.stack(tvs).mean(0)
        delta = avg
        if b.dim() == 2:
            k = math.ceil(rank_fraction * min(b.shape))
            delta = avg + low_rank_weight * sum(low_rank(t - avg, k) for t in tvs)
        return b + coefficient * delta.float()

    return merge_per_key(base, experts, combine)
