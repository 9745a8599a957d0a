"""Which of a merge op's parameters the released attacker's search (``coordinate_search``)
searches, and the settings it starts from.

The released search (``eval_scripts/8vision_pertask_linearsearch.py``) always searches the
coefficient, then DARE's drop rate if the method's name contains ``dare``, TIES' top-k if it
contains ``ties`` and CART's rank if it contains ``cart``. mergesec applies the same rule to its op
names, among the parameters the op can search; a parameter the study sets to one value is held at
that value and not searched.
"""

from __future__ import annotations

from collections.abc import Iterable

from mergesec.core.registry import Op
from mergesec.merging.coordinate_search import RELEASED_ORDER

# parameter -> the part of a method's name that makes the released search search it
RELEASED_TAGS: dict[str, str] = {
    "coefficient": "",
    "drop_rate": "dare",
    "k": "ties",
    "rank_fraction": "cart",
}


def released_search_order(op: Op, fixed: Iterable[str] = ()) -> tuple[str, ...]:
    """The parameters of ``op`` the released search searches, in its order (``fixed`` left out)."""
    held = set(fixed)
    return tuple(
        p
        for p in RELEASED_ORDER
        if p in op.searchable and RELEASED_TAGS[p] in op.name and p not in held
    )
