"""The paper-layout table: merged victim accuracy averaged over victims per merge op."""

from __future__ import annotations

import pytest

from mergesec.report import full_markdown
from mergesec.report.victim_means import victim_means, victim_means_markdown


def _row(scenario, victim, merge, merged, left_out=None, majority=None):
    return {
        "variant": f"merge.op={merge}", "scenario": scenario, "victim": victim, "merge": merge,
        "victim_merged": merged, "victim_left_out": left_out, "victim_majority": majority,
    }  # fmt: skip


ROWS = [
    _row("unprotected", "a", "ta", 0.8, 0.5, 0.5),
    _row("unprotected", "b", "ta", 0.6, 0.3, 0.25),
    _row("trap2", "a", "ta", 0.5, 0.5, 0.5),
    _row("trap2", "b", "ta", 0.2, 0.3, 0.25),
    _row("unprotected", "a", "ties", 0.7, 0.4, 0.5),
    _row("unprotected", "b", "ties", 0.5, None, 0.25),
    _row("trap2", "a", "ties", 0.4),
    _row("trap2", "b", "ties", None),  # not finished
]
CURVES = {
    "a: clean": {"kind": "clean", "victim": "a", "curve": [{"s": 0.0, "accuracy": 0.4}, {"s": 1.0, "accuracy": 0.9}]},
    "b: clean": {"kind": "clean", "victim": "b", "curve": [{"s": 0.0, "accuracy": 0.2}]},
    "trap2 a: release": {"kind": "release", "victim": "a", "curve": [{"s": 0.0, "accuracy": 0.1}]},
}  # fmt: skip


def test_means_over_victims_per_merge_with_references():
    ta, ties = victim_means(ROWS, CURVES)
    assert (ta["merge"], ta["victims"]) == ("ta", 2)
    assert ta["unprotected"] == pytest.approx(0.7) and ta["trap2"] == pytest.approx(0.35)
    assert ta["victim_left_out"] == pytest.approx(0.4)
    assert ta["victim_majority"] == pytest.approx(0.375)
    assert ta["victim_base_val"] == pytest.approx(0.3)  # s = 0 of the clean curves only
    # A mean needs every victim: an unfinished merge or a missing reference gives none.
    assert ties["unprotected"] == pytest.approx(0.6)
    assert ties["trap2"] is None and ties["victim_left_out"] is None
    assert victim_means(ROWS)[0]["victim_base_val"] is None  # no scale curves drawn


def test_the_table_and_the_report_section():
    table = victim_means_markdown(victim_means(ROWS, CURVES))
    header = table.splitlines()[0]
    assert header.index("unprotected") < header.index("trap2") < header.index("victim_left_out")
    assert "| ta | 2 | 0.700 | 0.350 | 0.400 | 0.375 | 0.300 |" in table
    assert "| ties | 2 | 0.600 | - | - | 0.375 | 0.300 |" in table  # the base is per victim
    assert "## Averaged over victims" in full_markdown(ROWS)
    one_victim = [r for r in ROWS if r["victim"] == "a"]
    assert "## Averaged over victims" not in full_markdown(one_victim)


def test_a_left_out_reference_that_differs_by_scenario_is_given_per_scenario():
    """The left-out merge is read with each scenario's victim head, so its mean can differ."""
    rows = [
        _row("unprotected", "a", "ta", 0.8, 0.5, 0.5),
        _row("unprotected", "b", "ta", 0.6, 0.3, 0.25),
        _row("trap2", "a", "ta", 0.5, 0.7, 0.5),
        _row("trap2", "b", "ta", 0.2, 0.5, 0.25),
    ]
    (ta,) = victim_means(rows)
    assert ta["victim_left_out"] is None
    assert ta["victim_left_out:unprotected"] == pytest.approx(0.4)
    assert ta["victim_left_out:trap2"] == pytest.approx(0.6)
    assert ta["victim_majority"] == pytest.approx(0.375)  # the same in both: one value
    header = victim_means_markdown([ta]).splitlines()[0]
    assert header.index("trap2") < header.index("victim_left_out:unprotected")
    assert "victim_majority:" not in header
