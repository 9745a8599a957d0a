"""Every registered ``merge/*`` op keeps the per-key contract of ``mergesec.merging.per_key``.

The ops come from the registry (plugins included), so a new merge op is checked here without
editing this file: streamed from safetensors files it writes bit for bit what the in-memory merge
computes; merging a subset of the keys gives that subset of the full merge; every key comes back
in the base's dtype and shape, and integer, bool and unchanged keys come back as the base's.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from mergesec.core.registry import Op, all_ops, validate_params
from mergesec.merging.stream import merge_in_memory, merged_files, stream_merge
from mergesec.models.state_dict import LazyStateDict, save_state_dict

BUILTIN = {"weight_average", "task_arithmetic", "ties", "dare_linear", "dare_ties", "tsv", "cart"}
MERGE_OPS = [op for op in all_ops() if op.step == "merge"]
UNCHANGED = "norm.bias"  # every expert leaves this key equal to the base


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # SVDs on tiny matrices are dominated by thread start-up on a shared CPU.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _base() -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "layer.0.weight": torch.randn(12, 8, generator=g),
        "layer.0.bias": torch.randn(12, generator=g),
        "layer.1.weight": torch.randn(6, 12, generator=g),
        "norm.weight": torch.ones(6),
        UNCHANGED: torch.zeros(6),
        "conv.weight": torch.randn(2, 3, 2, 2, generator=g),
        "half.weight": torch.randn(5, 4, generator=g).half(),
        "bf16.weight": torch.randn(4, 3, generator=g).to(torch.bfloat16),
        "scale": torch.tensor(0.5),
        "steps": torch.arange(6),
        "flags": torch.tensor([True, False]),
    }


def _experts(base: Mapping[str, Tensor], n: int = 3) -> list[dict[str, Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        e = {}
        for k, v in base.items():
            if v.is_floating_point() and k != UNCHANGED:
                e[k] = (v.float() + 0.1 * torch.randn(v.shape, generator=g)).to(v.dtype)
            elif not v.is_floating_point():
                e[k] = v.clone() + i if v.dtype != torch.bool else ~v  # experts disagree here too
            else:
                e[k] = v.clone()
        out.append(e)
    return out


def _grams(base: Mapping[str, Tensor], n: int) -> list[dict[str, Tensor]]:
    g = torch.Generator().manual_seed(2)
    grams = []
    for _ in range(n):
        d = {}
        for k, v in base.items():
            if v.dim() == 2 and v.is_floating_point():
                x = torch.randn(3 * v.shape[1], v.shape[1], generator=g)
                d[k] = x.T @ x / x.shape[0]
        grams.append(d)
    return grams


def _params(op: Op, base: Mapping[str, Tensor], n_experts: int) -> dict[str, Any]:
    """The op's defaults, plus the data-derived inputs its traits ask for."""
    params = validate_params(op, {})
    if "grams" in op.traits:
        params["grams"] = _grams(base, n_experts)
    return params


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[dict, list[dict], Path, list[Path]]:
    base, d = _base(), tmp_path_factory.mktemp("models")
    experts = _experts(base)
    save_state_dict(base, d / "base.safetensors")
    paths = []
    for i, e in enumerate(experts):
        paths.append(d / f"expert{i}.safetensors")
        save_state_dict(e, paths[-1])
    return base, experts, d / "base.safetensors", paths


def test_the_builtin_merge_ops_are_registered():
    assert BUILTIN | {"regmean"} <= {op.name for op in MERGE_OPS}


@pytest.mark.parametrize("op", MERGE_OPS, ids=[op.name for op in MERGE_OPS])
def test_stream_merge_equals_in_memory_merge(models, tmp_path, op):
    base, experts, base_path, expert_paths = models
    params = _params(op, base, len(experts))
    out = tmp_path / "merged.safetensors"
    lazy = [LazyStateDict(p) for p in expert_paths]
    stats = stream_merge(op.fn, LazyStateDict(base_path), lazy, params, out, max_shard_bytes=400)
    expected = merge_in_memory(op.fn, base, experts, params)
    merged = LazyStateDict(merged_files(out))
    assert len(stats.files) > 1, "the output was meant to be sharded"
    assert stats.tensors == len(base)
    assert stats.bytes_written == sum(t.numel() * t.element_size() for t in base.values())
    assert sorted(merged) == sorted(base) == sorted(expected)
    for k in base:
        assert torch.equal(merged[k], expected[k]), k
    changed = [k for k, v in base.items() if v.is_floating_point() and k != UNCHANGED]
    assert any(not torch.equal(expected[k], base[k]) for k in changed), "the op changed nothing"


@pytest.mark.parametrize("op", MERGE_OPS, ids=[op.name for op in MERGE_OPS])
def test_merging_a_subset_of_keys_gives_that_subset_of_the_full_merge(models, op):
    base, experts, _, _ = models
    params = _params(op, base, len(experts))
    full = op.fn(base, experts, **params)
    subsets = [["layer.1.weight", "half.weight"], ["conv.weight"], ["layer.0.bias", "steps"]]
    for keys in subsets:
        part = op.fn(
            {k: base[k] for k in keys}, [{k: e[k] for k in keys} for e in experts], **params
        )
        assert list(part) == keys
        for k in keys:
            assert torch.equal(part[k], full[k]), (keys, k)
    for k in base:  # one key at a time, as stream_merge calls the op
        one = op.fn({k: base[k]}, [{k: e[k]} for e in experts], **params)
        assert torch.equal(one[k], full[k]), k


@pytest.mark.parametrize("op", MERGE_OPS, ids=[op.name for op in MERGE_OPS])
def test_dtypes_shapes_and_passthrough_keys(models, op):
    base, experts, _, _ = models
    merged = op.fn(base, experts, **_params(op, base, len(experts)))
    assert list(merged) == list(base)
    for k, v in base.items():
        assert merged[k].dtype == v.dtype and merged[k].shape == v.shape, k
        if not v.is_floating_point() or k == UNCHANGED:
            assert torch.equal(merged[k], v), f"{k} should pass through unchanged"
