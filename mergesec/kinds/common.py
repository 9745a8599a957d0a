"""What the kinds whose model is ``backbone`` + a head (text, image) share, and loading stored
backbone weights into the base architecture (every kind)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mergesec.models.artifact import ModelArtifact
from mergesec.training.lora import wrap_with_lora


def load_backbone_weights(backbone: nn.Module, art: ModelArtifact) -> None:
    """Copy an artifact's backbone into ``backbone``; refuse weights of another architecture."""
    _, unexpected = backbone.load_state_dict(art.backbone_state(), strict=False)
    if unexpected:
        raise ValueError(
            f"{art.path}: weights do not fit the base model (unexpected key {unexpected[0]!r})"
        )


def state_on_cpu(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


class BackboneAndHead:
    """``TaskModel`` members for a classifier: a ``model`` with a ``backbone`` attribute and a
    head beside it, whose ``logits(batch, overrides)`` and ``prepare(split, batch_size)`` the
    kind defines. Loss is cross-entropy, the metric top-1 accuracy."""

    model: nn.Module
    device: str
    backbone_prefix = "backbone."

    def logits(self, batch: Any, overrides: Mapping[str, Tensor] | None = None) -> Tensor:
        raise NotImplementedError

    def prepare(self, split: Sequence[Any], batch_size: int) -> list[Any]:
        raise NotImplementedError

    def loss(self, batch: Any, overrides: Mapping[str, Tensor] | None = None) -> Tensor:
        labels = batch["labels"].to(self.device, non_blocking=True)
        return F.cross_entropy(self.logits(batch, overrides), labels)

    @torch.no_grad()
    def score_batches(
        self, batches: Iterable[Any], overrides: Mapping[str, Tensor] | None = None
    ) -> tuple[float, float]:
        """(mean cross-entropy, top-1 accuracy) over ``batches``."""
        was = self.model.training
        self.model.eval()
        total, correct, n = 0.0, 0, 0
        for b in batches:
            logits = self.logits(b, overrides)
            labels = b["labels"].to(self.device)
            total += float(F.cross_entropy(logits, labels, reduction="sum"))
            correct += int((logits.argmax(-1) == labels).sum())
            n += len(labels)
        self.model.train(was)
        return total / max(n, 1), correct / max(n, 1)

    def score(self, split: Sequence[Any], *, batch_size: int = 64) -> tuple[float, float]:
        return self.score_batches(self.prepare(split, batch_size))

    def backbone(self) -> nn.Module:
        return self.model.backbone

    def attach_lora(self, *, r: int, alpha: int, dropout: float, target_modules: Any) -> nn.Module:
        """Wrap the backbone in a peft LoRA adapter (all linear layers by default)."""
        self.model.backbone = wrap_with_lora(
            self.model.backbone, r=r, alpha=alpha, dropout=dropout, target_modules=target_modules
        )
        return self.model.backbone

    def release_state(self) -> dict[str, Tensor]:
        """The backbone's weights in base key names (a LoRA adapter materialised first)."""
        if hasattr(self.model.backbone, "merge_and_unload"):
            self.model.backbone = self.model.backbone.merge_and_unload()
        return state_on_cpu(self.model.backbone)
