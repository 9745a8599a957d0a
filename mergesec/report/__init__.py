"""A study's report, read back from the store after a run: results tables (Markdown, CSV, JSON),
the monitors' and scale curves' sections, and figures.

- ``results``: one row per (variant, scenario, victim) and the headline figure;
- ``monitor``: one row per watched model (WeightWatch) and its figure;
- ``scale``: scale curves of Trap²-style protections, and the per-merge-op figure;
- ``tables``: Markdown and CSV tables, and the writer of the report files;
- ``victim_means``: the Trap² paper's layout, merged accuracy averaged over victims per merge op.

The orchestrator never imports this package; the command line calls ``write_reports`` when a run
ends, and ``report_files`` for ``mergesec report``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from mergesec.orchestrator.plan import Plan
from mergesec.orchestrator.store import Store
from mergesec.plots import plot_scale_curves
from mergesec.report.figure_cache import cached_figure
from mergesec.report.monitor import monitor_files, monitor_markdown, monitor_rows, plot_monitor
from mergesec.report.results import build_results, markdown, plot_headline, to_csv
from mergesec.report.scale import load_scale_curves, plot_scenario_merge, scale_curve_table
from mergesec.report.tables import write_files
from mergesec.report.victim_means import victim_means, victim_means_markdown

__all__ = ["build_results", "full_markdown", "report_files", "write_reports"]


def full_markdown(
    rows: list[dict[str, Any]],
    monitors: Sequence[dict[str, Any]] = (),
    curves: Mapping[str, Mapping[str, Any]] | None = None,
    means: list[dict[str, Any]] | None = None,
) -> str:
    """The results table, the means over victims (``victim_means``, computed unless given) when a
    merge op has several victims, then the monitors' table and the scale curves' sharpness."""
    text = markdown(rows)
    means = victim_means(rows, curves) if means is None else means
    if any(m["victims"] > 1 for m in means):
        text += "\n## Averaged over victims\n\n" + victim_means_markdown(means)
    if monitors:
        text += "\n## Monitors\n\n" + monitor_markdown(list(monitors))
    if curves:
        text += "\n## Loss along the scaling direction\n\n" + scale_curve_table(curves)
    return text


def report_files(plan: Plan, store: Store, rows: list[dict[str, Any]]) -> dict[str, str | bytes]:
    """``{file name: contents}`` of a study's report: results.{json,csv,md}, victim_means.json
    (``report.victim_means``), results.png (victim by scenario), results_by_merge.png (one panel
    per merge op), monitor.* when the study watches models, and scale_curves.png when it draws
    scale curves. Each source is read from the store once; a figure already in the study's
    folder that was drawn from the same data by the same code is kept (``figure_cache``)."""

    def figure(name: str, draw: Callable[[Any], bytes | None], inputs: Any) -> bytes | None:
        previous = store.read_bytes(store.study_rel(plan.study, name))
        return cached_figure(previous, draw, inputs)

    monitors = monitor_rows(plan, store)
    curves = load_scale_curves(plan, store)
    means = victim_means(rows, curves)
    files: dict[str, str | bytes | None] = {
        "results.json": json.dumps(rows, indent=2),
        "victim_means.json": json.dumps(means, indent=2),
        "results.csv": to_csv(rows),
        "results.md": full_markdown(rows, monitors, curves, means),
        "results.png": figure("results.png", plot_headline, rows),
        "results_by_merge.png": figure("results_by_merge.png", plot_scenario_merge, rows),
    }
    if curves:
        lines = {k: c["curve"] for k, c in curves.items()}
        files["scale_curves.png"] = figure("scale_curves.png", plot_scale_curves, lines)
    files.update(monitor_files(monitors, png=lambda r: figure("monitor.png", plot_monitor, r)))
    return {name: data for name, data in files.items() if data is not None}


def write_reports(
    plan: Plan, store: Store, rows: list[dict[str, Any]] | None = None
) -> dict[str, str]:
    """Write ``report_files`` into ``<store>/studies/<study>/`` (``rows`` default to
    ``build_results``); returns ``{file name: location}``.

    Its signature fits ``run_study``'s ``on_finish``.
    """
    rows = build_results(plan, store) if rows is None else rows
    return write_files(plan, store, report_files(plan, store, rows))
