"""CLIP image classification: datasets, zero-shot heads, fine-tuning, merging, evaluation.

A tiny random CLIP (built here from a config, with a word-level tokenizer and a 32-pixel image
processor) fine-tunes on synthetic shape images saved with ``save_to_disk`` and read back through
``hf:``; a study merges two such experts and evaluates them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml

from mergesec.core.context import NodeContext
from mergesec.core.registry import get_op, validate_params
from mergesec.data.images import (
    BUILTIN_TEMPLATES,
    COLORS,
    IMAGE_DATASETS,
    SHAPES,
    is_image_uri,
    load_image_splits,
    synthetic_images,
)
from mergesec.defenses.trap2 import EPOCH_SCHEDULE
from mergesec.models.artifact import ModelArtifact

CLIP_WORDS = ("photo", "drawing", "of", "a", "the", "shape", "something", "number", "image")


def word_tokenizer(words):
    """A lower-casing word-level tokenizer over ``words`` (BOS ... EOS), built offline."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<bos>": 1, "<unk>": 2, "<eos>": 3}
    for w in sorted(set(words)):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", 1), ("<eos>", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        unk_token="<unk>",
    )  # fmt: skip


def make_tiny_clip(path: Path, seed: int = 0) -> Path:
    """A random CLIP (hidden 32, 2 layers, 32-pixel images, 8-pixel patches) saved as a HF dir."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    words = set(CLIP_WORDS)
    for t in (*BUILTIN_TEMPLATES["synthetic_shapes"], *BUILTIN_TEMPLATES["synthetic_colors"]):
        for name in (*SHAPES, *COLORS):
            words.update(re.findall(r"\w+|[^\w\s]", t.replace("{}", name).lower()))
    tok = word_tokenizer(words)
    torch.manual_seed(seed)
    layers = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    cfg = CLIPConfig(
        text_config=dict(
            **layers, vocab_size=len(tok), max_position_embeddings=32,
            bos_token_id=1, eos_token_id=3, pad_token_id=0,
        ),
        vision_config=dict(**layers, image_size=32, patch_size=8),
        projection_dim=16,
        logit_scale_init_value=4.6052,  # exp = 100, OpenAI CLIP's trained value
    )  # fmt: skip
    CLIPModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    ).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    return make_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="module")
def saved_images(tmp_path_factory) -> dict[str, Path]:
    """The synthetic colour and shape datasets written with ``save_to_disk``."""
    root = tmp_path_factory.mktemp("images")
    out = {}
    for task in ("colors", "shapes"):
        synthetic_images(task, sizes=(192, 64, 64), seed=1).save_to_disk(str(root / task))
        out[task] = root / task
    return out


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models run faster on one thread than on two busy cores.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _ctx(tmp: Path, step: str, op: str, params: dict, inputs: dict | None = None) -> NodeContext:
    out = tmp / f"{step}-{op}-{len(list(tmp.iterdir()))}"
    out.mkdir()
    return NodeContext("n", step, op, params, inputs or {}, out)


def _finetune(tmp: Path, base: Path, uri: str, mode: str = "full", **params) -> Path:
    from mergesec.tasks.finetune import execute

    op = validate_params(get_op("finetune", mode), {"epochs": 2, "lr": 2e-3, **params})
    ctx = _ctx(tmp, "finetune", mode, {"base": str(base), "dataset": {"uri": uri}, "op": op})
    ctx.metrics = execute(ctx)  # type: ignore[attr-defined]
    return ctx.out_dir


# ---- datasets --------------------------------------------------------------------------------


def test_registry_names_the_eight_datasets_and_aircraft_without_downloading():
    names = set(IMAGE_DATASETS)
    assert names == {
        "sun397", "stanford_cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd",
        "fgvc_aircraft",
    }  # fmt: skip
    for info in IMAGE_DATASETS.values():
        assert info.templates and all("{}" in t for t in info.templates)
        if info.label_names is not None:
            assert len(info.label_names) == info.num_classes == len(set(info.label_names))
    # hub ids, mirrors and the forms used by the paper studies are image datasets, text ones not
    for uri in ("hf:tanganke/eurosat", "hf:ylecun/mnist", "hf:ufldl-stanford/svhn/cropped_digits",
                "hf:tanganke/svhn", "hf:myorg/stanford_cars", "hf:HuggingFaceM4/FGVC-Aircraft",
                "builtin:synthetic_shapes"):  # fmt: skip
        assert is_image_uri(uri), uri
    for uri in ("hf:glue/sst2", "builtin:synthetic_sentiment", "hf:openai/gsm8k/main"):
        assert not is_image_uri(uri), uri
    from mergesec.data.images import image_dataset_uri

    assert image_dataset_uri("svhn") == "hf:ufldl-stanford/svhn/cropped_digits"
    assert all(is_image_uri(image_dataset_uri(n)) for n in IMAGE_DATASETS)


def test_saved_dataset_and_image_folder_load_with_split_conventions(saved_images, tmp_path):
    from mergesec.data import check_dataset_uri, load_dataset_splits

    uri = f"hf:{saved_images['colors']}"
    assert check_dataset_uri(uri) is None
    data = load_dataset_splits(uri)
    assert data.kind == "image" and data.label_names == tuple(COLORS)
    assert (len(data.train), len(data.validation), len(data.test)) == (192, 64, 64)
    img, label = data.train[0]
    assert img.mode == "RGB" and img.size == (32, 32) and 0 <= label < 4
    assert load_dataset_splits(uri) is data, "loaded datasets are cached per process"

    # an image folder with a train split only: 10% of train becomes validation, test is carved
    for i in range(40):
        img, label = data.test[i]
        d = tmp_path / "folder" / "train" / data.label_names[label]
        d.mkdir(parents=True, exist_ok=True)
        img.save(d / f"{i}.png")
    folder = load_image_splits(str(tmp_path / "folder"))
    assert folder.label_names == tuple(sorted({data.label_names[y] for y in data.test.labels[:40]}))
    assert len(folder.train) + len(folder.validation) + len(folder.test) == 40
    assert len(folder.test) == 8 and len(folder.validation) == 3

    # a directory named like a registered dataset gets its conventions (and its class count)
    synthetic_images("colors", sizes=(8, 4, 4)).save_to_disk(str(tmp_path / "eurosat"))
    with pytest.raises(ValueError, match="expected 10 for eurosat"):
        load_image_splits(f"hf:{tmp_path / 'eurosat'}")


def test_builtin_images_are_deterministic_and_balanced():
    a, b = synthetic_images("shapes", sizes=(8, 4, 4)), synthetic_images("shapes", sizes=(8, 4, 4))
    assert list(a["train"]["label"]) == list(b["train"]["label"])
    assert a["train"][3]["image"].tobytes() == b["train"][3]["image"].tobytes()
    data = load_image_splits("builtin:synthetic_colors")
    counts = [data.train.labels.count(i) for i in range(4)]
    assert counts == [len(data.train) // 4] * 4


# ---- heads and the classifier ----------------------------------------------------------------


def test_zero_shot_head_reproduces_clip_logits(tiny_clip):
    """With one template, scale × cosine equals CLIPModel's own logits_per_image."""
    from transformers import AutoTokenizer, CLIPModel

    from mergesec.kinds.image.clip import ImageClassifier, load_image_processor, zero_shot_head
    from mergesec.models.hub import load_backbone

    data = load_image_splits("builtin:synthetic_colors")
    template = ("a photo of something {}.",)
    head = zero_shot_head(str(tiny_clip), data.label_names, template)
    assert head.class_embeddings.shape == (4, 16)
    assert torch.allclose(head.class_embeddings.norm(dim=1), torch.ones(4), atol=1e-5)
    assert head.logit_scale == pytest.approx(100.0, rel=1e-3)

    clf = ImageClassifier(load_backbone(str(tiny_clip)), head).eval()
    images = data.test.images(range(6))
    pix = load_image_processor(str(tiny_clip))(images=images, return_tensors="pt")["pixel_values"]
    assert pix.shape == (6, 3, 32, 32)
    clip = CLIPModel.from_pretrained(tiny_clip).eval()
    tok = AutoTokenizer.from_pretrained(tiny_clip)
    enc = tok(
        [template[0].replace("{}", c) for c in data.label_names], padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        ref = clip(
            input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], pixel_values=pix
        )
        ours = clf(pix)
    assert torch.allclose(ours, ref.logits_per_image, atol=1e-4)


