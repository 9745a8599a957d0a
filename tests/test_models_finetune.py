"""Models by URI (hub cache, offline), and the finetune/evaluate/merge executors called directly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from mergesec.core.context import NodeContext
from mergesec.models.artifact import ModelArtifact
from mergesec.models.hub import ModelURIError, check_model_uri, resolve_model_path
from mergesec.models.state_dict import load_state_dict
from mergesec.orchestrator.runner import executor_for

FT = {
    "epochs": 1,
    "lr": 1e-3,
    "batch_size": 64,
    "max_length": 32,
    "seed": 0,
    "patience": 2,
    "warmup_ratio": 0.1,
    "weight_decay": 0.0,
}


def make_hub_cache(cache: Path, repo: str, src: Path, commit: str = "a" * 40) -> None:
    """Lay ``src`` out as the Hugging Face hub cache would after a download of ``repo``."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snap = root / "snapshots" / commit
    shutil.copytree(src, snap)
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)


def test_hf_uri_loads_offline_from_a_local_cache(tmp_path, tiny_bert, monkeypatch):
    cache = tmp_path / "hub"
    make_hub_cache(cache, "acme/tiny-bert", tiny_bert)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    resolve_model_path.cache_clear()
    p = resolve_model_path("hf:acme/tiny-bert")
    assert (p / "config.json").is_file() and p.parent.name == "snapshots"
    from mergesec.models.hub import load_backbone

    assert load_backbone("hf:acme/tiny-bert").config.hidden_size == 32
    resolve_model_path.cache_clear()
    with pytest.raises(ModelURIError, match="cannot load hf:acme/absent"):
        resolve_model_path("hf:acme/absent")
    assert "malformed" in check_model_uri("hf:not a repo")


def _ctx(tmp: Path, step: str, op: str, params: dict, inputs: dict | None = None) -> NodeContext:
    out = tmp / f"out-{step}-{op}-{len(list(tmp.glob('out-*')))}"
    out.mkdir()
    return NodeContext("0" * 16, step, op, params, inputs or {}, out)


def _finetune(tmp, base, mode="full", **op):
    params = {"base": str(base), "dataset": {"uri": "builtin:synthetic_sentiment"}, "op": FT | op}
    ctx = _ctx(tmp, "finetune", mode, params)
    metrics = executor_for("finetune", mode)(ctx)
    return ctx.out_dir, metrics


def test_full_finetune_is_seeded_and_learns(tmp_path, tiny_bert):
    a, ma = _finetune(tmp_path, tiny_bert)
    b, _ = _finetune(tmp_path, tiny_bert)
    c, _ = _finetune(tmp_path, tiny_bert, seed=1)
    wa, wb, wc = (load_state_dict(d / "model.safetensors") for d in (a, b, c))
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "same seed, same weights"
    assert any(not torch.equal(wa[k], wc[k]) for k in wa), "another seed, other weights"
    assert ma["val_accuracy"] > 0.6 and ma["best_epoch"] == 1
    art = ModelArtifact.open(a)
    assert art.heads["synthetic_sentiment"].labels == ["negative", "positive"]
    ev = _ctx(
        tmp_path,
        "evaluate",
        "accuracy",
        {
            "datasets": [{"uri": "builtin:synthetic_sentiment"}],
            "split": "test",
            "op": {"batch_size": 64, "max_length": 32},
        },
        {"model": a},
    )
    m = executor_for("evaluate", "accuracy")(ev)
    assert 0.6 < m["accuracy/synthetic_sentiment"] <= 1.0


def test_lora_release_keeps_adapter_and_materialised_weights(tmp_path, tiny_bert):
    out, metrics = _finetune(tmp_path, tiny_bert, "lora", r=4, alpha=8, dropout=0.0, lr=5e-3)
    assert (out / "adapter" / "adapter_config.json").is_file()
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 4
    art = ModelArtifact.open(out)
    assert art.meta["release"] == "lora"
    from mergesec.models.hub import load_backbone

    base = load_backbone(str(tiny_bert)).state_dict()
    tuned = art.backbone_state()
    assert set(tuned) == set(base), "materialised weights carry the base's key names"
    changed = [k for k in base if not torch.equal(base[k], tuned[k])]
    # LoRA on all linear layers changes exactly the linear weights; embeddings and norms stay
    assert changed and all(
        k.endswith(".weight") and "LayerNorm" not in k and "embeddings" not in k for k in changed
    )
    delta = (
        tuned["encoder.layer.0.attention.self.query.weight"]
        - base["encoder.layer.0.attention.self.query.weight"]
    )
    assert torch.linalg.matrix_rank(delta).item() <= 4, "a LoRA update has rank at most r"


def test_merge_executor_searches_and_records_choice(tmp_path, tiny_bert):
    a, _ = _finetune(tmp_path, tiny_bert)
    params = {
        "base": str(tiny_bert),
        "datasets": [{"uri": "builtin:synthetic_sentiment"}],
        "op": {"coefficient": {"search": [0.0, 1.0]}},
    }
    ctx = _ctx(tmp_path, "merge", "task_arithmetic", params, {"expert.synthetic_sentiment": a})
    m = executor_for("merge", "task_arithmetic")(ctx)
    # coefficient 1 on a single expert is the expert itself, which beats the untrained base
    assert m["chosen/coefficient"] == 1.0
    merged = ModelArtifact.open(ctx.out_dir).backbone_state()
    expert = load_state_dict(a / "model.safetensors")
    assert all(torch.allclose(merged[k], expert[k], atol=1e-6) for k in expert)
