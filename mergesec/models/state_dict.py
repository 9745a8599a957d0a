"""State dicts and their safetensors IO, including lazy per-tensor reading for out-of-core merges."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

StateDict = dict[str, torch.Tensor]


def save_state_dict(
    state: Mapping[str, torch.Tensor], path: str | Path, metadata: dict | None = None
) -> None:
    """Write tensors to one safetensors file (contiguous, non-shared copies)."""
    tensors = {
        k: v.detach().contiguous().clone() if _shares_storage(v) else v.detach().contiguous()
        for k, v in state.items()
    }
    meta = {k: (v if isinstance(v, str) else json.dumps(v)) for k, v in (metadata or {}).items()}
    save_file(tensors, str(path), metadata=meta or None)


def _shares_storage(t: torch.Tensor) -> bool:
    return t.untyped_storage().nbytes() != t.numel() * t.element_size()


def load_state_dict(path: str | Path, device: str = "cpu") -> StateDict:
    """Read a whole safetensors file (legacy ``.bin``/``.pt`` only through ``weights_only=True``)."""
    path = Path(path)
    if path.suffix in {".bin", ".pt", ".pth"}:
        return torch.load(path, map_location=device, weights_only=True)
    with safe_open(str(path), framework="pt", device=device) as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


class LazyStateDict(Mapping[str, torch.Tensor]):
    """A read-only mapping over one or more safetensors files that loads a tensor only when indexed.

    Nothing is kept after a lookup returns, so iterating over keys and reading one tensor at a time
    holds at most one tensor of this model in memory.
    """

    def __init__(self, paths: str | Path | list[str | Path]):
        self.paths = [Path(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]
        self._where: dict[str, Path] = {}
        for p in self.paths:
            with safe_open(str(p), framework="pt") as f:
                for k in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                    self._where[k] = p

    def __getitem__(self, key: str) -> torch.Tensor:
        with safe_open(str(self._where[key]), framework="pt") as f:
            return f.get_tensor(key)

    def __contains__(self, key: object) -> bool:
        return key in self._where

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        with safe_open(str(self._where[key]), framework="pt") as f:
            return tuple(f.get_slice(key).get_shape())

    def nbytes(self) -> int:
        return sum(p.stat().st_size for p in self.paths)


def copy_into(module: torch.nn.Module, weights: Mapping[str, torch.Tensor]) -> None:
    """Copy ``weights`` into ``module``'s tensors of the same names, one tensor at a time (a lazy
    mapping is read key by key, so memory holds one extra tensor)."""
    sd = module.state_dict()
    missing = [k for k in weights if k not in sd]
    if missing:
        raise ValueError(f"key {missing[0]!r} is not a weight of the model")
    with torch.no_grad():
        for k in weights:
            sd[k].copy_(weights[k])


def state_dict_bytes(state: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def task_vector(
    finetuned: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor]
) -> StateDict:
    """θ_ft − θ_base for every floating tensor both share."""
    return {
        k: finetuned[k].float() - base[k].float()
        for k in finetuned
        if k in base and finetuned[k].is_floating_point()
    }