def test_precision_is_chosen_at_run_time(tiny_clip, monkeypatch):
    from mergesec.kinds.image.task import ImageKind
    from mergesec.training.precision import choose_precision

    data = load_image_splits("builtin:synthetic_colors")
    task = ImageKind().build(str(tiny_clip), data)
    assert task.precision.name == "fp32" and choose_precision("cpu").dtype is None
    batch = next(task.batches(data.validation, 16))
    fp32 = task.logits(batch)
    monkeypatch.setenv("MERGESEC_PRECISION", "bf16")
    bf16 = choose_precision("cpu")
    assert bf16.name == "bf16" and bf16.dtype is torch.bfloat16
    with pytest.raises(ValueError, match="unknown precision"):
        choose_precision("cpu", "fp8")
    task.precision = bf16
    low = task.logits(batch)
    # preprocessing in DataLoader workers (the CUDA default) gives the same batches
    monkeypatch.setenv("MERGESEC_DATA_WORKERS", "2")
    par = list(task.batches(data.validation, 16, shuffle_seed=1))
    monkeypatch.setenv("MERGESEC_DATA_WORKERS", "0")
    seq = list(task.batches(data.validation, 16, shuffle_seed=1))
    assert len(par) == len(seq) == 6
    assert all(
        torch.equal(a["pixel_values"], b["pixel_values"]) for a, b in zip(par, seq, strict=True)
    )
    assert all(torch.equal(a["labels"], b["labels"]) for a, b in zip(par, seq, strict=True))
    assert low.dtype == torch.float32 and not torch.equal(low, fp32)
    assert torch.allclose(low, fp32, atol=1.0), "bf16 autocast stays close to float32"


