"""A training-time defense from a plugin (``tests/plugins/anchor_defense.py``, one registration)
runs in a text, an image and a QA study: each study's plan is executed node by node, as trials
run them, with no dispatcher told about the new op."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from test_lm_pipeline import make_tiny_llama
from test_paper_studies import _qa_second_dataset
from test_vision_pipeline import make_tiny_clip

from mergesec.models.artifact import ModelArtifact
from mergesec.orchestrator.plan import build_plan
from mergesec.orchestrator.runner import execute_node
from mergesec.orchestrator.spec import load_study
from mergesec.orchestrator.store import Store
from mergesec.report import build_results
from mergesec.tasks._io import task_vector_norm

PLUGINS = Path(__file__).parent / "plugins"


@pytest.fixture(autouse=True)
def _plugin(monkeypatch):
    monkeypatch.syspath_prepend(str(PLUGINS))
    import anchor_defense  # noqa: F401  (registers protect/anchor_l2)

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def run_study(tmp: Path, base: Path, datasets: list, finetune: dict) -> tuple[dict, Store, list]:
    doc = {
        "study": "plugin-defense",
        "base": str(base),
        "datasets": datasets,
        "finetune": finetune,
        "scenarios": {
            "unprotected": {},
            "anchored": {"protect": {"op": "anchor_l2", "strength": 50.0}},
            "loose": {"protect": {"op": "anchor_l2", "strength": 0.0}},
        },
        "victims": [datasets[0]],
        "merge": {"op": "task_arithmetic", "coefficient": 0.5},
    }
    f = tmp / "study.yaml"
    f.write_text(yaml.safe_dump(doc))
    plan = build_plan(load_study(f))
    store = Store(str(tmp / "store"))
    for node in plan.topological():
        execute_node(node, store)
    releases = {
        n.params["op"]["strength"]: ModelArtifact.open(store.local_dir(i))
        for i, n in plan.nodes.items()
        if n.step == "protect"
    }
    return releases, store, build_results(plan, store)


def check(releases: dict, rows: list, kind: str) -> None:
    from mergesec.models.hub import base_weights_file
    from mergesec.models.state_dict import load_state_dict

    assert set(releases) == {0.0, 50.0}
    for art in releases.values():
        assert art.meta["protect"] == "anchor_l2" and art.meta["kind"] == kind
    base = load_state_dict(base_weights_file(releases[0.0].base))
    loose = task_vector_norm(releases[0.0].backbone_state(), base)
    anchored = task_vector_norm(releases[50.0].backbone_state(), base)
    assert 0 < anchored < 0.5 * loose, (anchored, loose)  # the pull towards the base works
    assert {r["scenario"] for r in rows} == {"unprotected", "anchored", "loose"}
    assert all(r["status"] == "done" for r in rows), rows


def test_text_study(tmp_path, tiny_bert):
    ft = {"mode": "full", "epochs": 1, "lr": 1e-3, "batch_size": 64, "max_length": 24}
    releases, _, rows = run_study(
        tmp_path, tiny_bert, ["builtin:synthetic_sentiment", "builtin:synthetic_topic"], ft
    )
    check(releases, rows, "text")


def test_image_study(tmp_path):
    clip = make_tiny_clip(tmp_path / "clip")
    ft = {"mode": "full", "epochs": 1, "lr": 2e-3}
    releases, _, rows = run_study(
        tmp_path, clip, ["builtin:synthetic_colors", "builtin:synthetic_shapes"], ft
    )
    check(releases, rows, "image")


def test_qa_lora_study(tmp_path):
    llama = make_tiny_llama(tmp_path / "llama")
    ft = {"mode": "lora", "epochs": 1, "lr": 5e-3, "batch_size": 32, "r": 4}
    datasets = ["builtin:synthetic_arithmetic", _qa_second_dataset(tmp_path)]
    releases, store, rows = run_study(tmp_path, llama, datasets, ft)
    check(releases, rows, "qa")
    assert releases[50.0].meta["release"] == "lora"
    metrics = [
        json.loads(p.read_text()) for p in (tmp_path / "store" / "nodes").glob("*/metrics.json")
    ]
    assert any("accuracy/synthetic_arithmetic" in m for m in metrics)
