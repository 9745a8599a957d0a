"""The searched merge's shortcut: for ops whose coefficient only scales a merged task vector Δ, the
search merges once per setting and applies θ₀ + c·Δ per candidate. Checked bit for bit against
the ops themselves, and the merge node against its recompute-everything path."""

from __future__ import annotations

import json

import pytest
import torch
from test_merge_conformance import _base, _experts
from test_merge_search import DATASETS, experts  # noqa: F401 (fixture)

from mergesec.core.context import NodeContext
from mergesec.core.registry import all_ops, get_op, validate_params
from mergesec.merging.search import (
    MergedDirection,
    key_direction,
    scale_trait,
    scaled,
    scaled_into,
)
from mergesec.merging.stream import check_compatible
from mergesec.models.hub import model_identity
from mergesec.models.state_dict import load_state_dict
from mergesec.tasks import merge

LINEAR = {"task_arithmetic", "ties", "dare_linear", "dare_ties", "tsv", "regmean"}
SETTINGS = {"ties": {"k": 0.3}, "dare_linear": {"drop_rate": 0.4, "seed": 3},
            "dare_ties": {"drop_rate": 0.4, "seed": 3}, "tsv": {"rank_fraction": 0.5}}  # fmt: skip


def test_scale_traits_are_declared_where_the_coefficient_is_linear():
    declared = {op.name for op in all_ops() if op.step == "merge" and scale_trait(op)}
    assert declared >= LINEAR
    assert not {"cart", "weight_average"} & declared


def _grams(base, n):
    g = torch.Generator().manual_seed(2)
    out = []
    for _ in range(n):
        grams = {}
        for k, v in base.items():
            if v.dim() == 2 and v.is_floating_point():
                x = torch.randn(20, v.shape[1], generator=g)
                grams[k] = x.T @ x / 20
        out.append(grams)
    return out


SCALED = sorted(op.name for op in all_ops() if op.step == "merge" and scale_trait(op))


@pytest.mark.parametrize("name", SCALED)
def test_base_plus_c_delta_is_the_op_bit_for_bit(name):
    """Every op declaring a scale trait (plugins included) keeps its promise."""
    op = get_op("merge", name)
    base, expert_sds = _base(), _experts(_base())
    params = validate_params(op, SETTINGS.get(name, {}))
    params.pop("coefficient", None)
    if "grams" in op.traits:
        params |= {"grams": _grams(base, len(expert_sds)), "alpha": 0.9}
    for c in (0.3, 1.0, -0.7, 2.5):
        want = op.fn(base, expert_sds, **params, coefficient=c)
        for key, b in base.items():
            d = key_direction(op.fn, scale_trait(op), key, b, [e[key] for e in expert_sds], params)
            got = scaled(b, d, c)
            assert got.dtype == want[key].dtype, key
            assert torch.equal(got, want[key]), (name, key, c)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_scaled_into_writes_the_bits_of_scaled(dtype):
    g = torch.Generator().manual_seed(3)
    b = torch.randn(257, 33, generator=g).to(dtype)
    d = 1e-2 * torch.randn(257, 33, generator=g)
    for c in (0.3, 1.0, -0.7, 2.5):
        out = torch.full_like(b, float("nan"))
        scaled_into(out, b, d, c)
        assert torch.equal(out, scaled(b, d, c)), (dtype, c)
    out = torch.zeros_like(b)
    scaled_into(out, b, None, 0.5)
    assert torch.equal(out, b)


@pytest.mark.parametrize("memory_bytes", [1 << 30, 0])
def test_merged_direction_in_memory_or_on_disk(tmp_path, memory_bytes):
    op = get_op("merge", "ties")
    base, expert_sds = _base(), _experts(_base())
    specs = check_compatible(base, expert_sds)
    d = MergedDirection.compute(op.fn, scale_trait(op), base, expert_sds, {"k": 0.5}, specs,
                                tmp_path / "d.safetensors", memory_bytes=memory_bytes)  # fmt: skip
    assert (tmp_path / "d.safetensors").exists() == (memory_bytes == 0)
    d.write(base, 0.8, specs, tmp_path / "m.safetensors")
    got = load_state_dict(tmp_path / "m.safetensors")
    want = op.fn(base, expert_sds, k=0.5, coefficient=0.8)
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    d.close()
    assert not (tmp_path / "d.safetensors").exists()


def _run(tmp_path, tiny_bert, experts, op_name, op_params, name, attack=None):  # noqa: F811
    op = validate_params(get_op("merge", op_name), op_params)
    out = tmp_path / name
    out.mkdir()
    params = {"base": str(tiny_bert), "base_id": model_identity(str(tiny_bert)),
              "datasets": DATASETS, "op": op}  # fmt: skip
    if attack:
        a = validate_params(get_op("attack", "rescale"), attack)
        params["attack"] = {
            "op": "rescale",
            "version": "1",
            "params": a,
            "victim": "synthetic_sentiment",
        }
    reports: list = []
    ctx = NodeContext("m", "merge", op_name, params,
                      {f"expert.{s}": d for s, d in experts.items()}, out,
                      report=lambda m, s: reports.append((s, m)))  # fmt: skip
    metrics = merge.execute(ctx)
    return metrics, sorted(reports, key=lambda r: r[0]), load_state_dict(out / "model.safetensors")


CASES = [
    ("ties", {"k": {"search": [0.2, 0.6]}, "coefficient": {"search": [0.5, 1.0, 2.0]}}, None),
    (
        "dare_ties",
        {"coefficient": {"search": [2.0, 0.5, 1.0]}, "drop_rate": {"search": [0.1, 0.5]}},
        None,
    ),
    (
        "task_arithmetic",
        {"coefficient": {"search": [0.3, 1.0]}},
        {"scales": [0.5, 2.0], "n_val": 16},
    ),
    ("regmean", {"alpha": {"search": [0.5, 0.95]}, "coefficient": {"search": [0.5, 1.5]}}, None),
]


@pytest.mark.parametrize(("op_name", "op_params", "attack"), CASES, ids=[c[0] for c in CASES])
def test_search_equals_recomputing_every_candidate(
    tmp_path,
    tiny_bert,
    experts,  # noqa: F811 (the fixture)
    monkeypatch,
    op_name,
    op_params,
    attack,
):
    fast = _run(tmp_path, tiny_bert, experts, op_name, op_params, "fast", attack)
    monkeypatch.setattr(merge, "scale_trait", lambda _op: None)
    slow = _run(tmp_path, tiny_bert, experts, op_name, op_params, "slow", attack)
    assert fast[0] == slow[0]  # chosen values and best score
    assert json.dumps(fast[1]) == json.dumps(slow[1])  # every candidate's score, same steps
    assert len({r[1]["search/score"] for r in fast[1]}) > 1
    assert fast[2].keys() == slow[2].keys()
    for k in slow[2]:
        assert torch.equal(fast[2][k], slow[2][k]), k
