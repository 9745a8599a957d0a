"""Run names and scenario factors of the quickstart's plan, the report figures' size and the
terminal results table's width (no Ray, no MLflow)."""

from __future__ import annotations

import io
import random

from e2e import REPO
from PIL import Image
from rich.console import Console

from mergesec.cli import _results_table
from mergesec.orchestrator.plan import build_plan
from mergesec.orchestrator.run_facts import describe_plan
from mergesec.orchestrator.spec import load_study
from mergesec.plots import MAX_WIDTH_PX
from mergesec.report.results import plot_headline
from mergesec.report.scale import plot_scenario_merge

QUICKSTART = REPO / "conf" / "quickstart.yaml"
SCENARIOS = [
    "unprotected",
    "backdoor-watched",
    "params",
    "params+aga",
    "mergelock",
    "trap2+rescale",
]


def test_quickstart_runs_are_named_in_the_study_words():
    study = load_study(QUICKSTART)
    plan = build_plan(study)
    facts = describe_plan(plan, study)
    names = [f.name for f in facts.values()]
    assert len(set(names)) == len(names) == len(plan.nodes)
    for expected in (
        "params+aga · rotten_tomatoes · ties · merged eval",
        "params+aga · rotten_tomatoes · task_arithmetic · merge",
        "rotten_tomatoes expert (poisoned: cf, 20%)",
        "rotten_tomatoes release (params) · shared by 2 scenarios",
        "rotten_tomatoes release (params) + aga",
        "bbc_news expert · shared by 8 scenarios",
        "backdoor-watched · rotten_tomatoes · ties · merge · weightwatch",
    ):
        assert expected in names, expected
    merged = {f.name: f for f in facts.values() if f.role == "merged eval"}
    assert len(merged) == len(plan.rows) == 16
    f = merged["params+aga · rotten_tomatoes · ties · merged eval"]
    assert f.factors == {
        "scenario": "params+aga",
        "variant": "merge.op=ties",
        "victim": "rotten_tomatoes",
        "protect_op": "params",
        "attack_op": "aga",
        "poison": "none",
        "merge_op": "ties",
        "merge_space": "full",
        "seed": "0",
    }
    poisoned = next(
        f for f in facts.values() if f.name.startswith("rotten_tomatoes expert (poisoned")
    )
    assert poisoned.factors["poison"] == "cf, 20%"
    assert poisoned.factors["scenario"] == "backdoor-watched"


def _rows(n_ops: int) -> list[dict]:
    rnd = random.Random(0)
    return [
        {
            "variant": f"merge.op={op}",
            "scenario": sc,
            "victim": "sentiment",
            "merge": op,
            "coefficient": 0.5,
            "victim_clean": 0.9,
            "victim_release": rnd.random(),
            "victim_merged": rnd.random(),
            "victim_merged_norm": rnd.random(),
            "others_merged": rnd.random(),
            "status": "done",
        }
        for op in ["task_arithmetic", "ties", "dare", "breadcrumbs"][:n_ops]
        for sc in SCENARIOS + [f"{s}-b" for s in SCENARIOS]
    ]


def test_report_figures_have_one_panel_per_merge_op_and_fit_1600_px():
    for plot in (plot_headline, plot_scenario_merge):
        one = Image.open(io.BytesIO(plot(_rows(1))))
        two = Image.open(io.BytesIO(plot(_rows(2))))
        assert one.width <= MAX_WIDTH_PX and two.width <= MAX_WIDTH_PX
        assert two.height > 1.7 * one.height, "a second merge op adds a panel"


def test_terminal_results_table_fits_120_columns():
    console = Console(width=120, record=True)
    console.print(_results_table(_rows(2)))
    text = console.export_text()
    assert max(len(line.rstrip()) for line in text.splitlines()) <= 120
    assert "…" not in text and "backdoor-watched-b" in text and "task_arithmetic" in text


def test_descriptions_lead_with_headline_and_link_inputs_by_name():
    from mergesec.orchestrator.node import Node
    from mergesec.orchestrator.run_facts import RunFacts
    from mergesec.orchestrator.run_notes import linked_runs, node_note

    node = Node("evaluate", "accuracy", "1", {}, {"model": "m" * 16})
    facts = RunFacts(
        "params+aga · rotten_tomatoes · ties · merged eval",
        "merged eval",
        {"scenario": "params+aga"},
    )
    note = node_note(
        facts,
        node,
        "7",
        [("model", "params+aga · sentiment · ties · merge", "abc123"), ("reference", "x", None)],
        headline={"victim/accuracy_merged": 0.5, "merge/coefficient": 0.3},
        error="ValueError: `bad` thing",
    )
    assert note.startswith("Headline: merged **0.500** · coefficient **0.300**")
    assert linked_runs(note) == [("7", "abc123")]
    assert "[params+aga · sentiment · ties · merge](#/experiments/7/runs/abc123)" in note
    assert "x (no run)" in note and "**Failed:** `ValueError: 'bad' thing`" in note
    assert "scenario: `params+aga`" in note
