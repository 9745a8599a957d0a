"""A plan row's headline numbers: the victim's accuracy clean, released and merged, the others'
accuracy after merging, and the chosen merge settings, read from its nodes' metrics.

The report's results table and the MLflow headline metrics both come from ``row_numbers``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from mergesec.data import dataset_slug
from mergesec.orchestrator.plan import PlanRow

# A node's metrics, or None when the node is not done.
MetricsOf = Callable[[str], Mapping[str, Any] | None]

# MLflow metric name -> key of ``row_numbers``: stable names whatever the victim dataset is.
HEADLINE_METRICS = {
    "victim/accuracy_clean": "victim_clean",
    "victim/accuracy_release": "victim_release",
    "victim/accuracy_merged": "victim_merged",
    "victim/normalized_merged": "victim_merged_norm",
    "others/accuracy_mean": "others_merged",
    "merge/coefficient": "coefficient",
}


def headline_nodes(row: PlanRow) -> tuple[str, ...]:
    """The nodes whose metrics make the row's headline: clean expert eval, release eval, merge,
    merged eval."""
    return (
        row.expert_evals[dataset_slug(row.victim)],
        row.victim_eval,
        row.merge_node,
        row.merge_eval,
    )


def row_numbers(row: PlanRow, metrics_of: MetricsOf) -> dict[str, Any]:
    """``coefficient``, ``chosen_<param>``, ``victim_clean``, ``victim_release``,
    ``victim_merged``, ``victim_merged_norm``, ``others_merged`` (None when unknown) and
    ``per_dataset`` (merged accuracy per dataset, when the merged model was evaluated)."""
    v = dataset_slug(row.victim)
    clean, release, merge_node, merged = (metrics_of(n) for n in headline_nodes(row))
    out: dict[str, Any] = {
        "coefficient": None,
        "victim_clean": None,
        "victim_release": None,
        "victim_merged": None,
        "victim_merged_norm": None,
        "others_merged": None,
    }
    if clean:
        out["victim_clean"] = clean.get(f"accuracy/{v}")
    if release:
        out["victim_release"] = release.get(f"accuracy/{v}")
    if merge_node:
        chosen = {k.split("/", 1)[1]: x for k, x in merge_node.items() if k.startswith("chosen/")}
        out["coefficient"] = chosen.get("coefficient")
        out.update({f"chosen_{k}": x for k, x in chosen.items() if k != "coefficient"})
    if merged:
        out["victim_merged"] = merged.get(f"accuracy/{v}")
        out["victim_merged_norm"] = merged.get(f"normalized/{v}")
        others = [
            x
            for k, x in merged.items()
            if k.startswith("accuracy/") and k not in {f"accuracy/{v}", "accuracy/mean"}
        ]
        out["others_merged"] = sum(others) / len(others) if others else None
        out["per_dataset"] = {
            k.split("/", 1)[1]: x for k, x in merged.items() if k.startswith("accuracy/")
        }
    return out


def headline_metrics(numbers: Mapping[str, Any]) -> dict[str, float]:
    """The known numbers of ``row_numbers`` under their stable MLflow names."""
    out = {}
    for name, key in HEADLINE_METRICS.items():
        x = numbers.get(key)
        if isinstance(x, (int, float)) and not isinstance(x, bool):
            out[name] = float(x)
    return out
