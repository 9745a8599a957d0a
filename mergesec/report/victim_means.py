"""The Trap² paper's layout (its Table 2): per merge op (and space), the protected task's merged
accuracy averaged over the victims, one column per scenario (so the protected value sits next to
the unprotected one), with references averaged over the same victims on every row:

- ``victim_left_out``: the other experts merged without the victim, read with the victim's head
  (planned with ``references: [left_out]``), what a free-rider gets without the release. The
  head is each scenario's own victim's, so where scenarios differ the row has one
  ``victim_left_out:<scenario>`` mean per scenario instead;
- ``victim_majority``: the victim's majority-class rate on its test split;
- ``victim_base_val``: the base model with the victim's head, i.e. s = 0 of the clean expert's
  scale curve (drawn with ``diagnostics: {scale_curve: true}``). Scale curves are measured on the
  validation split, so this reference is the only one not on the test split.

A mean is given only when every victim of the group has a value (``-`` otherwise), so a
half-finished study never shows a mean over a different set of victims than its neighbours.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mergesec.report.tables import markdown_table

REFERENCES = ("victim_left_out", "victim_majority")
BASE = "victim_base_val"


def _mean(values: Mapping[str, float], victims: set[str]) -> float | None:
    if not victims or set(values) != victims:
        return None
    return sum(values[v] for v in victims) / len(victims)


def base_accuracies(curves: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """victim -> accuracy at s = 0 of its clean expert's scale curve (the base with its head)."""
    out: dict[str, float] = {}
    for c in curves.values():
        if c.get("kind") != "clean":
            continue
        at0 = [p for p in c["curve"] if abs(float(p["s"])) < 1e-9]
        if at0:
            out[str(c["victim"])] = float(at0[0]["accuracy"])
    return out


def victim_means(
    rows: list[dict[str, Any]], curves: Mapping[str, Mapping[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """One row per (variant, merge op): ``victims`` (how many), the mean merged victim accuracy
    per scenario (keyed by the scenario's name) and the references' means."""
    base = base_accuracies(curves or {})
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    for r in rows:
        g = groups.setdefault(
            (r.get("variant") or "", str(r.get("merge"))),
            {"victims": set(), "merged": {}, "refs": {k: {} for k in REFERENCES}},
        )
        victim = str(r["victim"])
        g["victims"].add(victim)
        if r.get("victim_merged") is not None:
            g["merged"].setdefault(r["scenario"], {})[victim] = float(r["victim_merged"])
        for ref in REFERENCES:
            if r.get(ref) is not None:
                g["refs"][ref].setdefault(r["scenario"], {})[victim] = float(r[ref])
    scenarios = list(dict.fromkeys(r["scenario"] for r in rows))
    out = []
    for (variant, merge), g in groups.items():
        victims = g["victims"]
        row: dict[str, Any] = {"variant": variant, "merge": merge, "victims": len(victims)}
        for sc in scenarios:
            row[sc] = _mean(g["merged"].get(sc, {}), victims)
        for ref in REFERENCES:
            row |= _reference_means(ref, g["refs"][ref], victims)
        row[BASE] = _mean({v: base[v] for v in victims if v in base}, victims)
        out.append(row)
    return out


def _reference_means(
    ref: str, per_scenario: Mapping[str, Mapping[str, float]], victims: set[str]
) -> dict[str, float | None]:
    """``{ref: mean}`` when every scenario gives the reference the same mean; otherwise (the
    left-out merge is read with each scenario's own victim head) ``ref`` is ``None`` and each
    scenario's mean is ``"<ref>:<scenario>"``."""
    means = {sc: _mean(values, victims) for sc, values in per_scenario.items()}
    if len(set(means.values())) <= 1:
        return {ref: next(iter(means.values()), None)}
    return {ref: None} | {f"{ref}:{sc}": m for sc, m in means.items()}


def victim_means_markdown(means: list[dict[str, Any]]) -> str:
    """The table, scenario columns in the study's order, then the references."""
    if not means:
        return ""
    fixed = {"variant", "merge", "victims", *REFERENCES, BASE}
    keys = list(dict.fromkeys(k for m in means for k in m))
    per_scenario = [k for k in keys if k.split(":")[0] in REFERENCES and k not in fixed]
    scenarios = [k for k in means[0] if k not in fixed and k not in per_scenario]
    cols = ["variant", "merge", "victims", *scenarios, *REFERENCES, *per_scenario, BASE]
    return markdown_table(means, cols)
