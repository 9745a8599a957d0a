"""builtin:smollm2-135m-instruct through the pipeline steps, as any llama-style model goes.

Two LoRA experts are fine-tuned through the finetune step on tiny real-data QA sets (Rotten
Tomatoes reviews and BBC News articles asked as questions, ``data.chat.qa_records``); PaRaMS
and MergeLock releases of one of them must compute its function (logits to 1e-4), AGA must
recover its task vector from a release and the base alone, and the merge step must merge the
two experts. Sizes are minimal (8 training examples, 4 optimizer steps) so that the module runs
in minutes on two CPU cores; the measured figures are printed (``pytest -s``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import run_executor

from mergesec.core.registry import get_op, validate_params
from mergesec.data import dataset_slug, load_dataset_splits
from mergesec.data.chat import qa_records
from mergesec.data.qa import load_qa_splits
from mergesec.kinds.qa.task import QAKind
from mergesec.models.artifact import ModelArtifact
from mergesec.models.hub import base_weights_file
from mergesec.models.state_dict import load_state_dict

BASE = "builtin:smollm2-135m-instruct"
SOURCES = {"sentiment": "rotten_tomatoes", "topic": "bbc_news"}
LORA = {"epochs": 2, "lr": 2e-3, "batch_size": 4, "dropout": 0.0, "seed": 0}
PROMPTS = (
    "What is the capital of France?",
    "A gripping, funny and humane film. Which one is this: fresh, rotten?",
    "Shares in the bank fell after its profits dropped.",
)
# Two LoRA fine-tunes and four protect/attack/merge nodes of a 135M model take about 5 minutes on
# 2 cores, which the suite's 20-minute budget cannot hold next to everything else: these run when
# MERGESEC_LLM_PATH_TESTS=1 (test_smollm2.py, always on, loads, generates and fine-tunes it).
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        os.environ.get("MERGESEC_LLM_PATH_TESTS") != "1",
        reason="SmolLM2 through every path: set MERGESEC_LLM_PATH_TESTS=1 (about 5 minutes)",
    ),
]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """The session's isolated mergesec cache, set before the module's fixtures load the model."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MERGESEC_CACHE", str(tmp_path_factory.getbasetemp() / "mergesec-cache"))
        yield


@pytest.fixture(scope="module")
def qa_files(tmp_path_factory, cache) -> dict[str, Path]:
    """12 questions per source (split 8/2/2), answers ``#### <label>``."""
    root = tmp_path_factory.mktemp("smol-qa")
    out = {}
    for slug, name in SOURCES.items():
        rows = qa_records(load_dataset_splits(f"builtin:{name}"), "train", 12, max_words=16)
        out[slug] = root / f"{slug}.jsonl"
        out[slug].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


class _Experts(dict):
    """LoRA experts by source slug, each fine-tuned on first use: ``(output dir, metrics)``."""

    def __init__(self, root: Path, files: dict[str, Path]):
        super().__init__()
        self.root, self.files = root, files

    def __missing__(self, slug: str) -> tuple[Path, dict]:
        params = {
            "base": BASE,
            "dataset": {"uri": str(self.files[slug])},
            "op": validate_params(get_op("finetune", "lora"), LORA),
        }
        self[slug] = run_executor(self.root, "finetune", "lora", params)
        return self[slug]


@pytest.fixture(scope="module")
def experts(qa_files, tmp_path_factory) -> _Experts:
    return _Experts(tmp_path_factory.mktemp("smol-experts"), qa_files)


