"""State dicts and their safetensors IO, including lazy per-tensor reading for out-of-core merges."""

from __future__ import annotations

import json
import struct
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import NamedTuple

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


# safetensors dtype names -> torch dtypes read directly from the file (anything else goes through
# ``safe_open``).
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip


class _Entry(NamedTuple):
    path: Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    stop: int


def _safetensors_entries(path: Path) -> dict[str, _Entry]:
    """Every tensor's dtype, shape and byte range, from the file's JSON header."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    # in name order, as ``safe_open(...).keys()`` lists them
    header = dict(sorted(header.items()))
    return {
        k: _Entry(path, v["dtype"], tuple(v["shape"]), 8 + n + v["data_offsets"][0],
                  8 + n + v["data_offsets"][1])
        for k, v in header.items()
    }  # fmt: skip


class LazyStateDict(Mapping[str, torch.Tensor]):
    """A read-only mapping over one or more safetensors files that loads a tensor only when indexed.

    Nothing is kept after a lookup returns, so iterating over keys and reading one tensor at a time
    holds at most one tensor of this model in memory. A tensor is read with one positioned read of
    its byte range (at the disk's sequential speed, and without holding the GIL, so reader threads
    overlap) rather than through a memory map, whose first touches fault in one page at a time.
    """

    def __init__(self, paths: str | Path | list[str | Path]):
        self.paths = [Path(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]
        self._entries: dict[str, _Entry] = {}
        for p in self.paths:
            self._entries.update(_safetensors_entries(p))

    def __getitem__(self, key: str) -> torch.Tensor:
        e = self._entries[key]
        dtype = _DTYPES.get(e.dtype)
        if dtype is None or sys.byteorder != "little":
            with safe_open(str(e.path), framework="pt") as f:
                return f.get_tensor(key)
        size = e.stop - e.start
        if size == 0:
            return torch.empty(e.shape, dtype=dtype)
        buf = bytearray(size)
        with open(e.path, "rb", buffering=0) as f:
            f.seek(e.start)
            got = f.readinto(buf)
        if got != size:
            raise ValueError(f"{e.path}: tensor {key!r} is truncated ({got} of {size} bytes)")
        return torch.frombuffer(buf, dtype=dtype).reshape(e.shape)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key].shape

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
