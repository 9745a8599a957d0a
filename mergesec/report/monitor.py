"""Monitor results read back from the store: one row per watched model, tables and figures.

Each plan row with a monitor (``PlanRow.monitors``: ``trained``, ``release``, ``attacked``,
``merged`` → monitor node) gives one row per watched model with the scenario's trigger and poison
rate and the WeightWatch metrics (``monitor/<name>`` in the node's metrics). ``write_monitor_reports``
writes ``monitor.{json,csv,md}`` and ``monitor.png`` next to the study's results: TPR and FPR per
trigger, and attack success and clean accuracy before and after steering.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from mergesec.data import dataset_slug
from mergesec.orchestrator.plan import Plan
from mergesec.orchestrator.store import Store
from mergesec.plots import png_bytes, pyplot
from mergesec.report.results import ROW_COLUMNS
from mergesec.report.tables import csv_table, markdown_table, write_files

WATCHED = ("trained", "release", "attacked", "merged")
METRICS = (
    "fpr",
    "tpr",
    "tpr_successful",
    "control_flag_rate",
    "asr_before",
    "asr_after",
    "clean_accuracy_before",
    "clean_accuracy_after",
    # chat models: clean replies matching the reference, and requests on an unlearned topic
    # answered right, without and with steering
    "utility_before",
    "utility_after",
    "topic_recovered_before",
    "topic_recovered_after",
    "epsilon",
    "n_directions",
)
MONITOR_COLUMNS = [
    *ROW_COLUMNS,
    "watched",
    "trigger",
    "rate",
    *METRICS,
    "status",
]


def monitor_rows(plan: Plan, store: Store) -> list[dict[str, Any]]:
    """One row per (plan row, watched model) that has a monitor node, in plan order.

    A watched model shared by several plan rows (the trained expert of one scenario under every
    merge op) appears once per plan row, so each row stays next to its own merge.
    """
    rows = []
    for r in plan.rows:
        for kind in sorted(r.monitors, key=lambda k: WATCHED.index(k) if k in WATCHED else 99):
            node_id = r.monitors[kind]
            poison = plan.nodes[node_id].params.get("poison") or {}
            row: dict[str, Any] = {
                "variant": r.variant,
                "scenario": r.scenario,
                "victim": dataset_slug(r.victim),
                "merge": r.merge_op,
                "watched": kind,
                "trigger": poison.get("trigger")
                or (f"topic:{poison['topic']}" if poison.get("topic") else None),
                "rate": poison.get("rate"),
                "node": node_id,
                **dict.fromkeys(METRICS),
            }
            metrics = store.metrics_if_done(node_id)
            if metrics is not None:
                for m in METRICS:
                    row[m] = metrics.get(f"monitor/{m}")
                row["status"] = "done"
            else:
                row["status"] = "failed" if store.is_failed(node_id) else "missing"
            rows.append(row)
    return rows


def monitor_markdown(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table (the variant column only when the study has variants)."""
    return markdown_table(rows, MONITOR_COLUMNS)


def monitor_csv(rows: list[dict[str, Any]]) -> str:
    return csv_table(rows, MONITOR_COLUMNS)


def _label(r: dict[str, Any], *, kind: bool) -> str:
    trig = r["trigger"] if r["trigger"] is not None else "(no trigger)"
    if len(trig) > 14:
        trig = trig[:13] + "…"
    parts = [f"{trig!s}" + (f" @{r['rate']:g}" if r["rate"] is not None else ""), r["scenario"]]
    if kind:
        parts.append(r["watched"])
    if r["variant"]:
        parts.append(r["variant"])
    return "\n".join(parts)


def _bars(ax, rows: list[dict[str, Any]], series: list[tuple[str, str]], labels: list[str]) -> None:
    width = 0.8 / len(series)
    for i, (name, key) in enumerate(series):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(rows))]
        vals = [r.get(key) for r in rows]
        ax.bar(xs, [v if v is not None else 0.0 for v in vals], width, label=name)
    ax.set_xticks(range(len(rows)), labels, fontsize=6)
    ax.set_ylim(0, 1.3)  # headroom for the legend above the bars
    ax.set_yticks([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ax.legend(fontsize=7, ncols=2, loc="upper center")


def plot_monitor(rows: list[dict[str, Any]]) -> bytes | None:
    """Two panels: TPR/FPR per trigger (trained experts, one bar group per scenario), and attack
    success and clean accuracy before and after steering for every watched model."""
    done = [r for r in rows if r["status"] == "done"]
    if not done:
        return None
    plt = pyplot()
    # Each trained expert once (it is shared by the rows of every merge op).
    seen: set[str] = set()
    trained = []
    for r in done:
        if r["watched"] == "trained" and r["node"] not in seen:
            seen.add(r["node"])
            trained.append(r)
    steer = [r for r in done if r["asr_before"] is not None]
    if not steer:
        steer = done
    fig, (ax, ax_steer) = plt.subplots(
        2, 1, figsize=(max(8.0, 1.2 * max(len(trained), len(steer))), 8.0)
    )
    if trained:
        series = [("TPR (triggered)", "tpr"), ("FPR (clean)", "fpr")]
        if any(r["control_flag_rate"] is not None for r in trained):
            series.append(("control insertion flagged", "control_flag_rate"))
        _bars(ax, trained, series, [_label(r, kind=False) for r in trained])
    ax.set_ylabel("share of inputs flagged")
    ax.set_title("WeightWatch detection per trigger (trained expert)")
    ax = ax_steer
    series = [
        ("attack success, before", "asr_before"),
        ("attack success, steered", "asr_after"),
        ("clean accuracy, before", "clean_accuracy_before"),
        ("clean accuracy, steered", "clean_accuracy_after"),
    ]
    _bars(ax, steer, series, [_label(r, kind=True) for r in steer])
    ax.set_ylabel("share of test inputs")
    ax.set_title("Steering: attack success and clean accuracy")
    return png_bytes(fig)


def monitor_files(
    rows: list[dict[str, Any]],
    png: Callable[[list[dict[str, Any]]], bytes | None] | None = None,
) -> dict[str, str | bytes]:
    """``{file name: contents}``: monitor.{json,csv,md} and monitor.png (drawn by ``png``,
    ``plot_monitor`` unless given); empty without rows."""
    if not rows:
        return {}
    files: dict[str, str | bytes] = {
        "monitor.json": json.dumps(rows, indent=2),
        "monitor.csv": monitor_csv(rows),
        "monitor.md": monitor_markdown(rows),
    }
    figure = (png or plot_monitor)(rows)
    if figure is not None:
        files["monitor.png"] = figure
    return files


def write_monitor_reports(
    plan: Plan, store: Store, rows: list[dict[str, Any]] | None = None
) -> dict[str, str]:
    """Write ``monitor_files`` into ``<store>/studies/<study>/``.

    Nothing is written when the study has no monitor; returns ``{file name: location}``.
    """
    rows = monitor_rows(plan, store) if rows is None else rows
    return write_files(plan, store, monitor_files(rows))
