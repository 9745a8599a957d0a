"""Results of a study read back from the store: tables (Markdown, CSV, JSON) and plots."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from typing import Any

from mergesec.orchestrator.plan import Plan
from mergesec.orchestrator.store import Store
from mergesec.report_scale import png_bytes, pyplot

COLUMNS = [
    "variant",
    "scenario",
    "victim",
    "merge",
    "coefficient",
    "victim_clean",
    "victim_release",
    "victim_merged",
    "victim_merged_norm",
    "others_merged",
    "status",
]


def _metrics(store: Store, node_id: str) -> dict[str, Any] | None:
    return store.read_metrics(node_id) if store.is_done(node_id) else None


def build_results(plan: Plan, store: Store) -> list[dict[str, Any]]:
    """One row per (variant, scenario, victim): accuracies before and after merging."""
    from mergesec.data import dataset_slug

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
            "status": "done"
            if merged is not None
            else ("failed" if store.is_failed(r.merge_eval) else "missing"),
        }
        if clean:
            row["victim_clean"] = clean.get(f"accuracy/{v}")
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


def full_markdown(
    rows: list[dict[str, Any]],
    monitors: Sequence[dict[str, Any]] = (),
    curves: Mapping[str, Mapping[str, Any]] | None = None,
) -> str:
    """The results table, then the monitors' table and the scale curves' sharpness, if any."""
    from mergesec.report_monitor import monitor_markdown
    from mergesec.report_scale import scale_curve_table

    text = markdown(rows)
    if monitors:
        text += "\n## Monitors\n\n" + monitor_markdown(list(monitors))
    if curves:
        text += "\n## Loss along the scaling direction\n\n" + scale_curve_table(curves)
    return text


def fmt_cell(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.3f}"
    return str(x)


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """``rows`` as a Markdown table of ``columns``; the ``variant`` column only when some row has
    a variant."""
    cols = [c for c in columns if c != "variant" or any(r.get("variant") for r in rows)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(fmt_cell(r.get(c)) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def csv_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({c: r.get(c) for c in columns})
    return buf.getvalue()


def markdown(rows: list[dict[str, Any]]) -> str:
    return markdown_table(rows, COLUMNS)


def to_csv(rows: list[dict[str, Any]]) -> str:
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


def report_files(plan: Plan, store: Store, rows: list[dict[str, Any]]) -> dict[str, str | bytes]:
    """``{file name: contents}`` of a study's report: results.{json,csv,md}, results.png (victim by
    scenario), results_by_merge.png (one panel per merge op), monitor.* when the study watches
    models, and scale_curves.png when it draws scale curves. Each source is read from the store
    once."""
    from mergesec.report_monitor import monitor_files, monitor_rows
    from mergesec.report_scale import load_scale_curves, plot_scale_curves, plot_scenario_merge

    monitors = monitor_rows(plan, store)
    curves = load_scale_curves(plan, store)
    files: dict[str, str | bytes | None] = {
        "results.json": json.dumps(rows, indent=2),
        "results.csv": to_csv(rows),
        "results.md": full_markdown(rows, monitors, curves),
        "results.png": plot_headline(rows),
        "results_by_merge.png": plot_scenario_merge(rows),
    }
    if curves:
        files["scale_curves.png"] = plot_scale_curves({k: c["curve"] for k, c in curves.items()})
    files.update(monitor_files(monitors))
    return {name: data for name, data in files.items() if data is not None}


def write_files(plan: Plan, store: Store, files: Mapping[str, str | bytes]) -> dict[str, str]:
    """Write each file into ``<store>/studies/<study>/``; returns ``{file name: location}``."""
    out = {}
    for name, data in files.items():
        rel = store.study_rel(plan.study, name)
        if isinstance(data, bytes):
            store.write_bytes(rel, data)
        else:
            store.write_text(rel, data)
        out[name] = store.location(rel)
    return out


def write_reports(plan: Plan, store: Store, rows: list[dict[str, Any]]) -> dict[str, str]:
    """Write ``report_files`` into ``<store>/studies/<study>/``; returns ``{file name: location}``."""
    return write_files(plan, store, report_files(plan, store, rows))
