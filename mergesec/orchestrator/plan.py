"""A validated study -> the DAG of nodes that computes it, deduplicated by content hash.

For every grid variant of the study:

    finetune(d)            one clean expert per dataset d
    evaluate(finetune(d))  its standalone test accuracy (the reference for normalised accuracy)
    for each scenario and victim v:
        trained  = finetune(v) | finetune(v, poisoned data)
        release  = trained | protect(trained) | protect(trains from the base on v)
        victim   = release | attack(release)               attacks at stage "release"
        evaluate(victim)                                   when it differs from the clean expert
        merge(victim, finetune(d≠v)...)                    attacks at stage "merge" act inside it
        merge(finetune(d≠v)...) + evaluate on v            when references has left_out (one merge;
                                                           each evaluation takes v's head)
        merged   = merge | attack(merge)                   attacks at stage "merged"
        evaluate(merged)                                   every dataset, normalised by the experts
        monitor(m) for m in trained, release, victim, merged   when the scenario has a monitor
        evaluate/scale_curve(m) for m in clean, trained, release  when diagnostics.scale_curve

Identical nodes (same step, op, version, params and inputs) are one node, so scenarios that share a
clean expert train it once and the unprotected merge is computed once for every victim.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mergesec.core.content_hash import file_sha256, tree_sha256
from mergesec.core.registry import STAGE_MERGE, STAGE_MERGED, TRAINS, get_op, validate_params
from mergesec.data import dataset_slug, local_dataset_path
from mergesec.merging.released_search import released_search_order
from mergesec.models.hub import model_identity
from mergesec.orchestrator.node import Node
from mergesec.orchestrator.spec import DatasetSpec, OpCall, Study, StudySpec

# Attack stages, declared by an attack op's traits ("release" when none is given).


def scenario_label(scenario: str, victim: str, variant: str) -> str:
    """The ``scenario`` label of the nodes of one plan row: ``name[victim]{variant}``."""
    return f"{scenario}[{victim}]" + (f"{{{variant}}}" if variant else "")


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
    monitors: dict[str, str] = field(default_factory=dict)  # watched model kind -> monitor node
    scale_curves: dict[str, str] = field(default_factory=dict)  # model kind -> scale-curve node
    # The victim left out: the other experts merged, scored on the victim's data with its head.
    left_out_eval: str | None = None

    @property
    def label(self) -> str:
        """The ``scenario`` label its nodes carry."""
        return scenario_label(self.scenario, dataset_slug(self.victim), self.variant)


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

    def upstream_in(self, node_id: str, states: dict[str, str], state: str) -> list[Node]:
        """The nearest upstream nodes of ``node_id`` whose state in ``states`` is ``state``
        (the failed inputs of a skipped node)."""
        out, seen, stack = [], set(), list(self.nodes[node_id].inputs.values())
        while stack:
            n = stack.pop()
            if n in seen or n not in self.nodes:
                continue
            seen.add(n)
            if states.get(n) == state:
                out.append(self.nodes[n])
            else:
                stack.extend(self.nodes[n].inputs.values())
        return out

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


def dataset_ref(d: DatasetSpec) -> dict[str, Any]:
    """What identifies a dataset in node params: its URI, column mapping, example caps and, for
    local files and directories, a hash of their content (so an edited dataset recomputes what
    depends on it)."""

    ref: dict[str, Any] = {"uri": d.uri}
    if d.columns:
        ref["columns"] = dict(d.columns)
    caps = d.examples.model_dump(exclude_none=True) if d.examples else {}
    if caps:
        ref["examples"] = caps
    p = local_dataset_path(d.uri)
    if p is not None and p.is_file():
        ref["sha256"] = file_sha256(p)[:16]
    elif p is not None and p.is_dir():
        ref["sha256"] = tree_sha256(p)[:16]
    return ref


def _op_params(step: str, call_op: str, params: dict[str, Any]) -> tuple[str, dict[str, Any]]:

    op = get_op(step, call_op)
    return op.version, validate_params(op, params)


def attack_stage(op_name: str) -> str:

    traits = get_op("attack", op_name).traits
    return (
        STAGE_MERGE
        if STAGE_MERGE in traits
        else STAGE_MERGED
        if STAGE_MERGED in traits
        else "stage:release"
    )


def build_plan(study: Study) -> Plan:

    plan = Plan(study.name)
    for label, spec in study.variants:
        variant = ",".join(f"{k}={v}" for k, v in label.items())
        _VariantPlanner(plan, spec, variant, model_identity(spec.base)).run()
    return plan


class _VariantPlanner:
    def __init__(self, plan: Plan, spec: StudySpec, variant: str, base_id: str):

        self.plan, self.spec, self.variant = plan, spec, variant
        self.slug = dataset_slug
        self.base = {"base": spec.base, "base_id": base_id}
        self.datasets = [dataset_ref(d) for d in spec.dataset_specs()]
        self.by_uri = {d["uri"]: d for d in self.datasets}
        self.ft_version, self.ft_params = _op_params(
            "finetune", spec.finetune.mode, spec.finetune.params
        )
        self.eval_version, self.eval_params = _op_params(
            "evaluate", "accuracy", {"batch_size": spec.evaluate.batch_size}
        )

    def add(self, node: Node, **labels: str) -> Node:
        return self.plan.add(node, **labels)

    def evaluate(
        self,
        model: Node,
        dsets: list[dict],
        refs: dict[str, str] | None = None,
        heads: dict[str, str] | None = None,
        **labels: str,
    ) -> Node:
        """Score ``model`` on ``dsets``; ``refs``: slug -> the expert evaluation to normalise by;
        ``heads``: slug -> the node whose head for that dataset is used (input ``head.<slug>``)."""
        inputs = {"model": model.id} | {f"reference.{k}": v for k, v in (refs or {}).items()}
        inputs |= {f"head.{k}": v for k, v in (heads or {}).items()}
        params = {"datasets": dsets, "split": self.spec.evaluate.split, "op": self.eval_params}
        return self.add(Node("evaluate", "accuracy", self.eval_version, params, inputs), **labels)

    def finetune(self, d: dict, poison: dict | None, **labels: str) -> Node:
        params = self.base | {"dataset": d, "op": self.ft_params}
        if poison:
            params["poison"] = poison
        return self.add(
            Node("finetune", self.spec.finetune.mode, self.ft_version, params, {}), **labels
        )

    def run(self) -> None:
        spec = self.spec
        experts: dict[str, Node] = {}
        expert_evals: dict[str, str] = {}
        for d in self.datasets:
            s = self.slug(d["uri"])
            experts[d["uri"]] = self.finetune(d, None, what=s)
            expert_evals[s] = self.evaluate(experts[d["uri"]], [d], what=s).id

        m_version, m_params = _op_params("merge", spec.merge.op, spec.merge.params)
        for name, sc in spec.scenarios.items():
            for v_uri in spec.victim_uris():
                v = self.slug(v_uri)
                d = self.by_uri[v_uri]
                tag = scenario_label(name, v, self.variant)
                poison = sc.poison.model_dump(exclude_none=True) if sc.poison else None
                trained = (
                    self.finetune(d, poison, what=v, scenario=tag) if poison else experts[v_uri]
                )
                watched: dict[str, Node] = {"trained": trained}
                release = trained
                if sc.protect is not None:
                    release = self._protect(sc.protect, d, trained, poison, v, tag)
                    watched["release"] = release
                victim, merge_attack, after_attack = release, None, None
                if sc.attack is not None:
                    stage = attack_stage(sc.attack.op)
                    if stage == STAGE_MERGE:
                        merge_attack = sc.attack
                    elif stage == STAGE_MERGED:
                        after_attack = sc.attack
                    else:
                        victim = self._attack(sc.attack, d, release, experts[v_uri], v, tag)
                        watched["attacked"] = victim
                victim_eval = self.evaluate(victim, [d], what=v, scenario=tag).id
                members = {
                    f"expert.{self.slug(u)}": (victim if u == v_uri else experts[u]).id
                    for u in self.by_uri
                }
                params = self.base | {"datasets": self.datasets, "op": m_params}
                params |= self._merge_options()
                if params.get("search") and victim is not experts[v_uri]:
                    # the released criterion normalises by the unprotected expert's accuracy
                    members[f"reference.{v}"] = experts[v_uri].id
                if spec.evaluate.search_examples is not None:
                    params["search_examples"] = spec.evaluate.search_examples
                if merge_attack is not None:
                    a_version, a_params = _op_params("attack", merge_attack.op, merge_attack.params)
                    params["attack"] = {
                        "op": merge_attack.op,
                        "version": a_version,
                        "params": a_params,
                        "victim": v,
                    }
                merged = self.add(
                    Node("merge", spec.merge.op, m_version, params, members),
                    what=spec.merge.op,
                    scenario=tag,
                )
                merge_node = merged
                if after_attack is not None:
                    merged = self._attack(after_attack, d, merged, None, v, tag)
                watched["merged"] = merged
                merge_eval = self.evaluate(
                    merged, self.datasets, expert_evals, what="merged", scenario=tag
                )
                row = PlanRow(
                    self.variant,
                    name,
                    v_uri,
                    spec.merge.op,
                    victim_eval,
                    merge_node.id,
                    merge_eval.id,
                    dict(expert_evals),
                )
                if "left_out" in spec.references:
                    row.left_out_eval = self._left_out(victim, d, v, tag, experts).id
                if sc.monitor is not None:
                    row.monitors = {
                        k: self._monitor(sc.monitor, m, d, poison, v, tag, k).id
                        for k, m in watched.items()
                    }
                if spec.diagnostics.scale_curve:
                    models = {"clean": experts[v_uri], "trained": trained, "release": release}
                    row.scale_curves = {
                        k: self._scale_curve(m, d, v, tag).id for k, m in models.items()
                    }
                self.plan.rows.append(row)

    def _left_out(self, victim: Node, d: dict, v: str, tag: str, experts: dict[str, Node]) -> Node:
        """The merge of every expert but the victim's (one node, shared by every scenario) and
        its evaluation on the victim's dataset with the scenario's victim head (input
        ``head.<v>``)."""
        spec = self.spec
        version, op_params = _op_params("merge", spec.merge.op, spec.merge.params)
        others = [x for x in self.datasets if x["uri"] != d["uri"]]
        params = self.base | {"datasets": others, "op": op_params} | self._merge_options()
        if spec.evaluate.search_examples is not None:
            params["search_examples"] = spec.evaluate.search_examples
        inputs = {f"expert.{self.slug(x['uri'])}": experts[x["uri"]].id for x in others}
        merged = self.add(
            Node("merge", spec.merge.op, version, params, inputs),
            what=f"{spec.merge.op}:left_out:{v}",
        )
        return self.evaluate(merged, [d], heads={v: victim.id}, what=f"{v}:left_out", scenario=tag)

    def _merge_options(self) -> dict[str, Any]:
        """The merge node's ``space`` and released ``search`` (absent at their defaults, so the
        identity of a plain merge is unchanged)."""
        merge = self.spec.merge
        out: dict[str, Any] = {}
        if merge.space != "full":
            out["space"] = merge.space
        if merge.search == "released":
            op = get_op("merge", merge.op)
            order = released_search_order(op, fixed=merge.params)
            out["search"] = {"mode": "released", "order": list(order)}
        return out

    def _protect(
        self, call: OpCall, d: dict, trained: Node, poison: dict | None, v: str, tag: str
    ) -> Node:

        version, params = _op_params("protect", call.op, call.params)
        if TRAINS in get_op("protect", call.op).traits:
            node_params = self.base | {
                "dataset": d,
                "finetune": {"mode": self.spec.finetune.mode, **self.ft_params},
                "op": params,
            }
            if poison:
                node_params["poison"] = poison
            return self.add(
                Node("protect", call.op, version, node_params, {}), what=v, scenario=tag
            )
        node = Node("protect", call.op, version, self.base | {"op": params}, {"expert": trained.id})
        return self.add(node, what=v, scenario=tag)

    def _attack(
        self, call: OpCall, d: dict, target: Node, clean: Node | None, v: str, tag: str
    ) -> Node:
        version, params = _op_params("attack", call.op, call.params)
        node_params = self.base | {"dataset": d, "datasets": self.datasets, "op": params}
        inputs = {"release": target.id}
        if clean is not None:
            # The clean expert, read only for diagnostics the attacker would not have.
            inputs["reference"] = clean.id
        return self.add(Node("attack", call.op, version, node_params, inputs), what=v, scenario=tag)

    def _monitor(
        self, call: OpCall, model: Node, d: dict, poison: dict | None, v: str, tag: str, kind: str
    ) -> Node:
        version, params = _op_params("monitor", call.op, call.params)
        node_params = self.base | {"dataset": d, "poison": poison, "op": params}
        return self.add(
            Node("monitor", call.op, version, node_params, {"model": model.id}),
            what=f"{v}:{kind}",
            scenario=tag,
        )

    def _scale_curve(self, model: Node, d: dict, v: str, tag: str) -> Node:
        params = {"datasets": [d], "scales": self.spec.diagnostics.scales, "op": {}}
        version = _op_params("evaluate", "scale_curve", {})[0]
        return self.add(
            Node("evaluate", "scale_curve", version, params, {"model": model.id}),
            what=v,
            scenario=tag,
        )
