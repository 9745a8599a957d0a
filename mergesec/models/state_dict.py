"""State dicts and their safetensors IO, including lazy per-tensor reading for out-of-core merges."""

from __future__ import annotations

import json
import os
import struct
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

StateDict = dict[str, torch.Tensor]

# safetensors dtype names; the raw-byte reads below and the streaming writer use this table
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


def read_safetensors_entries(path: str | Path) -> tuple[int, dict[str, dict]]:
    """(byte offset of the data section, the header's tensor entries) of a safetensors file."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return 8 + n, header


@dataclass(frozen=True)
class TensorLocation:
    """Where a tensor's bytes lie in a safetensors file, and how to view them."""

    path: Path
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


def read_tensor(location: TensorLocation, buffer: torch.Tensor | None = None) -> torch.Tensor:
    """The tensor at ``location`` read with positioned reads into ``buffer`` (uint8, exactly
    ``nbytes``) or a new one: memory of the caller's own, unlike ``safe_open``'s views of a memory
    map, which fault their pages in on first use and copy them on a write."""
    if buffer is None:
        buffer = torch.empty(location.nbytes, dtype=torch.uint8)
    elif buffer.dtype != torch.uint8 or buffer.numel() != location.nbytes:
        raise ValueError(f"a buffer of {location.nbytes} bytes is needed, got {buffer.numel()}")
    view = memoryview(buffer.numpy())
    fd = os.open(location.path, os.O_RDONLY)
    try:
        done = 0
        while done < location.nbytes:
            got = os.preadv(fd, [view[done:]], location.offset + done)
            if got == 0:
                raise ValueError(f"{location.path}: the file ends inside a tensor's data")
            done += got
    finally:
        os.close(fd)
    return buffer.view(location.dtype).reshape(location.shape)


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
        self._locations: dict[str, TensorLocation | None] | None = None
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

    def location(self, key: str) -> TensorLocation | None:
        """Where ``key``'s bytes lie, for ``read_tensor``; ``None`` where they cannot be read as
        raw bytes here (a dtype outside ``SAFETENSORS_DTYPES``, or a big-endian machine)."""
        if self._locations is None:
            self._locations = {}
            for p in self.paths:
                start, entries = read_safetensors_entries(p)
                for k, e in entries.items():
                    dtype = SAFETENSORS_DTYPES.get(e["dtype"])
                    begin, end = e["data_offsets"]
                    self._locations[k] = (
                        None
                        if dtype is None or sys.byteorder != "little"
                        else TensorLocation(p, start + begin, end - begin, dtype, tuple(e["shape"]))
                    )
        return self._locations.get(key)

    def read_into(self, key: str, buffer: torch.Tensor) -> torch.Tensor:
        """``self[key]`` read into ``buffer`` (uint8, ``location(key).nbytes`` long)."""
        location = self.location(key)
        if location is None:
            raise ValueError(f"{key!r}: its bytes cannot be read directly; index the mapping")
        return read_tensor(location, buffer)


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