# ---- fine-tuning, merging, evaluation --------------------------------------------------------


def test_full_and_lora_experts_train_and_store_clip_vision_backbones(tiny_clip, tmp_path):
    from mergesec.models.hub import base_weights_file, load_config
    from mergesec.models.layout import detect_layout
    from mergesec.models.state_dict import load_state_dict
    from mergesec.tasks.evaluate import evaluate_artifact

    base = load_state_dict(base_weights_file(str(tiny_clip)))
    full = ModelArtifact.open(_finetune(tmp_path, tiny_clip, "builtin:synthetic_colors", epochs=3))
    assert full.meta["kind"] == "image" and full.meta["release"] == "full"
    sd = full.backbone_state()
    assert set(sd) == set(base)
    layout = detect_layout(load_config(str(tiny_clip)).vision_config, sd.keys())
    assert layout.family == "clip_vision" and layout.num_layers == 2
    heads = full.all_heads()
    assert set(heads) == {
        f"synthetic_colors.{p}" for p in ("weight", "bias", "visual_projection", "logit_scale")
    }
    assert full.heads["synthetic_colors"].labels == list(COLORS)
    m = evaluate_artifact(
        full, [{"uri": "builtin:synthetic_colors"}, {"uri": "builtin:synthetic_shapes"}]
    )
    assert m["accuracy/synthetic_colors"] > 0.8, m
    assert set(m) == {
        "accuracy/synthetic_colors",
        "loss/synthetic_colors",
        "accuracy/mean",
    }, "no head, no score"
    with pytest.raises(ValueError, match="different kinds"):
        evaluate_artifact(
            full, [{"uri": "builtin:synthetic_colors"}, {"uri": "builtin:synthetic_sentiment"}]
        )

    lora_dir = _finetune(tmp_path, tiny_clip, "builtin:synthetic_colors", "lora", epochs=1, lr=5e-3,
                         target_modules=["q_proj", "v_proj"])  # fmt: skip
    lora = ModelArtifact.open(lora_dir)
    assert (
        lora.meta["release"] == "lora" and (lora_dir / "adapter" / "adapter_config.json").is_file()
    )
    lsd = lora.backbone_state()
    assert set(lsd) == set(base)
    changed = {k for k in base if not torch.equal(base[k], lsd[k])}
    assert changed and all(re.search(r"(q_proj|v_proj)\.weight$", k) for k in changed), changed


