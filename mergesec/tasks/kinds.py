"""Task kinds: what an expert does with its dataset, and the steps that depend on it.

mergesec knows three kinds, chosen by the dataset (never by the model):

- ``text``: sequence classification (``models.classifier``; the original pipeline, untouched);
- ``image``: CLIP image classification against frozen zero-shot heads (``mergesec.vision``);
- ``qa``: causal-LM question answering scored by exact match (``mergesec.lm``).

A kind (``ImageKind``, ``QAKind``) loads its datasets and builds a task object (``ImageTask``,
``QATask``) from the base or from a stored model; the functions here run the steps that train or
score through such a task: fine-tuning, evaluation, the merge step's validation scorer, Trap²
protection, fine-tuning after merging and the scale curve. The step modules call them for
datasets whose kind is not ``text`` and keep their own code for text.

Every model these steps write has ``kind`` in ``model.json``; its backbone uses the base's
canonical key names (``models.hub.base_weights_file``), so weight-space ops are kind-agnostic.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mergesec.core.context import NodeContext
from mergesec.models.artifact import ModelArtifact, write_artifact
from mergesec.models.state_dict import LazyStateDict, copy_into, save_state_dict
from mergesec.vision.loop import FitConfig, Precision, fit

TEXT, IMAGE, QA = "text", "image", "qa"
GRAM_EXAMPLES = 256
EVAL_BATCH = 64


# ---------------------------------------------------------------------------------------------
# Which kind
# ---------------------------------------------------------------------------------------------


def _ref(d: str | Mapping[str, Any]) -> tuple[str, Mapping[str, str] | None]:
    if isinstance(d, str):
        return d, None
    return d["uri"], d.get("columns")


def dataset_kind(d: str | Mapping[str, Any]) -> str:
    """``image``, ``qa`` or ``text`` for a dataset URI or ``{uri, columns}`` reference."""
    from mergesec.data.images import is_image_uri
    from mergesec.data.qa import is_qa_uri

    uri, columns = _ref(d)
    cols = dict(columns or {})
    if "image" in cols or is_image_uri(uri):
        return IMAGE
    if is_qa_uri(uri, cols):
        return QA
    return TEXT


def kind_for_datasets(datasets: Sequence[str | Mapping[str, Any]]) -> str:
    """The one kind shared by ``datasets``; ``ValueError`` when they mix kinds."""
    kinds = {dataset_kind(d) for d in datasets}
    if len(kinds) > 1:
        raise ValueError(f"datasets of different kinds cannot be combined: {sorted(kinds)}")
    return kinds.pop() if kinds else TEXT


def node_kind(ctx: NodeContext) -> str:
    """The kind of a node's dataset(s) (``params["dataset"]`` or ``params["datasets"]``)."""
    if "dataset" in ctx.params:
        return dataset_kind(ctx.params["dataset"])
    return kind_for_datasets(ctx.params.get("datasets", []))


def get_kind(name: str):
    """The kind object for ``image`` or ``qa``."""
    if name == IMAGE:
        from mergesec.vision.task import ImageKind

        return ImageKind()
    if name == QA:
        from mergesec.lm.task import QAKind

        return QAKind()
    raise ValueError(f"no task kind {name!r} here; known: {IMAGE}, {QA} (text lives in tasks/)")


# ---------------------------------------------------------------------------------------------
# Fine-tuning
# ---------------------------------------------------------------------------------------------


def fit_config(params: Mapping[str, Any]) -> FitConfig:
    """A ``FitConfig`` from finetune op params (``epochs``, ``lr``, ``batch_size``, ...)."""
    keys = ("epochs", "lr", "batch_size", "seed", "patience", "warmup_ratio", "weight_decay")
    return FitConfig(**{k: params[k] for k in keys if k in params})


def _no_poison(ctx: NodeContext) -> None:
    if ctx.params.get("poison"):
        raise ValueError("poisoned (backdoored) training is defined for text datasets only")


def _attach_lora(task: Any, params: Mapping[str, Any]) -> Any:
    torch.manual_seed(params.get("seed", 0))
    return task.attach_lora(
        r=params.get("r", 8),
        alpha=params.get("alpha", 16),
        dropout=params.get("dropout", 0.1),
        target_modules=params.get("target_modules"),
    )


