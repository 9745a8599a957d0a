"""Report sections for scaling-sensitive protections (Trap²) and the attacks on them.

- ``load_scale_curves`` / ``scale_curve_table``: the curves and their sharpness summaries of a
  study's ``evaluate/scale_curve`` nodes, read back from the store (``plots.plot_scale_curves``
  draws them);
- ``plot_scenario_merge``: per merge op and scenario, the victim's standalone and merged accuracy
  and the other datasets' merged accuracy (PNG bytes, ``None`` when there is nothing to draw).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from mergesec.data import dataset_slug
from mergesec.orchestrator.plan import Plan
from mergesec.orchestrator.store import Store
from mergesec.plots import bar_panels
from mergesec.report.results import by_merge


def load_scale_curves(plan: Plan, store: Store) -> dict[str, dict[str, Any]]:
    """``label -> {"curve", "summary", "scenario", "victim", "kind"}`` for every finished
    scale-curve node of the plan's rows; the label is ``<scenario> <victim>: <kind>``.

    A model shared by several rows (the clean expert) appears once, under its first label.
    """
    if not any(row.scale_curves for row in plan.rows):
        return {}
    # Deferred: the producing step's module imports torch, which a report without curves skips.
    from mergesec.tasks.scale_diagnostics import SCALE_CURVE_FILE

    out: dict[str, dict[str, Any]] = {}
    seen: set[str] = set()
    for row in plan.rows:
        for kind, node_id in row.scale_curves.items():
            summary = store.metrics_if_done(node_id)
            if node_id in seen or summary is None:
                continue
            seen.add(node_id)
            try:
                doc = json.loads(store.read_node_text(node_id, SCALE_CURVE_FILE))
            except (ValueError, OSError):  # corrupt (``CorruptNode`` is a ValueError)
                continue
            victim = dataset_slug(row.victim)
            label = f"{victim}: clean" if kind == "clean" else f"{row.scenario} {victim}: {kind}"
            out[label] = {
                "curve": doc["curve"],
                "summary": summary,
                "scenario": row.scenario,
                "victim": victim,
                "kind": kind,
                "node": node_id,
            }
    return out


def scale_curve_table(curves: Mapping[str, Mapping[str, Any]]) -> str:
    """A Markdown table of each curve's sharpness summary (loss at s = 1, the lowest loss away
    from 1 and its ratio to the loss at 1, the scale of lowest loss, accuracy drops)."""
    cols = [
        ("loss@1", "sharpness/loss_s1"),
        ("acc@1", "sharpness/acc_s1"),
        ("min loss at \\|s-1\\| ≥ .25", "sharpness/min_loss_off"),
        ("ratio", "sharpness/off_to_nominal"),
        ("argmin s", "sharpness/s_argmin"),
        ("acc drop s=.5", "sharpness/acc_drop_s0.5"),
    ]
    lines = [
        "| model | " + " | ".join(c for c, _ in cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for label, c in curves.items():
        vals = []
        for _, key in cols:
            v = c["summary"].get(key)
            vals.append("-" if v is None or not math.isfinite(v) else f"{v:.3f}")
        lines.append(f"| {label} | " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"


def plot_scenario_merge(rows: Sequence[Mapping[str, Any]]) -> bytes | None:
    """One panel per merge op; per scenario (and victim) grouped bars of the victim's standalone
    accuracy (its release), its accuracy after merging, and the others' mean accuracy after
    merging. The clean expert's standalone accuracy is drawn as a tick over each group."""
    panels = by_merge(list(rows))
    if not panels:
        return None
    series = [
        ("victim standalone", "victim_release"),
        ("victim merged", "victim_merged"),
        ("others merged", "others_merged"),
    ]
    return bar_panels(panels, series, tick=("clean expert", "victim_clean"))
