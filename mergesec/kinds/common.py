"""What the kinds whose model is ``backbone`` + a head (text, image) share, and loading stored
backbone weights into the base architecture (every kind)."""

from __future__ import annotations

from typing import Any

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
    """``TaskModel`` members for a ``model`` with a ``backbone`` attribute and a head beside it."""

    model: nn.Module
    backbone_prefix = "backbone."

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
