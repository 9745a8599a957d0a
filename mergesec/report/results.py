"""The study's results: one row per (variant, scenario, victim) read back from the store, as a
table and as a figure."""

from __future__ import annotations

from typing import Any

from mergesec.data import dataset_slug
from mergesec.orchestrator.headline import row_numbers
from mergesec.orchestrator.plan import Plan
from mergesec.orchestrator.store import Store
from mergesec.plots import bar_panels
from mergesec.report.tables import csv_table, markdown_table

# The columns that name a plan row, first in every table of the report.
ROW_COLUMNS = ["variant", "scenario", "victim", "merge"]
COLUMNS = [
    *ROW_COLUMNS,
    "coefficient",
    "victim_clean",
    "victim_release",
    "victim_merged",
    "victim_merged_norm",
    "others_merged",
    "status",
]


def _metrics(store: Store, node_id: str) -> dict[str, Any] | None:
    return store.metrics_if_done(node_id)


def build_results(plan: Plan, store: Store) -> list[dict[str, Any]]:
    """One row per (variant, scenario, victim): accuracies before and after merging."""
    rows = []
    for r in plan.rows:
        numbers = row_numbers(r, lambda node_id: _metrics(store, node_id))
        row: dict[str, Any] = {
            "variant": r.variant,
            "scenario": r.scenario,
            "victim": dataset_slug(r.victim),
            "merge": r.merge_op,
            **numbers,
            "status": "done"
            if store.is_done(r.merge_eval)
            else ("failed" if store.is_failed(r.merge_eval) else "missing"),
        }
        row["monitors"] = {
            kind: {
                k.split("/", 1)[1]: x
                for k, x in (_metrics(store, nid) or {}).items()
                if k.startswith("monitor/")
            }
            for kind, nid in r.monitors.items()
        }
        row["scale_curves"] = {
            kind: nid for kind, nid in r.scale_curves.items() if store.is_done(nid)
        }
        rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    """The results as a Markdown table."""
    return markdown_table(rows, COLUMNS)


def to_csv(rows: list[dict[str, Any]]) -> str:
    """The results as CSV."""
    return csv_table(rows, COLUMNS)


def row_label(row: dict[str, Any]) -> str:
    """A figure's tick label: scenario, victim and the variant without its merge op (the panel
    names the merge op), one per line."""
    variant = ",".join(
        p for p in (row.get("variant") or "").split(",") if p and not p.startswith("merge.op=")
    )
    return "\n".join(x for x in (row["scenario"], row["victim"], variant) if x)


def by_merge(rows: list[dict[str, Any]]) -> dict[str, list[tuple[str, dict[str, Any]]]]:
    """Done rows grouped into one panel per merge op: ``{"merge: ties": [(label, row), ...]}``."""
    panels: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for r in rows:
        if r["status"] == "done":
            panels.setdefault(f"merge: {r['merge']}", []).append((row_label(r), r))
    return panels


def plot_headline(rows: list[dict[str, Any]]) -> bytes | None:
    """One panel per merge op: the victim's accuracy clean, released (or attacked) and after
    merging, and the others' mean after merging, per scenario."""
    panels = by_merge(rows)
    if not panels:
        return None
    series = [
        ("clean expert", "victim_clean"),
        ("release/attacked", "victim_release"),
        ("victim after merge", "victim_merged"),
        ("others after merge", "others_merged"),
    ]
    return bar_panels(panels, series, title="Victim accuracy by scenario")
