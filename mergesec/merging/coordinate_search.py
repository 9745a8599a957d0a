"""The merge attacker's search as released with Trap² (``eval_scripts/8vision_pertask_linearsearch.py``):
a greedy coordinate search over a merge op's settings, scored by the mean validation accuracy
normalised by the unprotected experts' accuracies.

One parameter at a time, in ``RELEASED_ORDER`` (the coefficient, then DARE's drop rate, TIES' top-k,
CART's rank fraction, each only if the op has it), every other parameter held at its current value
(``RELEASED_START`` until searched): the values of the parameter's grid are tried in order, the best
is kept (ties go to the later value, as the released ``>=``), and the parameter's pass stops after
``patience`` (10) values in a row that did not reach the best. The parameter is then fixed at its best
value and the next one is searched.

Pure functions of an objective ``settings -> score``; running merges and scoring them is the
caller's. This module does not know ops or data.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

# The released grids, in mergesec's parameter names: ``scaling_coeffs`` 0.1…9.9 step 0.1 is
# ``coefficient``; ``dare_pruning_coeffs`` is ``drop_rate``; ``topK`` 100 → 10 % is ``k``;
# ``cart_pruning_rank`` is ``rank_fraction``.
RELEASED_GRIDS: dict[str, tuple[float, ...]] = {
    "coefficient": tuple(round(0.1 * i, 1) for i in range(1, 100)),
    "drop_rate": (1e-5, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.99),
    "k": tuple(round(0.1 * i, 1) for i in range(10, 0, -1)),
    "rank_fraction": (0.04, 0.08, 0.16, 0.32),
}
RELEASED_START: dict[str, float] = {
    "coefficient": 0.6,
    "k": 0.3,
    "rank_fraction": 0.04,
    "drop_rate": 1e-5,
}
RELEASED_ORDER: tuple[str, ...] = ("coefficient", "drop_rate", "k", "rank_fraction")
RELEASED_PATIENCE = 10

Settings = dict[str, float]


@dataclass(frozen=True)
class SearchResult:
    """The chosen settings, their score, and every (settings, score) tried, in order."""

    best: Settings
    score: float
    trials: list[tuple[Settings, float]] = field(default_factory=list)


def released_order(searchable: Sequence[str] | set[str] | frozenset[str]) -> tuple[str, ...]:
    """The parameters of ``RELEASED_ORDER`` that an op can search, in the released order."""
    return tuple(p for p in RELEASED_ORDER if p in searchable)


def coordinate_search(
    objective: Callable[[Settings], float],
    *,
    order: Sequence[str],
    grids: Mapping[str, Sequence[float]] = RELEASED_GRIDS,
    start: Mapping[str, float] = RELEASED_START,
    patience: int = RELEASED_PATIENCE,
) -> SearchResult:
    """Greedy coordinate search maximising ``objective`` (see the module docstring).

    ``objective`` receives the settings of ``order``'s parameters (values from ``start`` for the
    ones not searched yet). Raises ``ValueError`` for an empty order, a parameter without a grid
    or start value, an empty grid or ``patience < 1``.
    """
    if not order:
        raise ValueError("coordinate search needs at least one parameter to search")
    if patience < 1:
        raise ValueError(f"patience must be >= 1, got {patience}")
    for name in order:
        if name not in start:
            raise ValueError(f"no start value for {name!r}; given: {', '.join(sorted(start))}")
        if not grids.get(name):
            raise ValueError(f"no grid of values for {name!r}")
    current: Settings = {name: float(start[name]) for name in order}
    trials: list[tuple[Settings, float]] = []
    score = float("-inf")
    for name in order:
        best_value, best_score, misses = current[name], float("-inf"), 0
        for value in grids[name]:
            settings = current | {name: float(value)}
            got = float(objective(dict(settings)))
            trials.append((settings, got))
            if got >= best_score:
                best_value, best_score, misses = float(value), got, 0
            else:
                misses += 1
                if misses == patience:
                    break
        current[name], score = best_value, best_score
    return SearchResult(best=current, score=score, trials=trials)


def normalised_accuracy(
    accuracies: Mapping[str, float],
    unprotected: Mapping[str, float],
    datasets: Sequence[str] | None = None,
) -> float:
    """The released search criterion: the mean over ``datasets`` (default: all of
    ``accuracies``) of each merged accuracy divided by its unprotected expert's accuracy (the
    released ``baseline_norms``: the clean fine-tuned experts, fixed for the whole search)."""
    names = list(accuracies if datasets is None else datasets)
    if not names:
        raise ValueError("the criterion needs at least one dataset")
    missing = [n for n in names if n not in accuracies or n not in unprotected]
    if missing:
        raise ValueError(f"no merged or unprotected accuracy for: {', '.join(missing)}")
    bad = [n for n in names if unprotected[n] <= 0]
    if bad:
        raise ValueError(f"unprotected accuracy must be > 0 for: {', '.join(bad)}")
    return sum(accuracies[n] / unprotected[n] for n in names) / len(names)