def test_study_merges_two_experts_on_saved_datasets(tiny_clip, saved_images, tmp_path):
    """A study on hf:<save_to_disk dir> image datasets, every node run in plan order."""
    from mergesec.orchestrator.plan import build_plan
    from mergesec.orchestrator.runner import execute_node
    from mergesec.orchestrator.spec import load_study
    from mergesec.orchestrator.store import Store
    from mergesec.report import build_results

    colors, shapes = f"hf:{saved_images['colors']}", f"hf:{saved_images['shapes']}"
    doc = {
        "study": "vision-merge",
        "base": str(tiny_clip),
        "datasets": [colors, shapes],
        "finetune": {"mode": "full", "epochs": 3, "lr": 2.0e-3, "batch_size": 32, "seed": 0},
        "scenarios": {"unprotected": {}},
        "victims": [colors],
        "merge": {"op": "task_arithmetic", "coefficient": 0.5},
        "evaluate": {"split": "test", "batch_size": 64},
    }
    f = tmp_path / "study.yaml"
    f.write_text(yaml.safe_dump(doc))
    plan = build_plan(load_study(f))
    store_dir = tmp_path / "store"
    store = Store(str(store_dir))
    for node in plan.topological():
        execute_node(node, store)
    rows = build_results(plan, store)
    assert len(plan.nodes) == 6 and all(store.is_done(n) for n in plan.nodes)
    row = rows[0]
    assert row["status"] == "done"
    assert row["victim_clean"] > 0.8, row  # the colour expert alone

    from mergesec.data import dataset_slug

    slugs = [dataset_slug(colors), dataset_slug(shapes)]
    by_step = {n.step: store.local_dir(i) for i, n in plan.nodes.items() if n.step == "merge"}
    merged = json.loads((by_step["merge"] / "model.json").read_text())
    assert merged["merge"] == "task_arithmetic" and set(merged["heads"]) == set(slugs)
    evals = [json.loads(p.read_text()) for p in (store_dir / "nodes").glob("*/metrics.json")]
    both = [m for m in evals if all(f"accuracy/{s}" in m for s in slugs)]
    assert len(both) == 1, "the merged model is evaluated on both datasets"
    assert all(0.0 <= both[0][f"accuracy/{s}"] <= 1.0 for s in slugs)
    assert both[0][f"normalized/{slugs[0]}"] == pytest.approx(
        both[0][f"accuracy/{slugs[0]}"] / row["victim_clean"]
    )


# ---- the steps that train or score through a task --------------------------------------------


def test_scorer_trap2_scale_curve_and_sft_for_images(tiny_clip, tmp_path):
    from mergesec.tasks.attack import execute_after_merge
    from mergesec.tasks.evaluate import evaluate_artifact
    from mergesec.tasks.merge_search import ValidationScorer
    from mergesec.tasks.protect import execute_training_protection
    from mergesec.tasks.scale_diagnostics import artifact_scale_curve

    ds = [{"uri": "builtin:synthetic_colors"}, {"uri": "builtin:synthetic_shapes"}]
    expert = ModelArtifact.open(
        _finetune(tmp_path, tiny_clip, "builtin:synthetic_colors", epochs=2)
    )

    scorer = ValidationScorer(str(tiny_clip), ds)
    assert scorer.kind.name == "image"
    scorer.load(expert.backbone_state())
    acc = scorer.accuracies(expert.all_heads(), ["synthetic_colors"])["synthetic_colors"]
    ref = evaluate_artifact(expert, ds[:1], split="validation")["accuracy/synthetic_colors"]
    assert acc == pytest.approx(ref)
    grams = scorer.grams("synthetic_colors", tmp_path / "grams.safetensors")
    key = "encoder.layers.0.self_attn.q_proj.weight"
    assert key in grams and grams[key].shape == (32, 32)
    assert torch.allclose(grams[key], grams[key].T, atol=1e-5)

    # Trap²: trained from the base like a fine-tune; its release is a protected expert
    ft = {"mode": "full", **validate_params(get_op("finetune", "full"), {"epochs": 1, "lr": 2e-3})}
    trap_op = get_op("protect", "trap2")
    p = validate_params(trap_op, {"lam": 0.5, **EPOCH_SCHEDULE})
    ctx = _ctx(tmp_path, "protect", "trap2",
               {"base": str(tiny_clip), "dataset": ds[0], "finetune": ft, "op": p})  # fmt: skip
    m = execute_training_protection(ctx)
    assert m["task_vector_norm/release"] > 0 and "skipped_steps" in m
    release = ModelArtifact.open(ctx.out_dir)
    assert release.meta["protect"] == "trap2" and release.meta["kind"] == "image"

    curve = artifact_scale_curve(release, ds[0], [0.0, 1.0])
    base_acc = curve[0]["accuracy"]
    assert [c["s"] for c in curve] == [0.0, 1.0]
    assert curve[1]["accuracy"] == pytest.approx(
        evaluate_artifact(release, ds[:1], split="validation")["accuracy/synthetic_colors"]
    )
    assert 0.0 <= base_acc <= 1.0

    op = get_op("attack", "finetune_after_merge")
    ap = validate_params(op, {"n": 32, "epochs": 1, "lr": 1e-3})
    actx = _ctx(tmp_path, "attack", op.name, {"dataset": ds[0], "datasets": ds, "op": ap},
                {"release": release.path})  # fmt: skip
    am = execute_after_merge(actx)
    assert am["examples"] == 32.0 and 0.0 <= am["attacker/accuracy_after"] <= 1.0
    assert ModelArtifact.open(actx.out_dir).meta["attack"] == "finetune_after_merge"