def save_expert(
    ctx: NodeContext, kind: str, task: Any, data: Any, adapter: Any, extra: dict[str, Any]
) -> None:
    """Write a trained task model as a model artifact (LoRA: adapter and materialised weights)."""
    from mergesec.data import dataset_slug

    release = "full"
    if adapter is not None:
        adapter.save_pretrained(str(ctx.out_dir / "adapter"))
        release = "lora"
    slug = dataset_slug(data.name)
    write_artifact(
        ctx.out_dir,
        base=ctx.base,
        backbone=task.release_state(),
        heads=task.head_tensors(slug),
        head_info={slug: task.head_info(data)},
        extra={"release": release, "kind": kind, **extra},
    )


def finetune(ctx: NodeContext) -> dict[str, float]:
    """The finetune step for a non-text dataset: ``ctx.op`` is ``full`` or ``lora``."""
    _no_poison(ctx)
    if ctx.op not in ("full", "lora"):
        raise ValueError(f"finetune/{ctx.op} trains text classifiers only; use full or lora")
    name = node_kind(ctx)
    kind = get_kind(name)
    data = kind.load(ctx.params["dataset"])
    params = ctx.params["op"]
    torch.manual_seed(params.get("seed", 0))
    task = kind.build(ctx.base, data, device=ctx.device, allow_remote_code=ctx.allow_remote_code)
    adapter = _attach_lora(task, params) if ctx.op == "lora" else None
    metrics = fit(
        task, data.train, data.validation, fit_config(params),
        device=ctx.device, report=ctx.report, precision=task.precision,
    )  # fmt: skip
    save_expert(ctx, name, task, data, adapter, {"precision": task.precision.name})
    return metrics


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


def evaluate_artifact(
    art: ModelArtifact,
    datasets: Sequence[Mapping[str, Any]],
    *,
    split: str = "test",
    device: str = "cpu",
    allow_remote_code: bool = False,
    batch_size: int = EVAL_BATCH,
    **_: Any,
) -> dict[str, float]:
    """``accuracy/<slug>`` (top-1, or exact match for QA) and ``loss/<slug>`` for every dataset the
    artifact serves, plus ``accuracy/mean``."""
    from mergesec.data import dataset_slug

    name = kind_for_datasets(datasets)
    kind = get_kind(name)
    task = kind.from_artifact(art, device=device, allow_remote_code=allow_remote_code)
    heads = art.all_heads()
    metrics: dict[str, float] = {}
    for ds in datasets:
        slug = dataset_slug(ds["uri"])
        if slug not in art.heads:
            continue
        data = kind.load(ds)
        task.use(data, heads, slug)
        loss, acc = task.score(data.split(split), batch_size=batch_size)
        metrics[f"accuracy/{slug}"] = acc
        metrics[f"loss/{slug}"] = loss
    accs = [v for k, v in metrics.items() if k.startswith("accuracy/")]
    if accs:
        metrics["accuracy/mean"] = sum(accs) / len(accs)
    return metrics


# ---------------------------------------------------------------------------------------------
# The merge step's validation scorer
# ---------------------------------------------------------------------------------------------


