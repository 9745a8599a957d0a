"""The per-key merge contract shared by every ``merge/*`` op, and its helpers.

Every ``merge/*`` op has the signature ``fn(base, experts, *, <params>) -> StateDict`` and returns
the merged weights (not a task vector) for every key of ``base``. Task vectors are
``τ_i = θ_i − θ_0``. Conventions shared by all ops:

- Integer and bool tensors, and keys where every expert equals the base, pass through unchanged.
- Arithmetic runs in float32 (RegMean's linear solve in float64); results come back in the base
  tensor's dtype.
- Everything is computed per tensor, so calling an op on one key (as ``stream_merge`` does) gives
  the same result as calling it on the whole state dict. In particular TIES trims the top-k
  entries of each task vector *per tensor*, as mergekit does, not over the flattened model as the
  original TIES code does; and DARE draws its masks from a generator seeded by
  ``(seed, key, expert index)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import Tensor

from mergesec.models.state_dict import StateDict

# Traits of ops whose ``coefficient`` is a pure scale of a merged task vector Δ: for every key,
# ``op(θ₀, experts, coefficient=c) == (θ₀ + c·Δ)`` bit for bit (float32, then the base's dtype),
# so a search computes Δ once per setting of the other parameters and applies each c to it
# (``merging.search``). They differ in how Δ is read off the op:
# - SCALES_TASK_VECTORS: Δ depends on the task vectors τ_i alone, Δ = op(0, [τ_i], coefficient=1);
# - SCALES_RESULT: the op interpolates to a result R of the experts, Δ = op(0, [θ_i], 1) − θ₀.
SCALES_TASK_VECTORS = "coefficient_scales_task_vectors"
SCALES_RESULT = "coefficient_scales_result"

# (key, base as float32, experts as float32) -> merged weights as float32
Combine = Callable[[str, Tensor, list[Tensor]], Tensor]


class OwnedTensors(dict[str, Tensor]):
    """A state dict whose tensors are temporaries nobody else reads (``stream_merge`` reads each
    key into buffers it reuses once the key is written): an op may compute in place in them."""


def owned(*states: Mapping[str, Tensor]) -> bool:
    """Whether an op may overwrite the tensors of every one of ``states``."""
    return all(isinstance(s, OwnedTensors) for s in states)


def task_vectors(b: Tensor, ts: Iterable[Tensor], *, in_place: bool) -> Iterator[Tensor]:
    """τ_i = t_i − b one at a time, written over ``t_i`` when ``in_place`` (the same bits)."""
    for t in ts:
        yield t.sub_(b) if in_place else t - b


def merge_per_key(
    base: Mapping[str, Tensor], experts: Sequence[Mapping[str, Tensor]], combine: Combine
) -> StateDict:
    """Apply ``combine`` to each floating key of ``base`` that some expert changed.

    Checks that every expert has each key with the base's shape; other keys pass through.
    """
    if not experts:
        raise ValueError("merging needs at least one expert")
    out: StateDict = {}
    for key, b in base.items():
        ts = []
        for i, e in enumerate(experts):
            try:
                t = e[key]
            except KeyError:
                raise ValueError(
                    f"key {key!r}: expert {i} does not have it, base has shape {tuple(b.shape)}"
                ) from None
            if t.shape != b.shape:
                raise ValueError(
                    f"key {key!r}: expert {i} has shape {tuple(t.shape)}, base has {tuple(b.shape)}"
                )
            ts.append(t)
        if not b.is_floating_point() or all(torch.equal(t, b) for t in ts):
            out[key] = b
            continue
        merged = combine(key, b.float(), [t.to(device=b.device, dtype=torch.float32) for t in ts])
        out[key] = merged.to(b.dtype)
    return out


def accumulate(tensors: Iterable[Tensor], *, fresh: bool = False) -> Tensor:
    """Sum of tensors produced one at a time, holding one running sum (not a stack of all).

    With ``fresh`` the tensors are temporaries nobody else holds, so the first one becomes the
    running sum instead of being copied.
    """
    it = iter(tensors)
    first = next(it)
    acc = first if fresh else first.clone()
    for t in it:
        acc += t
    return acc


def mean(ts: Sequence[Tensor]) -> Tensor:
    """The mean of ``ts``, summed one at a time."""
    return accumulate(ts).div_(len(ts))


def stacked(ts: Sequence[Tensor], make: Callable[[int, Tensor], Tensor]) -> Tensor:
    """``torch.stack([make(i, t) for ...])`` filled one row at a time."""
    out = torch.empty((len(ts), *ts[0].shape), dtype=ts[0].dtype, device=ts[0].device)
    for i, t in enumerate(ts):
        out[i] = make(i, t)
    return out


def check_fraction(
    name: str, value: float, *, low_open: bool = True, high_open: bool = False
) -> None:
    """Raise ``ValueError`` unless ``value`` lies in the interval (0 or [0) to (1] or 1))."""
    ok_low = value > 0 if low_open else value >= 0
    ok_high = value < 1 if high_open else value <= 1
    if not (ok_low and ok_high):
        lo = "(0" if low_open else "[0"
        hi = "1)" if high_open else "1]"
        raise ValueError(f"{name} must be in {lo}, {hi}, got {value}")
