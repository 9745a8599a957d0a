"""The LoRA factors of a stored release: its peft adapter (``adapter/``) read as
``{base weight key: (A, s·B)}`` with ΔW = s·B A and s the adapter's scale (α/r, α/√r with rsLoRA)."""

from __future__ import annotations

import json
from collections.abc import Collection
from pathlib import Path

from torch import Tensor

from mergesec.models.state_dict import load_state_dict

ADAPTER_DIR = "adapter"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."


def adapter_scale(config: dict) -> float:
    """s in ΔW = s·B A; refuses what is not one plain LoRA scale (DoRA, per-module ranks)."""
    if config.get("use_dora"):
        raise ValueError("the adapter is DoRA, whose update is not s·B A")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ValueError("the adapter has per-module ranks or alphas (rank_pattern/alpha_pattern)")
    r, alpha = int(config["r"]), float(config["lora_alpha"])
    return alpha / r**0.5 if config.get("use_rslora") else alpha / r


def base_key(adapter_key: str, factor: str) -> str:
    """``base_model.model.<path>.lora_A.weight`` -> ``<path>.weight``."""
    key = adapter_key.removeprefix(PEFT_PREFIX)
    return key.replace(f".lora_{factor}.weight", ".weight")


def read_lora_factors(
    model_dir: str | Path, base_keys: Collection[str]
) -> dict[str, tuple[Tensor, Tensor]]:
    """``{base key: (A [r, in], s·B [out, r])}`` of the release in ``model_dir``. Raises
    ``ValueError`` when it has no adapter or an adapter matrix names no weight of the base."""
    adapter = Path(model_dir) / ADAPTER_DIR
    if not (adapter / ADAPTER_WEIGHTS).is_file():
        raise ValueError(f"{model_dir} holds no LoRA adapter ({ADAPTER_DIR}/{ADAPTER_WEIGHTS})")
    scale = adapter_scale(json.loads((adapter / ADAPTER_CONFIG).read_text()))
    sd = load_state_dict(adapter / ADAPTER_WEIGHTS)
    a = {base_key(k, "A"): v for k, v in sd.items() if ".lora_A.weight" in k}
    b = {base_key(k, "B"): v for k, v in sd.items() if ".lora_B.weight" in k}
    if set(a) != set(b):
        raise ValueError(f"{adapter}: LoRA A and B matrices do not pair up")
    unknown = sorted(set(a) - set(base_keys))
    if unknown:
        raise ValueError(f"{adapter}: LoRA layer {unknown[0]!r} is no weight of the base")
    return {k: (a[k].float(), scale * b[k].float()) for k in sorted(a)}
