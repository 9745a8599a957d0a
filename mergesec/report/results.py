"""The study's results: one row per (variant, scenario, victim) read back from the store, as a
table and as a figure."""

from __future__ import annotations

from typing import Any

from mergesec.data import dataset_slug
from mergesec.orchestrator.plan import Plan
from mergesec.orchestrator.store import Store
from mergesec.plots import png_bytes, pyplot
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
    "victim_left_out",
    "victim_majority",
    "status",
]


def _metrics(store: Store, node_id: str) -> dict[str, Any] | None:
    return store.read_metrics(node_id) if store.is_done(node_id) else None


def build_results(plan: Plan, store: Store) -> list[dict[str, Any]]:
    """One row per (variant, scenario, victim): accuracies before and after merging."""
    rows = []
    for r in plan.rows:
        v = dataset_slug(r.victim)
        clean = _metrics(store, r.expert_evals[v])
        release = _metrics(store, r.victim_eval)
        merged = _metrics(store, r.merge_eval)
        merge_node = _metrics(store, r.merge_node)
        row: dict[str, Any] = {
            "variant": r.variant,
            "scenario": r.scenario,
            "victim": v,
            "merge": r.merge_op,
            "coefficient": None,
            "victim_clean": None,
            "victim_release": None,
            "victim_merged": None,
            "victim_merged_norm": None,
            "others_merged": None,
            "victim_left_out": None,
            "victim_majority": None,
            "status": "done"
            if merged is not None
            else ("failed" if store.is_failed(r.merge_eval) else "missing"),
        }
        if clean:
            row["victim_clean"] = clean.get(f"accuracy/{v}")
            row["victim_majority"] = clean.get(f"majority/{v}")
        if r.left_out_eval is not None:
            left_out = _metrics(store, r.left_out_eval)
            row["victim_left_out"] = left_out.get(f"accuracy/{v}") if left_out else None
        if release:
            row["victim_release"] = release.get(f"accuracy/{v}")
        if merge_node:
            chosen = {
                k.split("/", 1)[1]: x for k, x in merge_node.items() if k.startswith("chosen/")
            }
            row["coefficient"] = chosen.get("coefficient")
            row.update({f"chosen_{k}": x for k, x in chosen.items() if k != "coefficient"})
        if merged:
            row["victim_merged"] = merged.get(f"accuracy/{v}")
            row["victim_merged_norm"] = merged.get(f"normalized/{v}")
            others = [
                x
                for k, x in merged.items()
                if k.startswith("accuracy/") and k not in {f"accuracy/{v}", "accuracy/mean"}
            ]
            row["others_merged"] = sum(others) / len(others) if others else None
            row["per_dataset"] = {
                k.split("/", 1)[1]: x for k, x in merged.items() if k.startswith("accuracy/")
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


def _short_variant(variant: str) -> str:
    """The variant as an extra label line, the merge op by its name alone (``ties``)."""
    parts = [
        p.split("=", 1)[1] if p.startswith("merge.op=") else p for p in variant.split(",") if p
    ]
    return "\n" + ",".join(parts) if parts else ""


def plot_headline(rows: list[dict[str, Any]]) -> bytes | None:
    """Grouped bars: the victim's accuracy standalone, released, and after merging, per scenario."""
    done = [r for r in rows if r["status"] == "done"]
    if not done:
        return None
    plt = pyplot()
    labels = [f"{r['scenario']}\n{r['victim']}" + _short_variant(r["variant"]) for r in done]
    series = [
        ("clean expert", "victim_clean"),
        ("release/attacked", "victim_release"),
        ("victim after merge", "victim_merged"),
        ("others after merge", "others_merged"),
    ]
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(done)), 4.2))
    width = 0.8 / len(series)
    for i, (name, key) in enumerate(series):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(done))]
        ax.bar(xs, [r.get(key) or 0.0 for r in done], width, label=name)
    ax.set_xticks(range(len(done)), labels, fontsize=7)
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7, ncols=4, loc="lower center", bbox_to_anchor=(0.5, 1.0))
    ax.set_title("Victim accuracy by scenario", pad=22)
    return png_bytes(fig)
