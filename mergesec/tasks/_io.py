"""What several step executors share: building a node's task model, writing a trained model,
reading the base, and the size of a task vector."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from torch import Tensor

from mergesec.core.context import NodeContext
from mergesec.core.protocols import Splits, TaskKind, TaskModel
from mergesec.data import dataset_slug
from mergesec.kinds import build_options, get_kind, kind_for_datasets
from mergesec.models.artifact import ModelArtifact, write_artifact
from mergesec.models.hub import base_weights_file, load_config
from mergesec.models.state_dict import StateDict, load_state_dict


def node_kind(ctx: NodeContext) -> TaskKind:
    """The kind of a node's dataset(s) (``params["dataset"]`` or ``params["datasets"]``)."""
    if "dataset" in ctx.params:
        return get_kind(kind_for_datasets([ctx.params["dataset"]]))
    return get_kind(kind_for_datasets(ctx.params.get("datasets", [])))


def build_for_node(
    ctx: NodeContext, kind: TaskKind, data: Splits, params: Mapping[str, Any]
) -> TaskModel:
    """A fresh task model from the node's base for ``data``, seeded with ``params["seed"]``."""
    return kind.build(
        ctx.base, data, device=ctx.device, allow_remote_code=ctx.allow_remote_code,
        seed=params.get("seed", 0), **build_options(kind, params),
    )  # fmt: skip


def open_for_node(
    ctx: NodeContext, kind: TaskKind, art: ModelArtifact, params: Mapping[str, Any]
) -> TaskModel:
    """A stored model on the node's device, with the kind's options from ``params``."""
    return kind.from_artifact(
        art, device=ctx.device, allow_remote_code=ctx.allow_remote_code,
        **build_options(kind, params),
    )  # fmt: skip


def lora_adapter(task: TaskModel) -> Any:
    """The peft model wrapping the task's backbone, or None for full fine-tuning."""
    for module in (task.backbone(), *task.model.modules()):
        if hasattr(module, "peft_config") and hasattr(module, "save_pretrained"):
            return module
    return None


def save_expert(
    ctx: NodeContext, kind: TaskKind, task: TaskModel, data: Splits, extra: Mapping[str, Any]
) -> None:
    """Write a trained task model as a model artifact (LoRA: the adapter too, and the
    materialised weights W₀ + (α/r)·BA as the backbone)."""

    release = "full"
    adapter = lora_adapter(task)
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
        extra={"release": release, "kind": kind.name, **extra},
    )


def base_state(ctx: NodeContext) -> StateDict:
    """The base's canonical backbone weights."""

    return load_state_dict(base_weights_file(ctx.base, ctx.allow_remote_code))


def base_and_layout(ctx: NodeContext, keys: Iterable[str]):
    """The canonical base weights and the transformer layout of the base's architecture."""
    from mergesec.models.layout import detect_layout

    layout = detect_layout(load_config(ctx.base, ctx.allow_remote_code), keys)
    return base_state(ctx), layout


def task_vector_norm(sd: Mapping[str, Tensor], base: Mapping[str, Tensor]) -> float:
    total = 0.0
    for k, v in sd.items():
        if k in base and v.is_floating_point():
            total += float((v.double() - base[k].double()).pow(2).sum())
    return total**0.5
