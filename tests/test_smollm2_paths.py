"""builtin:smollm2-135m-instruct through the pipeline steps, as any llama-style model goes.

The real dequantized weights and the real tokenizer and chat template, cut to the first two of
the 30 decoder layers (embeddings, layers 0-1 and the final norm as released) so that every path
runs in seconds on two CPU cores. On that model: a LoRA and a full fine-tune through the finetune
step on tiny real-data QA sets (Rotten Tomatoes reviews and BBC News articles asked as
questions, ``data.chat.qa_records``); PaRaMS and MergeLock releases of the LoRA expert through
the protect step must compute its function (logits to 1e-4); AGA through the attack step must
recover its task vector from a release and the base alone; the merge step must merge the two
experts; and
WeightWatch's causal-LM monitor must calibrate on chats through the real template. One check
runs at full depth: MergeLock on the whole 30-layer model keeps its function to 1e-4. The
measured figures are printed (``pytest -s``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_executor

from mergesec.core.registry import get_op, validate_params
from mergesec.data import dataset_slug, load_dataset_splits
from mergesec.data.chat import chat_examples, qa_records
from mergesec.data.qa import load_qa_splits
from mergesec.kinds.qa.task import QAKind, load_causal_lm
from mergesec.models.artifact import ModelArtifact
from mergesec.models.hub import base_weights_file, resolve_model_path
from mergesec.models.state_dict import LazyStateDict, load_state_dict, save_state_dict

URI = "builtin:smollm2-135m-instruct"
LAYERS = 2
SOURCES = {"sentiment": "rotten_tomatoes", "topic": "bbc_news"}
# One epoch of four steps (8 questions in batches of 2), so the stored expert is the last step's.
LORA = {"epochs": 1, "lr": 1e-2, "batch_size": 2, "dropout": 0.0, "seed": 0, "max_length": 48}
FULL = {"epochs": 1, "lr": 1e-3, "batch_size": 2, "seed": 0, "max_length": 48}
PROMPTS = (
    "What is the capital of France?",
    "A gripping, funny and humane film. Which one is this: fresh, rotten?",
    "Shares in the bank fell after its profits dropped.",
)
pytestmark = pytest.mark.slow


def _keep(key: str) -> bool:
    """Whether a state-dict key belongs to the cut model (not to decoder layer >= LAYERS)."""
    parts = key.split(".")
    if "layers" not in parts:
        return True
    return int(parts[parts.index("layers") + 1]) < LAYERS


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """The session's isolated mergesec cache (conftest's), set before the module's fixtures."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MERGESEC_CACHE", str(tmp_path_factory.getbasetemp() / "mergesec-cache"))
        yield


@pytest.fixture(scope="module")
def base(tmp_path_factory, cache) -> str:
    """The real model cut to its first ``LAYERS`` decoder layers, as a local model directory."""
    src = resolve_model_path(URI)
    out = tmp_path_factory.mktemp("smollm2-2l")
    for f in src.iterdir():
        if f.name not in {"model.safetensors", "config.json"}:
            shutil.copy(f, out / f.name)
    config = json.loads((src / "config.json").read_text())
    assert config["num_hidden_layers"] == 30
    config["num_hidden_layers"] = LAYERS
    (out / "config.json").write_text(json.dumps(config, indent=1))
    lazy = LazyStateDict(src / "model.safetensors")
    save_state_dict({k: lazy[k] for k in lazy if _keep(k)}, out / "model.safetensors")
    return str(out)


@pytest.fixture(scope="module")
def base_sd(base) -> dict[str, torch.Tensor]:
    """The cut base's decoder weights in the key names experts are stored with."""
    return load_state_dict(base_weights_file(base))


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
    """Experts by ``(source slug, mode)``, each fine-tuned on first use: ``(dir, metrics)``."""

    def __init__(self, root: Path, base: str, files: dict[str, Path]):
        super().__init__()
        self.root, self.base, self.files = root, base, files

    def __missing__(self, key: tuple[str, str]) -> tuple[Path, dict]:
        slug, mode = key
        params = {
            "base": self.base,
            "dataset": {"uri": str(self.files[slug])},
            "op": validate_params(get_op("finetune", mode), LORA if mode == "lora" else FULL),
        }
        self[key] = run_executor(self.root, "finetune", mode, params)
        return self[key]


@pytest.fixture(scope="module")
def experts(base, qa_files, tmp_path_factory) -> _Experts:
    return _Experts(tmp_path_factory.mktemp("smol-experts"), base, qa_files)