def fixed_subset(split: Sequence, n: int, seed: int = 0) -> Any:
    """``n`` examples of ``split`` drawn without replacement with ``seed`` (all when fewer)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if n >= len(split):
        return split
    idx = sorted(random.Random(seed).sample(range(len(split)), n))
    if hasattr(split, "subset"):
        return split.subset(idx)
    return [split[i] for i in idx]


class _Holder:
    """``scorer.model.backbone``: the module the merge step copies candidate weights into."""

    def __init__(self, backbone: torch.nn.Module):
        self.backbone = backbone


class KindValidationScorer:
    """The merge step's scorer for image and QA datasets (same interface as
    ``tasks.merge.ValidationScorer``): one model on the base architecture, overwritten with each
    candidate's backbone, and each dataset's validation split prepared once."""

    def __init__(
        self,
        base_uri: str,
        datasets: Sequence[Mapping[str, Any]],
        *,
        device: str = "cpu",
        allow_remote_code: bool = False,
        subsets: Mapping[str, int] | None = None,
    ):
        from mergesec.data import dataset_slug

        self.kind = get_kind(kind_for_datasets(datasets))
        self.device = device
        self.data = {dataset_slug(d["uri"]): self.kind.load(d) for d in datasets}
        first = next(iter(self.data.values()))
        self.task = self.kind.build(
            base_uri, first, device=device, allow_remote_code=allow_remote_code
        )
        self.model = _Holder(self.task.backbone())
        self.prepared: dict[str, list] = {}
        for slug, data in self.data.items():
            self.task.use(data, None, slug)
            val = data.validation
            if subsets and slug in subsets:
                val = fixed_subset(val, subsets[slug], seed=0)
            self.prepared[slug] = self.task.prepare(val, EVAL_BATCH)

    def load(self, weights: Mapping[str, Tensor]) -> None:
        """Copy ``weights`` (backbone keys) into the model, one tensor at a time."""
        copy_into(self.model.backbone, weights)

    @torch.no_grad()
    def accuracies(self, heads: Mapping[str, Tensor], slugs: Sequence[str]) -> dict[str, float]:
        """Validation accuracy (exact match for QA) of the loaded backbone on each dataset."""
        out = {}
        for slug in slugs:
            self.task.use(self.data[slug], heads, slug)
            out[slug] = self.task.score_batches(self.prepared[slug])[1]
        return out

    def grams(self, slug: str, out_file: Path) -> LazyStateDict:
        """Input Gram matrices of the backbone's Linear layers on ``slug``'s validation inputs."""
        from mergesec.tasks.merge_methods import collect_linear_grams, grams_by_weight_key

        data = self.data[slug]
        self.task.use(data, None, slug)
        batches = self.task.prepare(fixed_subset(data.validation, GRAM_EXAMPLES), EVAL_BATCH)
        inputs = [self.kind.model_inputs(b, self.device) for b in batches]
        with self.task.precision.autocast():
            grams = collect_linear_grams(self.model.backbone, inputs)
        save_state_dict(grams_by_weight_key(grams), out_file)
        return LazyStateDict(out_file)


def validation_scorer(
    base_uri: str,
    datasets: Sequence[Mapping[str, Any]],
    *,
    device: str = "cpu",
    allow_remote_code: bool = False,
    subsets: Mapping[str, int] | None = None,
):
    """The merge step's validation scorer for ``datasets``' kind (text: ``ValidationScorer``)."""
    if kind_for_datasets(datasets) == TEXT:
        from mergesec.tasks.merge import ValidationScorer

        return ValidationScorer(
            base_uri, datasets, device=device, allow_remote_code=allow_remote_code, subsets=subsets
        )
    return KindValidationScorer(
        base_uri, datasets, device=device, allow_remote_code=allow_remote_code, subsets=subsets
    )


# ---------------------------------------------------------------------------------------------
# Trap², fine-tuning after merging, the scale curve
# ---------------------------------------------------------------------------------------------


def _custom_step_precision(task: Any) -> None:
    # A custom step takes its own optimiser steps, so float16 (which needs loss scaling) falls
    # back to float32; bfloat16 and float32 are kept.
    if task.precision.needs_scaler:
        task.precision = Precision(task.precision.device_type)


def execute_training_protection(ctx: NodeContext, op: Any) -> dict[str, float]:
    """``protect/trap2`` (trait ``trains``) for a non-text dataset: fine-tune from the base like
    ``finetune/<mode>`` with every step a Trap² step; write the release like an expert."""
    from mergesec.defenses.trap2 import Trap2Steps, base_params_of
    from mergesec.models.hub import base_weights_file
    from mergesec.models.state_dict import load_state_dict
    from mergesec.tasks.protect import task_vector_norm
    from mergesec.tasks.trap2_train import trap2_mode

    if op.name != "trap2":
        raise ValueError(f"protect/{op.name} trains text classifiers only")
    _no_poison(ctx)
    p = dict(ctx.params["op"])
    finetune_params = dict(ctx.params["finetune"])
    mode = trap2_mode(finetune_params)
    name = node_kind(ctx)
    kind = get_kind(name)
    data = kind.load(ctx.params["dataset"])
    torch.manual_seed(finetune_params.get("seed", 0))
    task = kind.build(ctx.base, data, device=ctx.device, allow_remote_code=ctx.allow_remote_code)
    adapter = _attach_lora(task, finetune_params) if mode == "lora" else None
    _custom_step_precision(task)
    task.model.to(ctx.device)
    base = base_params_of(task.model, mode)
    step = Trap2Steps(lambda overrides, batch: task.loss(batch, overrides), base or None,
                      mode=mode, **p)  # fmt: skip

    metrics = fit(
        task, data.train, data.validation, fit_config(finetune_params), device=ctx.device,
        report=ctx.report, step_fn=step, precision=task.precision,
    )  # fmt: skip
    metrics["skipped_steps"] = float(step.skipped)
    save_expert(
        ctx, name, task, data, adapter, {"protect": "trap2", "precision": task.precision.name}
    )
    released = ModelArtifact.open(ctx.out_dir).backbone_state()
    base_sd = load_state_dict(base_weights_file(ctx.base, ctx.allow_remote_code))
    return metrics | {"task_vector_norm/release": task_vector_norm(released, base_sd)}


def execute_after_merge(ctx: NodeContext, op: Any) -> dict[str, float]:
    """``attack/finetune_after_merge`` for a non-text dataset: fine-tune the merged backbone on
    ``n`` labelled victim examples (heads stay frozen) and write the merged model with it."""
    from mergesec.data import dataset_slug

    if op.name != "finetune_after_merge":
        raise ValueError(f"attack/{op.name} supports text datasets only")
    merged = ModelArtifact.open(ctx.inputs["release"])
    ds = ctx.params["dataset"]
    slug = dataset_slug(ds["uri"])
    if slug not in merged.heads:
        raise ValueError(f"the merged model has no head for the victim {ds['uri']}")
    name = dataset_kind(ds)
    kind = get_kind(name)
    data = kind.load(ds)
    task = kind.from_artifact(merged, device=ctx.device, allow_remote_code=ctx.allow_remote_code)
    heads = merged.all_heads()
    task.use(data, heads, slug)
    p = dict(ctx.params["op"])
    subset = fixed_subset(data.train, p.get("n", 64), seed=p.get("seed", 0))
    _, before = task.score(subset, batch_size=EVAL_BATCH)
    cfg = FitConfig(
        epochs=p.get("epochs", 5), lr=p.get("lr", 5e-5), batch_size=p.get("batch_size", 16),
        seed=p.get("seed", 0), patience=p.get("epochs", 5), weight_decay=0.0, log_every=1,
    )  # fmt: skip
    m = fit(
        task, subset, subset, cfg, device=ctx.device, report=ctx.report, precision=task.precision
    )
    write_artifact(
        ctx.out_dir,
        base=merged.base,
        backbone=task.release_state(),
        heads=heads,
        head_info=merged.heads,
        extra={
            "release": "full",
            "kind": name,
            "merge": merged.meta.get("merge"),
            "attack": op.name,
        },
    )
    return {
        "examples": float(len(subset)),
        "attacker/accuracy_before": before,
        "attacker/accuracy_after": m["val_accuracy"],
        "best_epoch": m["best_epoch"],
        "steps": m["steps"],
    }


def artifact_scale_curve(
    art: ModelArtifact,
    dataset: Mapping[str, Any],
    scales: Sequence[float],
    device: str = "cpu",
    allow_remote_code: bool = False,
    *,
    batch_size: int = EVAL_BATCH,
    **_: Any,
) -> list[dict[str, float]]:
    """``{s, loss, accuracy}`` on the validation split of W₀ + s·τ for each scale (non-text)."""
    from mergesec.data import dataset_slug
    from mergesec.defenses.scale_curve import scale_curve
    from mergesec.models.hub import base_weights_file
    from mergesec.models.state_dict import load_state_dict

    slug = dataset_slug(dataset["uri"])
    if slug not in art.heads:
        raise ValueError(
            f"{art.path} has no head for {dataset['uri']} (heads: {sorted(art.heads)})"
        )
    kind = get_kind(dataset_kind(dataset))
    data = kind.load(dataset)
    task = kind.from_artifact(art, device=device, allow_remote_code=allow_remote_code)
    task.use(data, art.all_heads(), slug)
    params = dict(task.model.named_parameters())
    prefix = task.backbone_prefix
    base = load_state_dict(base_weights_file(art.base, allow_remote_code))
    reference = {
        prefix + k: v.to(device)
        for k, v in base.items()
        if prefix + k in params and v.is_floating_point()
    }
    prepared = task.prepare(data.validation, batch_size)

    def evaluate(overrides: dict[str, Tensor] | None) -> tuple[float, float]:
        return task.score_batches(prepared, overrides)

    return scale_curve(task.model, reference, evaluate, list(scales), mode="full")
