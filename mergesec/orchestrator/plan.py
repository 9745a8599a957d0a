"""A validated study -> the DAG of nodes that computes it, deduplicated by content hash.

For every grid variant of the study:

    finetune(d)            one clean expert per dataset d
    evaluate(finetune(d))  its standalone test accuracy (the reference for normalised accuracy)
    for each scenario and victim v:
        release  = finetune(v) | protect(finetune(v)) | protect(trains from the base on v)
        victim   = release | attack(release)
        evaluate(victim)                 when it differs from the clean expert
        merge(victim, finetune(d≠v)...)  the merge op with its own settings
        evaluate(merge)                  every dataset, normalised by the clean experts

Identical nodes (same step, op, version, params and inputs) are one node, so scenarios that share a
clean expert train it once and the unprotected merge is computed once for every victim.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergesec.orchestrator.node import Node
from mergesec.orchestrator.spec import DatasetSpec, OpCall, Study, StudySpec


@dataclass
class PlanRow:
    """One line of the results table: a (variant, scenario, victim) and the nodes that answer it."""

    variant: str
    scenario: str
    victim: str
    merge_op: str
    victim_eval: str
    merge_node: str
    merge_eval: str
    expert_evals: dict[str, str]


@dataclass
class Plan:
    study: str
    nodes: dict[str, Node] = field(default_factory=dict)
    rows: list[PlanRow] = field(default_factory=list)

    def add(self, node: Node, **labels: str) -> Node:
        existing = self.nodes.get(node.id)
        if existing is None:
            self.nodes[node.id] = existing = node
        for k, v in labels.items():
            existing.add_label(k, v)
        return existing

    def topological(self) -> list[Node]:
        # Insertion order is already topological: a node is added after its inputs.
        return list(self.nodes.values())

    def descendants(self, node_id: str) -> set[str]:
        children: dict[str, list[str]] = {}
        for n in self.nodes.values():
            for up in n.inputs.values():
                children.setdefault(up, []).append(n.id)
        out: set[str] = set()
        stack = [node_id]
        while stack:
            for c in children.get(stack.pop(), []):
                if c not in out:
                    out.add(c)
                    stack.append(c)
        return out


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def dataset_ref(d: DatasetSpec) -> dict[str, Any]:
    """What identifies a dataset in node params: its URI, column mapping and, for files, a hash."""
    ref: dict[str, Any] = {"uri": d.uri}
    if d.columns:
        ref["columns"] = dict(d.columns)
    p = Path(d.uri)
    if not d.uri.startswith(("builtin:", "hf:")) and p.is_file():
        ref["sha256"] = _file_hash(p)
    return ref


def _op_params(step: str, call_op: str, params: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    from mergesec.tasks.registry import get_op, validate_params

    op = get_op(step, call_op)
    return op.version, validate_params(op, params)


def build_plan(study: Study) -> Plan:
    from mergesec.data import dataset_slug
    from mergesec.models.hub import model_identity

    plan = Plan(study.name)
    for label, spec in study.variants:
        variant = ",".join(f"{k}={v}" for k, v in label.items())
        _plan_variant(plan, spec, variant, model_identity(spec.base), dataset_slug)
    return plan


def _plan_variant(plan: Plan, spec: StudySpec, variant: str, base_id: str, slug_of) -> None:
    base = {"base": spec.base, "base_id": base_id}
    datasets = [dataset_ref(d) for d in spec.dataset_specs()]
    by_uri = {d["uri"]: d for d in datasets}
    ft_version, ft_params = _op_params("finetune", spec.finetune.mode, spec.finetune.params)
    eval_version, eval_params = _op_params(
        "evaluate", "accuracy", {"batch_size": spec.evaluate.batch_size}
    )

    def evaluate(
        model: Node, dsets: list[dict[str, Any]], refs: dict[str, str] | None = None, **labels: str
    ) -> Node:
        inputs = {"model": model.id} | {f"reference.{k}": v for k, v in (refs or {}).items()}
        params = {"datasets": dsets, "split": spec.evaluate.split, "op": eval_params}
        return plan.add(Node("evaluate", "accuracy", eval_version, params, inputs), **labels)

    experts: dict[str, Node] = {}
    expert_evals: dict[str, str] = {}
    for d in datasets:
        slug = slug_of(d["uri"])
        params = base | {"dataset": d, "op": ft_params}
        experts[d["uri"]] = plan.add(
            Node("finetune", spec.finetune.mode, ft_version, params, {}), what=slug
        )
        expert_evals[slug] = evaluate(experts[d["uri"]], [d], what=slug).id

    m_version, m_params = _op_params("merge", spec.merge.op, spec.merge.params)
    for name, sc in spec.scenarios.items():
        for v_uri in spec.victim_uris():
            v_slug = slug_of(v_uri)
            tag = f"{name}[{v_slug}]" + (f"{{{variant}}}" if variant else "")
            victim = experts[v_uri]
            if sc.protect is not None:
                victim = _protect(
                    plan,
                    sc.protect,
                    base,
                    by_uri[v_uri],
                    spec,
                    ft_params,
                    experts[v_uri],
                    v_slug,
                    tag,
                )
            if sc.attack is not None:
                victim = _attack(
                    plan, sc.attack, base, by_uri[v_uri], victim, experts[v_uri], v_slug, tag
                )
            victim_eval = evaluate(victim, [by_uri[v_uri]], what=v_slug, scenario=tag).id
            members = {
                f"expert.{slug_of(u)}": (victim if u == v_uri else experts[u]).id for u in by_uri
            }
            merge = plan.add(
                Node(
                    "merge",
                    spec.merge.op,
                    m_version,
                    base | {"datasets": datasets, "op": m_params},
                    members,
                ),
                what=f"{spec.merge.op}",
                scenario=tag,
            )
            merge_eval = evaluate(merge, datasets, expert_evals, what="merged", scenario=tag)
            plan.rows.append(
                PlanRow(
                    variant,
                    name,
                    v_uri,
                    spec.merge.op,
                    victim_eval,
                    merge.id,
                    merge_eval.id,
                    dict(expert_evals),
                )
            )


def _protect(
    plan: Plan,
    call: OpCall,
    base: dict,
    dataset: dict,
    spec: StudySpec,
    ft_params: dict,
    expert: Node,
    slug: str,
    tag: str,
) -> Node:
    from mergesec.tasks.registry import get_op

    version, params = _op_params("protect", call.op, call.params)
    if "trains" in get_op("protect", call.op).traits:
        node_params = base | {"dataset": dataset, "finetune": ft_params, "op": params}
        return plan.add(Node("protect", call.op, version, node_params, {}), what=slug, scenario=tag)
    return plan.add(
        Node("protect", call.op, version, base | {"op": params}, {"expert": expert.id}),
        what=slug,
        scenario=tag,
    )


def _attack(
    plan: Plan,
    call: OpCall,
    base: dict,
    dataset: dict,
    release: Node,
    clean: Node,
    slug: str,
    tag: str,
) -> Node:
    version, params = _op_params("attack", call.op, call.params)
    node_params = base | {"dataset": dataset, "op": params}
    # ``reference`` is the clean expert, read only for diagnostics the attacker would not have.
    inputs = {"release": release.id, "reference": clean.id}
    return plan.add(Node("attack", call.op, version, node_params, inputs), what=slug, scenario=tag)
