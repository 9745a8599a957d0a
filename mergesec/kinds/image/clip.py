"""CLIP image classification in the task-vectors convention.

The base is a full ``CLIPModel`` directory (text and vision towers). An expert fine-tunes the
vision tower (``CLIPVisionModel``, the ``clip_vision`` layout) against a frozen zero-shot head:

    e_c = normalize(mean_t normalize(text_projection(text_tower(template_t(class_c)))))
    logits = logit_scale · normalize(visual_projection(vision_tower(x).pooler_output)) · e_cᵀ

The head is stored per dataset in ``heads.safetensors`` as ``<slug>.weight`` (the class
embeddings e, ``[classes, proj_dim]``), ``<slug>.bias`` (zeros, so the file keeps the layout of a
linear head), ``<slug>.visual_projection`` (``[proj_dim, hidden]``, frozen) and
``<slug>.logit_scale`` (the exponentiated scale, 100 for OpenAI CLIP).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mergesec.models.hub import load_tokenizer, model_identity, resolve_model_path

HEAD_PARTS = ("weight", "bias", "visual_projection", "logit_scale")


@dataclass(frozen=True)
class ZeroShotHead:
    """Frozen classification head: unit class embeddings, the visual projection, the logit scale."""

    class_embeddings: Tensor
    projection: Tensor
    logit_scale: float

    @property
    def num_classes(self) -> int:
        return int(self.class_embeddings.shape[0])

    def tensors(self, slug: str) -> dict[str, Tensor]:
        """The head as ``heads.safetensors`` entries for dataset ``slug``."""
        ce = self.class_embeddings.detach().float().cpu().contiguous()
        return {
            f"{slug}.weight": ce,
            f"{slug}.bias": torch.zeros(ce.shape[0]),
            f"{slug}.visual_projection": self.projection.detach().float().cpu().contiguous(),
            f"{slug}.logit_scale": torch.tensor([float(self.logit_scale)]),
        }

    @classmethod
    def from_tensors(cls, heads: Mapping[str, Tensor], slug: str) -> ZeroShotHead:
        missing = [p for p in HEAD_PARTS if f"{slug}.{p}" not in heads]
        if missing:
            raise KeyError(f"no zero-shot head for {slug!r} (missing {slug}.{missing[0]})")
        return cls(
            heads[f"{slug}.weight"].float(),
            heads[f"{slug}.visual_projection"].float(),
            float(heads[f"{slug}.logit_scale"].reshape(-1)[0]),
        )


def is_clip_config(config: Any) -> bool:
    return getattr(config, "model_type", None) == "clip"


def load_clip(uri: str, allow_remote_code: bool = False):
    """The full ``CLIPModel`` of a base URI, float32, eval mode."""
    from transformers import AutoConfig, CLIPModel

    path = resolve_model_path(uri)
    config = AutoConfig.from_pretrained(path, trust_remote_code=allow_remote_code)
    if not is_clip_config(config):
        raise ValueError(
            f"{uri} is a {config.model_type!r} model; image datasets need a CLIP base "
            "(a CLIPModel directory with text and vision towers)"
        )
    return CLIPModel.from_pretrained(path, dtype=torch.float32).eval()


def load_image_processor(uri: str):
    """The base's image processor (``preprocessor_config.json``; a CLIPImageProcessor)."""
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(resolve_model_path(uri))


def prompts(class_name: str, templates: Sequence[str]) -> list[str]:
    return [t.replace("{}", class_name) for t in templates]


@torch.no_grad()
def class_embeddings(
    clip: nn.Module,
    tokenizer: Any,
    class_names: Sequence[str],
    templates: Sequence[str],
    *,
    device: str = "cpu",
    batch_size: int = 256,
) -> Tensor:
    """Unit class embeddings ``[classes, proj_dim]``: each class's prompt embeddings (through the
    text tower and text projection) normalised, averaged over templates and normalised again."""
    if not templates:
        raise ValueError("at least one prompt template is needed")
    clip = clip.to(device).eval()
    max_len = int(clip.config.text_config.max_position_embeddings)
    texts = [p for c in class_names for p in prompts(c, templates)]
    feats = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(
            texts[i : i + batch_size], padding=True, truncation=True, max_length=max_len,
            return_tensors="pt",
        )  # fmt: skip
        out = clip.text_model(
            input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device)
        )
        feats.append(F.normalize(clip.text_projection(out.pooler_output).float(), dim=-1))
    per_prompt = torch.cat(feats).reshape(len(class_names), len(templates), -1)
    return F.normalize(per_prompt.mean(1), dim=-1).cpu()


def zero_shot_head(
    uri: str,
    class_names: Sequence[str],
    templates: Sequence[str],
    *,
    device: str = "cpu",
    allow_remote_code: bool = False,
) -> ZeroShotHead:
    """The zero-shot head of ``class_names`` under ``templates`` for the CLIP base ``uri`` (cached
    per process by base identity, names and templates)."""

    return _zero_shot_head(
        uri, model_identity(uri), tuple(class_names), tuple(templates), device, allow_remote_code
    )


@lru_cache(maxsize=32)
def _zero_shot_head(
    uri: str,
    _identity: str,
    class_names: tuple[str, ...],
    templates: tuple[str, ...],
    device: str,
    allow_remote_code: bool,
) -> ZeroShotHead:

    clip = load_clip(uri, allow_remote_code)
    tokenizer = load_tokenizer(uri, allow_remote_code)
    emb = class_embeddings(clip, tokenizer, class_names, templates, device=device)
    return ZeroShotHead(
        emb,
        clip.visual_projection.weight.detach().float().cpu().clone(),
        float(clip.logit_scale.detach().exp()),
    )


class ImageClassifier(nn.Module):
    """``backbone`` (a ``CLIPVisionModel``) + frozen visual projection + zero-shot head."""

    def __init__(self, backbone: nn.Module, head: ZeroShotHead):
        super().__init__()
        self.backbone = backbone
        self.register_buffer("projection", head.projection.clone(), persistent=False)
        self.register_buffer("class_embeddings", head.class_embeddings.clone(), persistent=False)
        self.logit_scale = head.logit_scale

    def set_head(self, head: ZeroShotHead) -> None:
        """Classify into ``head``'s classes from now on (the backbone is untouched)."""
        device = self.projection.device
        self.projection = head.projection.to(device)
        self.class_embeddings = head.class_embeddings.to(device)
        self.logit_scale = head.logit_scale

    def features(self, pixel_values: Tensor) -> Tensor:
        """Unit image embeddings ``[batch, proj_dim]``."""
        pooled = self.backbone(pixel_values=pixel_values).pooler_output
        return F.normalize(pooled @ self.projection.to(pooled.dtype).T, dim=-1)

    def forward(self, pixel_values: Tensor) -> Tensor:
        emb = self.features(pixel_values)
        return self.logit_scale * emb @ self.class_embeddings.to(emb.dtype).T