@pytest.fixture(scope="module")
def releases(base, experts, tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    root = tmp_path_factory.mktemp("smol-releases")
    victim = experts["sentiment", "lora"][0]
    return {
        defense: run_executor(
            root, "protect", defense, {"base": base, "op": {"seed": 0}}, {"expert": victim}
        )
        for defense in ("params", "mergelock")
    }


def _logits(model_dir: Path) -> torch.Tensor:
    task = QAKind().from_artifact(ModelArtifact.open(model_dir))
    enc = task.tokenizer(list(PROMPTS), return_tensors="pt", padding=True)
    with torch.no_grad():
        return task.model(**enc).logits[enc["attention_mask"].bool()]


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _answer_loss(base: str, data, model_dir: Path | None) -> float:
    task = (
        QAKind().build(base, data)
        if model_dir is None
        else QAKind().from_artifact(ModelArtifact.open(model_dir))
    )
    batch = task.encode(data.train)
    with torch.no_grad():
        return float(task.loss(batch))


def test_the_cut_model_is_the_real_one_up_to_layer_two(base, base_sd):
    full = LazyStateDict(resolve_model_path(URI) / "model.safetensors")
    assert {f"model.{k}" for k in base_sd} == {k for k in full if _keep(k)}
    for k in ("embed_tokens.weight", "layers.1.mlp.down_proj.weight", "norm.weight"):
        assert torch.equal(base_sd[k], full[f"model.{k}"]), k
    lm = load_causal_lm(base)
    assert len(lm.model.layers) == LAYERS
    assert lm.lm_head.weight.data_ptr() == lm.model.embed_tokens.weight.data_ptr(), "tied"


# The victim is a LoRA expert on Rotten Tomatoes; the other expert is a full fine-tune on BBC News.
EXPERTS = (("sentiment", "lora"), ("topic", "full"))


@pytest.mark.parametrize("slug,mode", EXPERTS)
def test_finetune_step_on_real_qa_lowers_the_answer_loss(
    slug, mode, base, experts, qa_files, base_sd
):
    data = load_qa_splits(str(qa_files[slug]))
    assert (len(data.train), len(data.validation), len(data.test)) == (8, 2, 2)
    assert data.max_new_tokens <= 24, "short answers decode a few tokens, not 256"
    out, metrics = experts[slug, mode]
    assert metrics["steps"] == 4 and 0.0 <= metrics["val_accuracy"] <= 1.0
    art = ModelArtifact.open(out)
    assert art.meta["kind"] == "qa" and art.meta["release"] == mode
    sd = art.backbone_state()
    assert set(sd) == set(base_sd)
    changed = {k for k in base_sd if not torch.equal(base_sd[k], sd[k])}
    if mode == "lora":
        assert changed and all(k.endswith("proj.weight") for k in changed), sorted(changed)[:5]
    else:
        assert "embed_tokens.weight" in {k.rsplit(".", 2)[-2] + ".weight" for k in changed}
        assert len(changed) > len(base_sd) // 2
    before, after = _answer_loss(base, data, None), _answer_loss(base, data, out)
    print(f"{mode}: answer loss on the training questions: base {before:.3f} -> {after:.3f}")
    assert after < 0.5 * before, (before, after)


@pytest.mark.parametrize("defense", ["params", "mergelock"])
def test_protection_preserves_the_function_of_a_real_expert(defense, experts, releases):
    expert = experts["sentiment", "lora"][0]
    release, metrics = releases[defense]
    err = _rel_err(_logits(release), _logits(expert))
    ratio = metrics["task_vector_norm/ratio"]
    print(f"{defense}: logits relative error {err:.2e}, task vector norm x{ratio:.0f}")
    assert err <= 1e-4, err
    assert ratio >= 50, metrics


@pytest.mark.parametrize("defense", ["params", "mergelock"])
def test_aga_recovers_the_real_expert(defense, base, experts, releases, tmp_path):
    expert = experts["sentiment", "lora"][0]
    release = releases[defense][0]
    recovered, m = run_executor(
        tmp_path, "attack", "aga", {"base": base, "op": {}},
        {"release": release, "reference": expert},
    )  # fmt: skip
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


def test_merge_step_merges_a_lora_and_a_full_expert(base, experts, qa_files, base_sd, tmp_path):
    datasets = [{"uri": str(qa_files[s])} for s, _ in EXPERTS]
    inputs = {f"expert.{dataset_slug(str(qa_files[s]))}": experts[s, m][0] for s, m in EXPERTS}
    merged, _ = run_executor(
        tmp_path, "merge", "task_arithmetic",
        {"base": base, "datasets": datasets, "op": {"coefficient": 0.5}}, inputs,
    )  # fmt: skip
    sd = ModelArtifact.open(merged).backbone_state()
    taus = [ModelArtifact.open(experts[key][0]).backbone_state() for key in EXPERTS]
    for k in ("layers.0.self_attn.q_proj.weight", f"layers.{LAYERS - 1}.mlp.down_proj.weight"):
        want = base_sd[k] + 0.5 * sum(t[k] - base_sd[k] for t in taus)
        assert torch.allclose(sd[k], want, atol=1e-6), k
        assert not torch.equal(sd[k], base_sd[k])
    _, m = run_executor(
        tmp_path, "evaluate", "accuracy", {"datasets": datasets, "split": "test", "op": {}},
        {"model": merged},
    )  # fmt: skip
    print("merged expert on the two test splits:", m)
    assert set(m) >= {"accuracy/mean", *(f"accuracy/{dataset_slug(d['uri'])}" for d in datasets)}
    assert all(0.0 <= v <= 1.0 for k, v in m.items() if k.startswith("accuracy/"))


def test_weightwatch_calibrates_and_scores_chats_through_the_real_template(base, experts, tmp_path):
    from mergesec.monitor.causal_lm import (
        audit_chats,
        calibrate_chats,
        causal_lm_directions,
        detect_chats,
        steered_generate,
    )

    tuned = QAKind().from_artifact(ModelArtifact.open(experts["topic", "full"][0]))
    lm, tok = tuned.model.lm, tuned.tokenizer
    k = 4
    d = causal_lm_directions(load_causal_lm(base), lm, k=k)
    assert d.num_layers == LAYERS and d.layers == list(range(LAYERS))
    for layer in d.layers:
        # k left singular vectors of each writer's ΔW (attention out, MLP out): orthonormal
        assert d.vectors[layer].shape == (2 * k, lm.config.hidden_size)
        for writer in {n.split(".")[1] for n in d.names[layer]}:
            rows = [i for i, n in enumerate(d.names[layer]) if n.split(".")[1] == writer]
            v = d.vectors[layer][rows]
            torch.testing.assert_close(v @ v.T, torch.eye(k), atol=1e-4, rtol=0)

    rt = load_dataset_splits("builtin:rotten_tomatoes")
    chats = [m for m, _ in chat_examples(rt, "validation", 24, max_words=16)]
    cal = calibrate_chats(
        lm, tok, d, chats[:16], generate_tokens=2, drop_last_layers=0, epsilon=0.05, batch_size=8
    )
    assert cal.columns.role_names == ("user", "assistant"), "roles from the chat template"
    assert cal.lower.isfinite().all() and cal.upper.isfinite().all()
    held_out = detect_chats(lm, tok, d, cal, chats[16:], batch_size=8)
    flagged = detect_chats(lm, tok, d, cal, chats[:16], batch_size=8)
    print(f"weightwatch: held-out benign flag rate {held_out.float().mean():.2f}")
    assert held_out.shape == (8,) and held_out.float().mean() <= 0.5
    assert not flagged.any(), "a chat inside the calibration set leaves no range"

    audit = audit_chats(lm, tok, d, chats[:8], calibration=cal, audit_directions=2, n=3,
                        path=tmp_path / "audit.md")  # fmt: skip
    assert len(audit) == 2 and all(n.endswith(("@user", "@assistant")) for n in audit)
    assert all(f"`{n}`" in (tmp_path / "audit.md").read_text() for n in audit)

    enc = tok.apply_chat_template(
        chats[0], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        plain = lm.generate(**enc, max_new_tokens=4, do_sample=False)
    new, removed = steered_generate(lm, tok, d, cal, chats[:1], max_new_tokens=4, do_sample=False)
    assert new.shape[0] == 1 and len(removed) == 1
    if not removed[0]:
        assert torch.equal(new[0], plain[0, enc["input_ids"].shape[1] :]), "nothing removed"


def test_mergelock_keeps_the_function_of_the_full_depth_model():
    """At all 30 layers: MergeLock on the real base plus a rank-4 update of relative norm 1e-2
    on every layer matrix (no training needed) computes the same logits to 1e-4."""
    from mergesec.defenses.mergelock import protect_mergelock
    from mergesec.models.layout import layout_for_model

    lm = load_causal_lm(URI).eval()
    assert len(lm.model.layers) == 30
    tok = QAKind().build(URI, load_qa_splits("builtin:synthetic_arithmetic")).tokenizer
    base = {k: v.clone() for k, v in lm.model.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    expert = {}
    for k, v in base.items():
        if v.ndim == 2 and "embed" not in k:
            u = torch.randn(v.shape[0], 4, generator=g) @ torch.randn(4, v.shape[1], generator=g)
            expert[k] = v + 1e-2 * v.norm() / u.norm() * u
        else:
            expert[k] = v
    enc = tok(list(PROMPTS), return_tensors="pt", padding=True)
    mask = enc["attention_mask"].bool()

    def logits(sd: dict[str, torch.Tensor]) -> torch.Tensor:
        lm.model.load_state_dict(sd)
        with torch.no_grad():
            return lm(**enc).logits[mask]

    release = protect_mergelock(expert, base, layout_for_model(lm.model), seed=0)
    err = _rel_err(logits(release), logits(expert))
    print(f"mergelock at full depth: logits relative error {err:.2e}")
    assert err <= 1e-4, err
    assert any(not torch.allclose(release[k], expert[k]) for k in expert)
