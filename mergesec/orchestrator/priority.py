"""A rough run-time estimate per plan node, for the searcher's critical-path order.

Only the order of the estimates matters: a training node is priced by its optimizer steps (about
a second each for a small model on a CPU core), every other node by a constant for its step. The
searcher adds each node's estimate to the longest estimated path below it, so a long training node
whose results many merges wait for starts before the short nodes that could run beside it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

# Typical seconds of the quickstart's nodes on one CPU core (benchmarks/quickstart_time.py).
STEP_COST: dict[str, float] = {
    "merge": 12.0,
    "monitor": 8.0,
    "attack": 3.0,
    "evaluate": 3.0,
    "protect": 2.0,
}
UNKNOWN_TRAIN_EXAMPLES = 1000  # a dataset without an `examples` cap: size unknown to the plan


def training_steps(params: Mapping[str, Any]) -> int | None:
    """Optimizer steps a training node will take at most; None for a node that does not train.

    A finetune node carries its settings in ``op``; a training protection (Trap²) carries the
    study's ``finetune`` settings and its own ``op`` (``max_steps`` wins over epochs).
    """
    op = params.get("op") or {}
    settings = params.get("finetune")
    if settings is None:
        if "epochs" not in op and "max_steps" not in op:
            return None
        settings = op
    if op.get("max_steps"):
        return int(op["max_steps"])
    examples = (params.get("dataset") or {}).get("examples") or {}
    n = int(examples.get("train") or UNKNOWN_TRAIN_EXAMPLES)
    batch = int(settings.get("batch_size") or 1) * int(settings.get("grad_accumulation") or 1)
    return int(settings.get("epochs") or 1) * math.ceil(n / max(batch, 1))


def estimated_cost(node: Mapping[str, Any]) -> float:
    """A node's estimated run time in rough seconds (see the module's docstring)."""
    steps = training_steps(node.get("params") or {}) if node["step"] != "merge" else None
    if steps is not None:
        return float(steps)
    return STEP_COST.get(node["step"], 1.0)
