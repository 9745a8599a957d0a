"""Linear merges: weight averaging (model soup) and task arithmetic."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from mergesec.core.bounds import FiniteFloat
from mergesec.core.registry import register_op
from mergesec.merging.per_key import (
    SCALES_TASK_VECTORS,
    accumulate,
    mean,
    merge_per_key,
    owned,
    task_vectors,
)
from mergesec.models.state_dict import StateDict


@register_op("merge", "weight_average")
def weight_average(base: StateDict, experts: Sequence[StateDict]) -> StateDict:
    """Mean of the expert weights (model soup / uniform averaging)."""
    return merge_per_key(base, experts, lambda _k, _b, ts: mean(ts))


@register_op("merge", "task_arithmetic", searchable=("coefficient",), traits=(SCALES_TASK_VECTORS,))
def task_arithmetic(
    base: StateDict, experts: Sequence[StateDict], *, coefficient: FiniteFloat = 1.0
) -> StateDict:
    """Task arithmetic: θ_0 + coefficient · Σ_i τ_i."""
    in_place = owned(*experts)

    def combine(_key: str, b: Tensor, ts: list[Tensor]) -> Tensor:
        taus = task_vectors(b, ts, in_place=in_place)
        return accumulate(taus, fresh=True).mul_(coefficient).add_(b)

    return merge_per_key(base, experts, combine)
