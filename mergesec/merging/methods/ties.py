"""TIES-Merging: trim, elect signs, disjoint mean (Yadav et al. 2023)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mergesec.core.bounds import FiniteFloat, KeptFraction
from mergesec.core.registry import register_op
from mergesec.merging.per_key import SCALES_TASK_VECTORS, check_fraction, merge_per_key, stacked
from mergesec.models.state_dict import StateDict


def trim_top_k(tv: Tensor, k: float) -> Tensor:
    """Zero all but the ``max(1, int(k · numel))`` largest-magnitude entries of ``tv``.

    Keeps exactly that many entries (like mergekit's ``magnitude`` sparsification; the original
    TIES code keeps one more because it thresholds at the k-th value inclusively).
    """
    n = tv.numel()
    keep = n if k >= 1 else max(1, int(k * n))
    if keep >= n:
        return tv
    flat = tv.reshape(-1)
    mask = torch.zeros(n, dtype=torch.bool, device=tv.device)
    mask[flat.abs().topk(keep, sorted=False).indices] = True
    return (flat * mask).view_as(tv)


def trim_top_k_inclusive(tv: Tensor, k: float) -> Tensor:
    """The released TIES trim (Trap²'s and KnOTS' ``topk_values_mask``): keep every entry whose
    magnitude is at least the ``(n − int(k·n))``-th smallest one, i.e. ``int(k·n) + 1`` entries
    barring ties (one more than ``trim_top_k``); ``k >= 1`` or a single entry keeps everything."""
    n = tv.numel()
    if k >= 1 or n == 1:
        return tv
    flat = tv.reshape(-1)
    kth = flat.abs().kthvalue(n - int(n * k)).values
    return (flat * (flat.abs() >= kth)).view_as(tv)


def elect_sign_disjoint_mean(tvs: Tensor, *, inplace: bool = False) -> Tensor:
    """TIES sign election and disjoint merge over stacked task vectors ``[N, ...]``.

    The elected sign of an entry is the sign of the sum of the (trimmed) task vectors there,
    i.e. the sign carrying more total mass; entries whose sum is exactly zero take the tensor's
    majority sign (as the reference TIES code does). The merged value is the mean over the
    task vectors whose entry is nonzero and agrees with the elected sign (zero if none does).
    With ``inplace`` the disagreeing entries of ``tvs`` are zeroed in place to save memory.
    """
    sign = torch.sign(tvs.sum(0))
    sign[sign == 0] = torch.sign(sign.sum())
    agree = torch.where(sign > 0, tvs > 0, tvs < 0)
    # counted in float32 like the task vectors (exact: counts are small integers), not int64
    count = agree.sum(0, dtype=tvs.dtype).clamp_(min=1)
    selected = tvs.mul_(agree) if inplace else tvs * agree
    return selected.sum(0).div_(count)


@register_op("merge", "ties", searchable=("coefficient", "k"), traits=(SCALES_TASK_VECTORS,))
def ties(
    base: StateDict,
    experts: Sequence[StateDict],
    *,
    k: KeptFraction = 0.2,
    coefficient: FiniteFloat = 1.0,
) -> StateDict:
    """TIES-Merging: trim each task vector to its top-k fraction by magnitude (per tensor), elect
    signs by mass, take the disjoint mean of agreeing entries: θ_0 + coefficient · merged."""
    check_fraction("k", k)

    def combine(_key: str, b: Tensor, ts: list[Tensor]) -> Tensor:
        # each expert's top-k runs on one core: trim the experts side by side
        tvs = stacked(ts, lambda _i, t: trim_top_k(t - b, k), parallel=b.device.type == "cpu")
        return elect_sign_disjoint_mean(tvs, inplace=True).mul_(coefficient).add_(b)

    return merge_per_key(base, experts, combine)
