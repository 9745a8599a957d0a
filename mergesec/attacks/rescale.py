"""Rescaling attack on scale-sensitive protections (Trap²): merge the victim at its own scale.

Trap² makes a release brittle when a merge moves its task vector away from scale 1. An attacker
who merges it may first rescale the victim's task vector alone, W₀ + s·τ_v, choosing s together
with the merge's own settings on the little labelled victim data it holds. With one global merge
coefficient c, task arithmetic then applies c·s to the victim and c to the others, so the attacker
can put the victim back at scale 1 whatever c the others need.

This is an attack at stage ``merge``: it runs inside the merge step (``tasks/merge.py``), which
searches its candidates jointly with the merge op's searched parameters.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Annotated

from pydantic import Field
from torch import Tensor

from mergesec.core.bounds import FiniteFloat, PositiveInt

DEFAULT_SCALES = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


class RescaledStateDict(Mapping[str, Tensor]):
    """A read-only view ``W₀ + s·(W − W₀)`` computed per key on access (nothing is cached).

    Floating tensors present in ``base`` are rescaled; other tensors pass through from
    ``release``. Both inputs may be lazy mappings, so the view holds no whole model either.
    """

    def __init__(self, base: Mapping[str, Tensor], release: Mapping[str, Tensor], scale: float):
        self.base, self.release, self.scale = base, release, float(scale)
        self._base_keys = set(base)

    def __getitem__(self, key: str) -> Tensor:
        w = self.release[key]
        if self.scale == 1.0 or not w.is_floating_point() or key not in self._base_keys:
            return w
        b = self.base[key]
        return (b.float() + self.scale * (w.float() - b.float())).to(w.dtype)

    def __contains__(self, key: object) -> bool:
        return key in self.release

    def __iter__(self) -> Iterator[str]:
        return iter(self.release)

    def __len__(self) -> int:
        return len(self.release)


@dataclass(frozen=True)
class MergeStageCandidates:
    """What an attack at stage ``merge`` hands the merge step.

    ``candidates``: ``(chosen params, victim weights)`` pairs, each replacing the victim's expert
    in one family of merges; ``n_val``: how many labelled validation examples of the victim's
    dataset the attacker scores with (``None``: the whole split, like the plain merge search).
    """

    candidates: list[tuple[dict[str, float], Mapping[str, Tensor]]]
    n_val: int | None = None


def attack_rescale(
    base: Mapping[str, Tensor],
    release: Mapping[str, Tensor],
    *,
    scales: Annotated[list[FiniteFloat], Field(min_length=1)] = list(DEFAULT_SCALES),  # noqa: B006 (never mutated)
    n_val: PositiveInt = 64,
) -> MergeStageCandidates:
    """Candidates W₀ + s·τ_v for each s in ``scales``, scored on ``n_val`` labelled victim examples.

    The merge step merges every candidate with every setting of its searched parameters and keeps
    the best by its usual validation score; the chosen scale is logged as ``chosen/scale``.
    """
    if not scales:
        raise ValueError("attack/rescale needs at least one scale")
    if n_val < 1:
        raise ValueError(f"n_val must be >= 1, got {n_val}")
    cands = [({"scale": float(s)}, RescaledStateDict(base, release, s)) for s in scales]
    return MergeStageCandidates(cands, n_val=n_val)
