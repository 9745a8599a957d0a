"""Every ``conf/paper/*.yaml`` study plans unchanged and runs end to end on tiny local stand-ins.

The stand-ins replace what these machines cannot download: the base (a tiny random CLIP, llama or
BERT built in the tests, chosen from the study's base), the datasets (builtin images, the builtin
arithmetic QA set and a second local QA file, small chat sets, or builtin text sets, chosen by the
study's dataset kind) and the per-step GPU requests (``resources={}``). To fit the CI budget, fine-tuning (Trap²'s
included) runs one epoch and every ``{search: [...]}`` of the merge keeps its first and last
values; everything else, every scenario, victim, merge operator and diagnostic of the study, runs
as written.
The nodes are executed in this process in plan order (Ray scheduling is covered by the other
end-to-end tests).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from chat_helpers import TINY_CHAT_DATA, TINY_CHAT_OTHER, make_tiny_chat_llama
from test_lm_pipeline import make_tiny_llama
from test_vision_pipeline import make_tiny_clip

REPO = Path(__file__).resolve().parents[1]
PAPER = sorted((REPO / "conf" / "paper").glob("*.yaml"))


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _trim_searches(obj: Any) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"search"} and isinstance(obj["search"], list) and len(obj["search"]) > 2:
            return {"search": [obj["search"][0], obj["search"][-1]]}
        if obj.get("search") == "released":
            # The released greedy search scores up to ~100 candidates; its path through the
            # merge step is tested in test_merge_released_search.py. Two candidates here.
            rest = {k: v for k, v in obj.items() if k != "search"}
            return rest | {"coefficient": {"search": [0.3, 1.0]}}
        return {k: _trim_searches(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_trim_searches(x) for x in obj]
    return obj


def _base_family(base: str) -> str:
    low = base.lower()
    if "clip" in low:
        return "clip"
    if any(n in low for n in ("llama", "qwen", "olmo", "mistral", "gpt")):
        return "llama"
    return "bert"


def _qa_second_dataset(tmp: Path) -> str:
    """A second QA dataset: the arithmetic stand-in's multiplication problems, as a JSONL file."""
    from mergesec.data.qa import arithmetic_splits

    data = arithmetic_splits((600, 0, 0))
    rows = [e for e in data.train if "boxes" in e.question][:120]
    f = tmp / "boxes_qa.jsonl"
    f.write_text(
        "".join(json.dumps({"question": e.question, "answer": e.answer}) + "\n" for e in rows)
    )
    return str(f)


def stand_in_study(path: Path, tmp: Path, tiny_bert: Path) -> Path:
    """The study at ``path`` with stand-in base, datasets and resources, written under ``tmp``."""
    from mergesec import kinds

    doc = yaml.safe_load(path.read_text())
    uris = [d if isinstance(d, str) else d["uri"] for d in doc["datasets"]]
    kind = kinds.kind_for_datasets(uris)
    family = _base_family(str(doc["base"]))
    if kind == "image":
        base, datasets = (
            make_tiny_clip(tmp / "clip"),
            ["builtin:synthetic_colors", "builtin:synthetic_shapes"],
        )
    elif kind == "qa":
        base, datasets = (
            make_tiny_llama(tmp / "llama"),
            ["builtin:synthetic_arithmetic", _qa_second_dataset(tmp)],
        )
    elif kind == "chat":
        base, datasets = make_tiny_chat_llama(tmp / "chat"), [TINY_CHAT_DATA, TINY_CHAT_OTHER]
    else:
        base = make_tiny_llama(tmp / "llama") if family == "llama" else tiny_bert
        datasets = ["builtin:synthetic_sentiment", "builtin:synthetic_topic"]
    victims = doc.get("victims", "all")
    out = copy.deepcopy(doc)
    out |= {"base": str(base), "datasets": datasets, "resources": {}}
    if victims != "all":
        out["victims"] = sorted({datasets[uris.index(v) % len(datasets)] for v in victims})
    out["finetune"] = {**doc.get("finetune", {}), "epochs": 1}
    out["merge"] = _trim_searches(doc["merge"])
    for scenario in out.get("scenarios", {}).values():
        protect = (scenario or {}).get("protect")
        if isinstance(protect, dict) and protect.get("op") == "trap2":
            # Trap²'s released schedule (1e5 steps, evaluation every 2,000) would run 12k steps
            # at least: the stand-in trains the finetune's one epoch instead.
            protect |= {"max_steps": None, "eval_every": None, "warmup_steps": None}
        poison = (scenario or {}).get("poison") or {}
        if kind == "chat" and "topic" in poison:
            poison["topic"] = "politics"  # a topic of the stand-in's BBC News questions
        monitor = (scenario or {}).get("monitor")
        if monitor and "calibration_datasets" in monitor:
            # hub calibration corpora are datasets too: stand in the local ones
            monitor["calibration_datasets"] = datasets[:1]
    f = tmp / path.name
    f.write_text(yaml.safe_dump(out, sort_keys=False))
    return f


def run_in_process(study_file: Path, store_dir: Path):
    """Plan the study and execute every node here, in plan order; return plan, store and rows."""
    from mergesec.orchestrator.plan import build_plan
    from mergesec.orchestrator.runner import execute_node
    from mergesec.orchestrator.spec import load_study
    from mergesec.orchestrator.store import Store
    from mergesec.report import build_results

    study = load_study(study_file)
    plan = build_plan(study)
    store = Store(str(store_dir))
    for node in plan.topological():
        execute_node(node, store, cpus=1, allow_remote_code=study.spec.allow_remote_code)
    return plan, store, build_results(plan, store)


def test_there_are_paper_studies():
    assert PAPER, "conf/paper/*.yaml holds the papers' protocols"


@pytest.mark.parametrize("path", PAPER, ids=[p.stem for p in PAPER])
def test_paper_study_plans_unchanged(path):
    from typer.testing import CliRunner

    from mergesec.cli import app

    res = CliRunner().invoke(app, ["plan", str(path)])
    assert res.exit_code == 0, res.output
    assert "finetune" in res.output and "merge" in res.output


@pytest.mark.slow
@pytest.mark.parametrize("path", PAPER, ids=[p.stem for p in PAPER])
def test_paper_study_runs_end_to_end_on_stand_ins(path, tmp_path, tiny_bert):
    from mergesec.models.artifact import ModelArtifact

    study = stand_in_study(path, tmp_path, tiny_bert)
    plan, store, rows = run_in_process(study, tmp_path / "store")
    assert all(store.is_done(n) for n in plan.nodes), "every node finished"
    assert rows and all(r["status"] == "done" for r in rows)
    for r in rows:
        for key in ("victim_clean", "victim_merged", "others_merged"):
            assert r[key] is None or 0.0 <= r[key] <= 1.0, (key, r)
        assert r["victim_merged"] is not None
    models = [
        ModelArtifact.open(store.local_dir(n))
        for n, node in plan.nodes.items()
        if node.step in ("finetune", "protect", "attack", "merge")
    ]
    assert models and all(m.backbone_lazy() for m in models)
    doc = yaml.safe_load(path.read_text())
    if doc.get("diagnostics", {}).get("scale_curve"):
        assert all(r["scale_curves"] for r in rows)
