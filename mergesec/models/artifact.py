"""The on-disk form of a model in the store: backbone weights, per-dataset heads, and metadata.

model.safetensors   backbone state dict (``AutoModel`` key names), or shards listed in
                    model.safetensors.index.json (the Hugging Face convention)
heads.safetensors   ``<slug>.weight`` / ``<slug>.bias`` for each dataset the model can classify
model.json          {"base": uri, "heads": {slug: {"dataset": uri, "labels": [...]}}, ...}
adapter/            a peft adapter, when the release is a LoRA adapter
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergesec.models.state_dict import LazyStateDict, StateDict, load_state_dict, save_state_dict

MODEL_FILE = "model.safetensors"
MODEL_INDEX = "model.safetensors.index.json"
HEADS_FILE = "heads.safetensors"
META_FILE = "model.json"


@dataclass
class HeadInfo:
    dataset: str
    labels: list[str]


@dataclass
class ModelArtifact:
    """A model directory in the store (read side)."""

    path: Path
    base: str
    heads: dict[str, HeadInfo] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def open(cls, path: str | Path) -> ModelArtifact:
        path = Path(path)
        meta_file = path / META_FILE
        if not meta_file.is_file():
            raise FileNotFoundError(f"{path} holds no model (no {META_FILE})")
        meta = json.loads(meta_file.read_text())
        heads = {k: HeadInfo(**v) for k, v in meta.get("heads", {}).items()}
        return cls(path, meta["base"], heads, meta)

    def weight_files(self) -> list[Path]:
        index = self.path / MODEL_INDEX
        if index.is_file():
            names = json.loads(index.read_text())["weight_map"].values()
            return [self.path / n for n in sorted(set(names))]
        return [self.path / MODEL_FILE]

    def backbone_lazy(self) -> LazyStateDict:
        return LazyStateDict(self.weight_files())

    def backbone_state(self) -> StateDict:
        out: StateDict = {}
        for f in self.weight_files():
            out.update(load_state_dict(f))
        return out

    def head_state(self, slug: str) -> StateDict:
        sd = load_state_dict(self.path / HEADS_FILE)
        return {"weight": sd[f"{slug}.weight"], "bias": sd[f"{slug}.bias"]}

    def all_heads(self) -> StateDict:
        return load_state_dict(self.path / HEADS_FILE)

    def nbytes(self) -> int:
        return sum(f.stat().st_size for f in self.weight_files())


def write_artifact(
    out_dir: str | Path,
    *,
    base: str,
    backbone: Mapping[str, torch.Tensor] | None,
    heads: Mapping[str, torch.Tensor],
    head_info: Mapping[str, HeadInfo],
    extra: dict[str, Any] | None = None,
) -> None:
    """Write a model directory. ``backbone=None`` means the caller already wrote the weight files."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if backbone is not None:
        save_state_dict(backbone, out / MODEL_FILE)
    save_state_dict(heads, out / HEADS_FILE)
    meta = {"base": base, "heads": {k: vars(v) for k, v in head_info.items()}, **(extra or {})}
    (out / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
