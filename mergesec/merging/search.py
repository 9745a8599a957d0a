"""Helpers of a searched merge: the candidate settings, merging one into a live module, and the
merged task vector Δ of ops whose coefficient only scales it (computed once per setting of the
other parameters, then applied as θ₀ + c·Δ for every candidate c)."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mergesec.core.registry import Op, is_search
from mergesec.merging.per_key import SCALES_RESULT, SCALES_TASK_VECTORS
from mergesec.merging.stream import (
    READERS,
    MergeFn,
    MergeStats,
    TensorSpec,
    read_ahead,
    write_stream,
)
from mergesec.models.state_dict import LazyStateDict, StateDict

SCALE = "coefficient"
# Δ of a setting stays in memory up to this size (float32 bytes), else goes to one scratch file.
DIRECTION_MEMORY_BYTES = 2 << 30


def candidates(params: dict[str, Any]) -> list[dict[str, Any]]:
    """Every combination of the searched parameters, the fixed ones filled in."""
    searched = {k: v["search"] for k, v in params.items() if is_search(v)}
    fixed = {k: v for k, v in params.items() if not is_search(v)}
    if not searched:
        return [fixed]
    names = list(searched)
    return [
        fixed | dict(zip(names, combo, strict=True))
        for combo in itertools.product(*searched.values())
    ]


def merge_into_module(
    op_fn: Callable[..., StateDict],
    base: Mapping[str, Tensor],
    experts: Sequence[Mapping[str, Tensor]],
    params: dict[str, Any],
    module: nn.Module,
) -> None:
    """Merge key by key (as ``stream_merge`` does) and copy each result into ``module``'s weights.

    ``module``'s state dict must have every key of ``base``; memory holds one tensor per expert.
    """
    sd = module.state_dict()
    missing = [k for k in base if k not in sd]
    if missing:
        raise ValueError(f"key {missing[0]!r} of the base is not a weight of the model")
    with torch.no_grad():
        for key in base:
            merged = op_fn({key: base[key]}, [{key: e[key]} for e in experts], **params)[key]
            sd[key].copy_(merged)


def scale_trait(op: Op) -> str | None:
    """How Δ is read off ``op`` when its ``coefficient`` is a pure scale of it (``per_key``)."""
    for trait in (SCALES_TASK_VECTORS, SCALES_RESULT):
        if trait in op.traits:
            return trait
    return None


def setting_key(params: Mapping[str, Any]) -> str:
    """What identifies a candidate's merged direction: every parameter but the coefficient."""
    return json.dumps({k: v for k, v in params.items() if k != SCALE}, sort_keys=True, default=repr)


def key_direction(
    op_fn: MergeFn, trait: str, key: str, b: Tensor, ts: Sequence[Tensor], params: dict[str, Any]
) -> Tensor | None:
    """Δ of one key in float32, such that ``op_fn`` at coefficient c gives ``(θ₀ + c·Δ)`` in the
    base's dtype; ``None`` where the op passes the base through (non-floating, or unchanged)."""
    if not b.is_floating_point() or all(torch.equal(t, b) for t in ts):
        return None
    bf = b.float()
    zero = {key: torch.zeros_like(bf)}
    unit = params | {SCALE: 1.0}
    if trait == SCALES_TASK_VECTORS:
        return op_fn(zero, [{key: t.float() - bf} for t in ts], **unit)[key]
    if trait == SCALES_RESULT:
        return op_fn(zero, [{key: t} for t in ts], **unit)[key] - bf
    raise ValueError(f"unknown scale trait {trait!r}")


def scaled(b: Tensor, delta: Tensor | None, coefficient: float) -> Tensor:
    """θ₀ + c·Δ in the base's dtype (the base itself where Δ is ``None``)."""
    if delta is None:
        return b
    return (b.float() + coefficient * delta).to(b.dtype)


def scaled_into(out: Tensor, b: Tensor, delta: Tensor | None, coefficient: float) -> None:
    """``out.copy_(scaled(b, delta, coefficient))`` without temporaries where ``out`` and ``b`` are
    float32: c·Δ written into ``out``, then θ₀ added in place (the same two roundings as
    ``scaled``, so the same bits)."""
    if delta is None or out.dtype != torch.float32 or b.dtype != torch.float32:
        out.copy_(scaled(b, delta, coefficient))
        return
    torch.mul(delta, coefficient, out=out)
    out.add_(b)