@pytest.fixture(scope="module")
def releases(experts, tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    root = tmp_path_factory.mktemp("smol-releases")
    victim = experts["sentiment"][0]
    return {
        defense: run_executor(
            root, "protect", defense, {"base": BASE, "op": {"seed": 0}}, {"expert": victim}
        )
        for defense in ("params", "mergelock")
    }


@pytest.fixture(scope="module")
def base_sd(cache) -> dict[str, torch.Tensor]:
    return load_state_dict(base_weights_file(BASE))


def _logits(model_dir: Path) -> torch.Tensor:
    task = QAKind().from_artifact(ModelArtifact.open(model_dir))
    tok = task.tokenizer
    enc = tok(list(PROMPTS), return_tensors="pt", padding=True)
    with torch.no_grad():
        return task.model(**enc).logits[enc["attention_mask"].bool()]


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_lora_finetune_step_on_real_qa_lowers_the_answer_loss(experts, qa_files, base_sd):
    data = load_qa_splits(str(qa_files["sentiment"]))
    assert (len(data.train), len(data.validation), len(data.test)) == (8, 2, 2)
    assert data.max_new_tokens <= 24, "short answers decode a few tokens, not 256"
    out, metrics = experts["sentiment"]
    assert metrics["steps"] == 4 and 0.0 <= metrics["val_accuracy"] <= 1.0
    art = ModelArtifact.open(out)
    assert art.meta["kind"] == "qa" and art.meta["release"] == "lora"
    sd = art.backbone_state()
    assert set(sd) == set(base_sd)
    changed = {k for k in base_sd if not torch.equal(base_sd[k], sd[k])}
    assert changed and all(k.endswith("proj.weight") for k in changed), sorted(changed)[:5]

    base = QAKind().build(BASE, data)
    batch = base.encode(data.train)

    def loss(task) -> float:
        with torch.no_grad():
            return float(task.loss(batch))

    before, after = loss(base), loss(QAKind().from_artifact(art))
    print(f"answer loss on the training questions: base {before:.3f} -> expert {after:.3f}")
    assert after < 0.5 * before, (before, after)


@pytest.mark.parametrize("defense", ["params", "mergelock"])
def test_protection_preserves_the_function_of_a_real_expert(defense, experts, releases, base_sd):
    expert = experts["sentiment"][0]
    release, metrics = releases[defense]
    err = _rel_err(_logits(release), _logits(expert))
    ratio = metrics["task_vector_norm/ratio"]
    print(f"{defense}: logits relative error {err:.2e}, task vector norm x{ratio:.0f}")
    assert err <= 1e-4, err
    assert ratio >= 50, metrics


@pytest.mark.parametrize("defense", ["params", "mergelock"])
def test_aga_recovers_the_real_expert(defense, experts, releases, tmp_path):
    expert = experts["sentiment"][0]
    release = releases[defense][0]
    recovered, m = run_executor(
        tmp_path,
        "attack",
        "aga",
        {"base": BASE, "op": {}},
        {"release": release, "reference": expert},
    )
    print(
        f"{defense}+aga: cos/all {m['diagnostics/cos/all']:.4f}, "
        f"rel_err/all {m['diagnostics/rel_err/all']:.4f}, "
        f"mlp match {m['diagnostics/mlp_match_fraction']:.4f}, "
        f"|tau| release {m['task_vector_norm/release']:.1f} -> {m['task_vector_norm/recovered']:.3f}"
    )
    assert m["diagnostics/mlp_match_fraction"] == 1.0
    assert m["diagnostics/cos/all"] >= 0.9, m
    assert m["task_vector_norm/recovered"] < 0.05 * m["task_vector_norm/release"]
    assert _rel_err(_logits(recovered), _logits(expert)) <= 1e-4


def test_merge_step_merges_two_lora_experts(experts, qa_files, base_sd, tmp_path):
    datasets = [{"uri": str(qa_files[s])} for s in SOURCES]
    inputs = {f"expert.{dataset_slug(str(qa_files[s]))}": experts[s][0] for s in SOURCES}
    merged, _ = run_executor(
        tmp_path,
        "merge",
        "task_arithmetic",
        {"base": BASE, "datasets": datasets, "op": {"coefficient": 0.5}},
        inputs,
    )
    sd = ModelArtifact.open(merged).backbone_state()
    taus = [ModelArtifact.open(experts[s][0]).backbone_state() for s in SOURCES]
    for k in ("layers.0.self_attn.q_proj.weight", "layers.29.mlp.down_proj.weight"):
        want = base_sd[k] + 0.5 * sum(t[k] - base_sd[k] for t in taus)
        assert torch.allclose(sd[k], want, atol=1e-6), k
        assert not torch.equal(sd[k], base_sd[k])
    _, m = run_executor(
        tmp_path, "evaluate", "accuracy", {"datasets": datasets, "split": "test", "op": {}},
        {"model": merged},
    )  # fmt: skip
    print("merged expert on the two test splits:", m)
    assert 0.0 <= m["accuracy/mean"] <= 1.0
    assert all(torch.isfinite(torch.tensor(v)) for v in m.values())
