"""What each node's MLflow run is called and which scenario factors it carries, in the study's words.

``describe_plan`` names every node of a plan from its role in the study
(``params+aga · sentiment · ties · merged eval``, ``sentiment expert (poisoned: cf, 20%)``,
``sentiment release (params) · shared by 2 scenarios``) and gives it the factors of the scenarios
it belongs to (scenario, variant, victim, protect and attack op, poison, merge op, seed), which go
to MLflow as separate tags and params so the UI can filter, group and plot by them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from mergesec.data import dataset_slug
from mergesec.orchestrator.node import Node
from mergesec.orchestrator.plan import Plan, PlanRow
from mergesec.orchestrator.spec import Study, StudySpec

# Scenario factors, in the order the UI lists them.
FACTORS = (
    "scenario",
    "variant",
    "victim",
    "protect_op",
    "attack_op",
    "poison",
    "merge_op",
    "merge_space",
    "seed",
)
ROLES = (
    "expert",
    "release",
    "attacked",
    "merge",
    "merged eval",
    "eval",
    "monitor",
    "scale curve",
)


@dataclass
class RunFacts:
    """A node's run name, role, scenario factors and the plan rows whose results use it."""

    name: str
    role: str
    factors: dict[str, str] = field(default_factory=dict)
    rows: list[int] = field(default_factory=list)  # indices into ``Plan.rows``
    variant: str = ""  # the grid variant(s) in short, without the merge op


def poison_text(poison: dict[str, Any] | None) -> str:
    """``cf, 20%`` for a trigger ``cf`` at rate 0.2; empty when not poisoned."""
    if not poison:
        return ""
    return f"{poison.get('trigger')}, {float(poison.get('rate', 0)):.0%}"


def _joined(values: Iterable[str], most: int = 3, noun: str = "scenarios") -> str:
    vals = list(dict.fromkeys(v for v in values if v))
    if len(vals) <= most:
        return " + ".join(vals)
    return f"{len(vals)} {noun}"


def short_variant(label: dict[str, str], most: int = 40) -> str:
    """A grid variant for a run name: without the merge op (named on its own), each value cut to
    ``most`` characters."""
    parts = []
    for k, v in label.items():
        if k in ("merge", "merge.op"):
            continue
        text = f"{k}={v}"
        parts.append(text if len(text) <= most else text[: most - 1] + "…")
    return ",".join(parts)


def row_factors(row: PlanRow, spec: StudySpec) -> dict[str, str]:
    """The scenario factors of one plan row."""
    sc = spec.scenarios[row.scenario]
    seed = spec.finetune.params.get("seed")
    return {
        "scenario": row.scenario,
        "variant": row.variant or "-",
        "victim": dataset_slug(row.victim),
        "protect_op": sc.protect.op if sc.protect else "none",
        "attack_op": sc.attack.op if sc.attack else "none",
        "poison": poison_text(sc.poison.model_dump(exclude_none=True) if sc.poison else None)
        or "none",
        "merge_op": row.merge_op,
        "merge_space": spec.merge.space,
        "seed": "-" if seed is None else str(seed),
    }