class MergedDirection:
    """Δ of every merged key for one setting: in memory, or in one safetensors file when larger
    than ``memory_bytes`` (keys the op passes through are not stored)."""

    def __init__(self, deltas: Mapping[str, Tensor], unchanged: set[str], path: Path | None):
        self.deltas, self.unchanged, self.path = deltas, unchanged, path

    @classmethod
    def compute(
        cls,
        op_fn: MergeFn,
        trait: str,
        base: Mapping[str, Tensor],
        experts: Sequence[Mapping[str, Tensor]],
        params: dict[str, Any],
        specs: Mapping[str, TensorSpec],
        scratch_file: Path,
        *,
        memory_bytes: int = DIRECTION_MEMORY_BYTES,
        readers: int = READERS,
    ) -> MergedDirection:
        """One merge's worth of work: read every key once (ahead, in threads) and keep its Δ."""
        floating = {k: TensorSpec(torch.float32, s.shape) for k, s in specs.items()
                    if s.dtype.is_floating_point}  # fmt: skip
        unchanged = {k for k in specs if k not in floating}

        def deltas(fill: bool) -> Iterator[tuple[str, Tensor]]:
            for key, (b, *ts) in read_ahead([base, *experts], floating, readers=readers):
                d = key_direction(op_fn, trait, key, b, ts, params)
                if d is None:
                    unchanged.add(key)
                    if fill:  # a file holds every floating key
                        yield key, torch.zeros(floating[key].shape)
                else:
                    yield key, d

        if sum(s.nbytes for s in floating.values()) <= memory_bytes:
            return cls(dict(deltas(fill=False)), unchanged, None)
        write_stream(floating, deltas(fill=True), scratch_file)
        return cls(LazyStateDict(scratch_file), unchanged, scratch_file)

    def delta(self, key: str) -> Tensor | None:
        return None if key in self.unchanged else self.deltas[key]

    def load_into(self, base: Mapping[str, Tensor], coefficient: float, module: nn.Module) -> None:
        """Copy θ₀ + c·Δ into ``module``'s weights of the same names, key by key."""
        sd = module.state_dict()
        missing = [k for k in base if k not in sd]
        if missing:
            raise ValueError(f"key {missing[0]!r} of the base is not a weight of the model")
        with torch.no_grad():
            for key, (b,) in read_ahead([base], list(base), readers=1):
                scaled_into(sd[key], b, self.delta(key), coefficient)

    def write(
        self,
        base: Mapping[str, Tensor],
        coefficient: float,
        specs: Mapping[str, TensorSpec],
        out_path: Path,
    ) -> MergeStats:
        """Write θ₀ + c·Δ for every key of ``specs`` as ``stream_merge`` would."""
        merged = (
            (key, scaled(b, self.delta(key), coefficient))
            for key, (b,) in read_ahead([base], specs, readers=1)
        )
        return write_stream(specs, merged, out_path)

    def close(self) -> None:
        self.deltas = {}
        if self.path is not None:
            self.path.unlink(missing_ok=True)


class CandidateLoader:
    """Loads candidate merges into ``module`` one after another, merging once per setting of the
    non-coefficient parameters for ops with a scale ``trait`` (the current Δ is kept until the
    setting changes; the best candidate's Δ is kept until a better one replaces it)."""

    def __init__(
        self,
        op_fn: MergeFn,
        trait: str | None,
        base: Mapping[str, Tensor],
        specs: Mapping[str, TensorSpec],
        module: nn.Module,
        scratch: Path,
    ):
        self.op_fn, self.trait, self.base, self.specs = op_fn, trait, base, specs
        self.module, self.scratch = module, scratch
        self.current: tuple[tuple[int, str], MergedDirection] | None = None
        self.kept: MergedDirection | None = None
        self._files = 0

    def load(self, variant: int, members: Sequence[Mapping[str, Tensor]], params: dict) -> None:
        """Merge ``members`` with ``params`` into the module."""
        if self.trait is None:
            merge_into_module(self.op_fn, self.base, members, params, self.module)
            return
        key = (variant, setting_key(params))
        if self.current is None or self.current[0] != key:
            self._drop_current()
            self._files += 1
            direction = MergedDirection.compute(
                self.op_fn, self.trait, self.base, members, params, self.specs,
                self.scratch / f"delta-{self._files}.safetensors",
            )  # fmt: skip
            self.current = (key, direction)
        self.current[1].load_into(self.base, params[SCALE], self.module)

    def keep_loaded(self) -> None:
        """Remember the loaded candidate's Δ as the best so far (ops with a scale trait)."""
        if self.current is None:
            return
        if self.kept is not None and self.kept is not self.current[1]:
            self.kept.close()
        self.kept = self.current[1]

    def _drop_current(self) -> None:
        if self.current is not None and self.current[1] is not self.kept:
            self.current[1].close()
        self.current = None

    def close(self) -> None:
        self._drop_current()
        if self.kept is not None:
            self.kept.close()
            self.kept = None