class _Namer:
    def __init__(self, plan: Plan, study: Study):
        self.plan = plan
        specs = {",".join(f"{k}={v}" for k, v in label.items()): s for label, s in study.variants}
        short = {
            ",".join(f"{k}={v}" for k, v in label.items()): short_variant(label)
            for label, _ in study.variants
        }
        self.row_factors = [row_factors(r, specs[r.variant]) for r in plan.rows]
        self.row_short = [short[r.variant] for r in plan.rows]
        self.merge_evals = {r.merge_eval: i for i, r in enumerate(plan.rows)}
        by_label: dict[str, list[int]] = {}
        for i, r in enumerate(plan.rows):
            by_label.setdefault(r.label, []).append(i)
        # rows a node is labelled with (it belongs to the scenario) and rows that use it at all
        self.labelled: dict[str, list[int]] = {
            n.id: [i for lab in n.labels.get("scenario", []) for i in by_label.get(lab, [])]
            for n in plan.nodes.values()
        }
        self.used: dict[str, set[int]] = {i: set() for i in plan.nodes}
        for i, r in enumerate(plan.rows):
            for top in (
                r.merge_eval,
                r.victim_eval,
                *r.monitors.values(),
                *r.scale_curves.values(),
            ):
                for n in self._closure(top):
                    self.used[n].add(i)
        self.names: dict[str, str] = {}
        self.scenario_named: set[str] = set()  # names that start with their scenario

    def _closure(self, node_id: str) -> set[str]:
        out, stack = set(), [node_id]
        while stack:
            n = stack.pop()
            if n not in out and n in self.plan.nodes:
                out.add(n)
                stack.extend(self.plan.nodes[n].inputs.values())
        return out

    def _rows_prefix(self, rows: list[int]) -> str:
        """``scenario · victim · merge op`` of the rows a merge-level node belongs to."""
        f = [self.row_factors[i] for i in rows]
        parts = [
            _joined(x["scenario"] for x in f),
            _joined((x["victim"] for x in f), noun="victims"),
            _joined((x["merge_op"] for x in f), noun="merge ops"),
        ]
        extra = _joined((self.row_short[i] for i in rows), 2, "variants")
        return " · ".join(p for p in [*parts, extra] if p)

    def _shared(self, node_id: str) -> str:
        scenarios = {self.row_factors[i]["scenario"] for i in self.used[node_id]}
        return f" · shared by {len(scenarios)} scenarios" if len(scenarios) > 1 else ""

    def _poisoned(self, node: Node) -> str:
        p = poison_text(node.params.get("poison"))
        if not p:
            for up in node.inputs.values():
                upn = self.plan.nodes.get(up)
                if upn is not None and upn.step == "finetune":
                    p = poison_text(upn.params.get("poison"))
        return p

    def role(self, node: Node) -> str:
        if node.step == "finetune":
            return "expert"
        if node.step == "protect":
            return "release"
        if node.step == "attack":
            return "attacked"
        if node.step == "merge":
            return "merge"
        if node.step == "monitor":
            return "monitor"
        if node.step == "evaluate" and node.op == "scale_curve":
            return "scale curve"
        if node.id in self.merge_evals:
            return "merged eval"
        return "eval"

    def name(self, node: Node) -> str:
        """Evaluations, monitors and scale curves are named after their model; nodes that do not
        name a scenario and serve several say how many."""
        if node.id in self.names:
            return self.names[node.id]
        model = self.plan.nodes.get(node.inputs.get("model", node.inputs.get("release", "")))
        slug = (node.labels.get("what") or [node.id[:8]])[0].split(":")[0]
        rows = self.labelled[node.id] or sorted(self.used[node.id])
        role = self.role(node)
        scenario_named = role in ("merge", "merged eval")
        if role == "expert":
            p = poison_text(node.params.get("poison"))
            name = f"{slug} expert" + (f" (poisoned: {p})" if p else "")
        elif role == "release":
            p = self._poisoned(node)
            name = f"{slug} release ({node.op}" + (f", poisoned: {p})" if p else ")")
        elif role == "merge":
            name = f"{self._rows_prefix(rows)} · merge"
        elif role == "merged eval":
            name = f"{self._rows_prefix(rows)} · merged eval"
        elif role == "attacked" and model is not None and model.step == "merge":
            name, scenario_named = f"{self._rows_prefix(rows)} · merged + {node.op}", True
        elif model is not None:
            inner, shared = self.name(model), self._shared(model.id)
            scenario_named = model.id in self.scenario_named
            if shared and not scenario_named and inner.endswith(shared):
                inner = inner[: -len(shared)]
            suffix = {"attacked": f"+ {node.op}", "eval": "· eval", "monitor": f"· {node.op}"}
            name = f"{inner} {suffix.get(role, '· scale curve')}"
        else:
            name = node.title()
        if scenario_named:
            self.scenario_named.add(node.id)
        else:
            name += self._shared(node.id)
        self.names[node.id] = name
        return name

    def factors(self, node_id: str) -> dict[str, str]:
        rows = self.labelled[node_id]
        if not rows:  # a clean expert or its evaluation: only study-wide factors
            used = sorted(self.used[node_id])
            return {
                k: ", ".join(dict.fromkeys(self.row_factors[i][k] for i in used))
                for k in ("variant", "seed")
                if used
            }
        return {k: ", ".join(dict.fromkeys(self.row_factors[i][k] for i in rows)) for k in FACTORS}


def describe_plan(plan: Plan, study: Study) -> dict[str, RunFacts]:
    """Every node's ``RunFacts``; names are unique within the plan."""
    namer = _Namer(plan, study)
    facts = {
        node.id: RunFacts(
            name=namer.name(node),
            role=namer.role(node),
            factors=namer.factors(node.id),
            rows=sorted(set(namer.labelled[node.id]) | namer.used[node.id]),
            variant=", ".join(
                dict.fromkeys(namer.row_short[i] for i in sorted(namer.used[node.id]))
            ),
        )
        for node in plan.topological()
    }
    _make_unique(facts)
    return facts


def _make_unique(facts: dict[str, RunFacts]) -> None:
    """Nodes that would share a name get the first factor that tells them apart appended (their
    variant, victim, ...), or else the start of their node id."""
    by_name: dict[str, list[str]] = {}
    for node_id, f in facts.items():
        by_name.setdefault(f.name, []).append(node_id)
    for ids in by_name.values():
        if len(ids) < 2:
            continue
        for key in ("variant", "victim", "scenario", "seed"):
            values = [
                facts[i].variant if key == "variant" else facts[i].factors.get(key, "") for i in ids
            ]
            if all(values) and len(set(values)) == len(ids):
                for i, v in zip(ids, values, strict=True):
                    facts[i].name += f" [{v}]"
                break
        else:
            for i in ids:
                facts[i].name += f" [{i[:6]}]"
