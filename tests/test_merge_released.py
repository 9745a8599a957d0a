"""The released-code merge variants against small re-implementations of the released functions.

The references below restate, on tiny tensors, what Trap²'s released ``task_merger.py`` and
``merging_functions.py`` compute per key (``get_tsv_delta_w``, ``get_cart_delta_w``, ``dare-ties``
= ``get_dare_delta_w`` then ``ties_merging`` with its inclusive top-K mask) and the RegMean
closed form with off-diagonal shrinkage. Each op must match its reference to a relative error of
1e-6 (``REL``); the merged update is compared, i.e. (merged − θ_0) / coefficient.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from mergesec.core.registry import get_op, validate_params
from mergesec.merging.methods.dare import dare_ties, dare_ties_released, key_seed
from mergesec.merging.methods.regmean import regmean, regmean_released
from mergesec.merging.methods.svd import cart, cart_released, tsv, tsv_released
from mergesec.merging.methods.ties import trim_top_k, trim_top_k_inclusive

REL = 1e-6
KEY = "layer.weight"


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def rel_err(a: Tensor, b: Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def low_rank_tvs(n: int, shape: tuple[int, int], rank: int, seed: int) -> list[Tensor]:
    """LoRA-like task vectors B·A of rank ``rank``."""
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(shape[0], rank, generator=g) @ torch.randn(rank, shape[1], generator=g) * 0.1
        for _ in range(n)
    ]


def full_tvs(n: int, shape: tuple[int, ...], seed: int) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [0.1 * torch.randn(shape, generator=g) for _ in range(n)]


BASE_SEED = 99


def as_merged(tvs: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
    """A base and the task vectors the ops see: (θ_0 + τ) − θ_0 in float32, which is not τ to the
    last bit. The released TSV's null triplets are the singular vectors of that rounding noise,
    so a reference must see the very same task vectors."""
    base = torch.randn(tvs[0].shape, generator=torch.Generator().manual_seed(BASE_SEED))
    return base, [(base + t) - base for t in tvs]


def merged_update(op, tvs: list[Tensor], coefficient: float = 1.0, **params) -> Tensor:
    base, _ = as_merged(tvs)
    experts = [{KEY: base + t} for t in tvs]
    out = op({KEY: base}, experts, coefficient=coefficient, **params)[KEY]
    return (out - base) / coefficient


def seen(tvs: list[Tensor]) -> list[Tensor]:
    return as_merged(tvs)[1]


# ---- references, restating the released per-key functions ---------------------------------


def ref_topk_mask(rows: Tensor, k: float) -> Tensor:
    """``topk_values_mask``: per row, keep |x| >= the (d − int(d·k))-th smallest magnitude."""
    if k >= 1:
        return rows
    d = rows.shape[1]
    kth = rows.abs().kthvalue(d - int(d * k), dim=1, keepdim=True).values
    return rows * (rows.abs() >= kth)


def ref_ties(tvs: list[Tensor], k: float) -> Tensor:
    """``ties_merging`` on flattened task vectors: trim, elect sign (zeros to the majority),
    mean over the non-zero entries agreeing with it."""
    rows = ref_topk_mask(torch.vstack([t.flatten() for t in tvs]), k)
    sign = torch.sign(rows.sum(0))
    sign[sign == 0] = torch.sign(sign.sum())
    keep = torch.where(sign.unsqueeze(0) > 0, rows > 0, rows < 0)
    sel = rows * keep
    count = (sel != 0).sum(0).float().clamp(min=1)
    return (sel.sum(0) / count).reshape(tvs[0].shape)


def ref_dare(tvs: list[Tensor], p: float, draws: list[Tensor]) -> list[Tensor]:
    """``get_dare_delta_w(merge=False)``: keep where the uniform draw exceeds p, rescale."""
    return [t * (u > p).to(t.dtype) / (1.0 - p) for t, u in zip(tvs, draws, strict=True)]


def ref_tsv(tvs: list[Tensor]) -> Tensor:
    """``get_tsv_delta_w``: int(r/N) triplets per task placed in zero-initialised slots (null
    ones included), polar factors of the stacked U and V by SVD, all in float64."""
    n = len(tvs)
    for i, vec in enumerate(tvs):
        u, s, v = torch.linalg.svd(vec.double(), full_matrices=False)
        if i == 0:
            su, ss, sv = torch.zeros_like(u), torch.zeros_like(s), torch.zeros_like(v)
        r = int(s.shape[0] * (1 / n))
        su[:, i * r : (i + 1) * r] = u[:, :r]
        ss[i * r : (i + 1) * r] = s[:r]
        sv[i * r : (i + 1) * r, :] = v[:r, :]
    uu, _, vu = torch.linalg.svd(su, full_matrices=False)
    uv, _, vv = torch.linalg.svd(sv, full_matrices=False)
    return torch.linalg.multi_dot((uu, vu, torch.diag(ss), uv, vv)).float()


def ref_cart(tvs: list[Tensor], rank: float, weight: float = 0.1) -> Tensor:
    """``get_cart_delta_w``: τ̄ + weight · Σ LR_k(τ_i − τ̄), k = ceil(rank · min(m, n))."""
    avg = torch.stack(tvs).mean(0)
    acc = torch.zeros_like(avg)
    for t in tvs:
        c = t - avg
        if c.dim() != 2:
            acc += c
            continue
        u, s, vh = torch.linalg.svd(c.double(), full_matrices=False)
        k = math.ceil(rank * s.shape[0])
        acc += u[:, :k] @ torch.diag(s[:k]) @ vh[:k, :]
    return avg + weight * acc


def ref_regmean(ws: list[Tensor], grams: list[Tensor], alpha: float) -> Tensor:
    """RegMean's closed form: (Σ W_i G̃_i)(Σ G̃_i)⁻¹, G̃ = α·G + (1−α)·diag(G)."""
    gs = [alpha * g.double() + (1 - alpha) * torch.diag(torch.diagonal(g.double())) for g in grams]
    rhs = sum(w.double() @ g for w, g in zip(ws, gs, strict=True))
    return (rhs @ torch.linalg.inv(sum(gs))).float()


# ---- parity ---------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 3, 4])
def test_tsv_released_matches_the_released_tsv_on_low_rank_task_vectors(n):
    tvs = low_rank_tvs(n, (16, 12), rank=2, seed=n)  # int(12/n) >= 3 > rank: null triplets kept
    got = merged_update(tsv_released, tvs, coefficient=0.7)
    assert rel_err(got, ref_tsv(seen(tvs))) <= REL


def test_tsv_released_matches_on_full_rank_and_on_non_matrices():
    tvs = full_tvs(3, (10, 7), seed=1)
    assert rel_err(merged_update(tsv_released, tvs), ref_tsv(seen(tvs))) <= REL
    vecs = full_tvs(3, (9,), seed=2)
    assert rel_err(merged_update(tsv_released, vecs), torch.stack(seen(vecs)).mean(0)) <= REL


def test_keeping_null_triplets_is_what_separates_the_two_tsv_forms():
    low = low_rank_tvs(4, (24, 20), rank=2, seed=5)
    assert rel_err(merged_update(tsv, low), ref_tsv(seen(low))) > 0.05  # mergesec's TSV drops them
    full = full_tvs(4, (24, 20), seed=6)
    assert rel_err(merged_update(tsv, full), ref_tsv(seen(full))) < 1e-4  # nothing null to drop


@pytest.mark.parametrize("rank", [0.04, 0.16, 0.5])
def test_cart_released_matches_the_released_cart(rank):
    tvs = full_tvs(4, (12, 9), seed=3)
    got = merged_update(cart_released, tvs, coefficient=2.5, rank_fraction=rank)
    assert rel_err(got, ref_cart(seen(tvs), rank)) <= REL
    bias = full_tvs(4, (12,), seed=4)
    got = merged_update(cart_released, bias, coefficient=2.5, rank_fraction=rank)
    assert rel_err(got, ref_cart(seen(bias), rank)) <= REL


def test_the_two_cart_forms_reach_different_merges():
    tvs = full_tvs(3, (12, 9), seed=7)
    paper = merged_update(cart, tvs, coefficient=0.1, rank_fraction=0.16)
    released = merged_update(cart_released, tvs, coefficient=1.0, rank_fraction=0.16)
    # coefficient 0.1 in the paper's form = the released form at coefficient 1 (weight 0.1)
    assert rel_err(paper * 0.1, released) <= 1e-5
    doubled = merged_update(cart_released, tvs, coefficient=2.0, rank_fraction=0.16) * 2.0
    assert rel_err(doubled, 2 * released) <= REL  # the released coefficient scales the mean too


@pytest.mark.parametrize(("p", "k"), [(1e-5, 0.3), (0.5, 0.3), (0.3, 1.0), (0.9, 0.1)])
def test_dare_ties_released_matches_dare_then_the_released_ties(p, k):
    tvs = full_tvs(3, (8, 6), seed=11)
    seed = 4
    draws = [
        torch.rand(t.shape, generator=torch.Generator().manual_seed(key_seed(seed, KEY, i)))
        for i, t in enumerate(tvs)
    ]
    got = merged_update(dare_ties_released, tvs, coefficient=1.5, drop_rate=p, k=k, seed=seed)
    assert rel_err(got, ref_ties(ref_dare(seen(tvs), p, draws), k)) <= REL


def test_dare_ties_released_trims_and_the_trim_free_form_does_not():
    tvs = full_tvs(3, (8, 6), seed=12)
    trimmed = merged_update(dare_ties_released, tvs, drop_rate=0.0, k=0.1)
    untrimmed = merged_update(dare_ties, tvs, drop_rate=0.0)
    assert (trimmed != 0).sum() < (untrimmed != 0).sum()
    assert rel_err(merged_update(dare_ties_released, tvs, drop_rate=0.0, k=1.0), untrimmed) < REL


def test_the_released_trim_keeps_one_more_entry_than_the_exact_trim():
    t = torch.randn(50, generator=torch.Generator().manual_seed(0))
    assert int((trim_top_k_inclusive(t, 0.2) != 0).sum()) == 11
    assert int((trim_top_k(t, 0.2) != 0).sum()) == 10
    assert torch.equal(trim_top_k_inclusive(t, 1.0), t)


def test_regmean_released_is_regmean_with_the_released_settings():
    g = torch.Generator().manual_seed(8)
    ws = [torch.randn(5, 4, generator=g) for _ in range(3)]
    xs = [torch.randn(20, 4, generator=g) for _ in range(3)]
    grams = [x.T @ x / x.shape[0] for x in xs]
    base = {KEY: torch.zeros(5, 4)}
    experts = [{KEY: w} for w in ws]
    gram_dicts = [{KEY: gm} for gm in grams]
    got = regmean_released(base, experts, grams=gram_dicts)[KEY]
    assert rel_err(got, ref_regmean(ws, grams, alpha=0.5)) <= REL
    other = regmean(base, experts, grams=gram_dicts)[KEY]  # alpha 0.95
    assert rel_err(other, ref_regmean(ws, grams, alpha=0.95)) <= REL
    assert rel_err(got, other) > 1e-3
    op = get_op("merge", "regmean_released")
    assert validate_params(op, {})["gram_examples"] == 100
    assert validate_params(op, {})["gram_sample"] == "class_balanced"
    assert "grams" in op.traits


def test_released_variants_are_separate_ops_and_leave_the_existing_ones_alone():
    for name, searchable in {
        "tsv_released": {"coefficient"},
        "cart_released": {"coefficient", "rank_fraction"},
        "dare_ties_released": {"coefficient", "drop_rate", "k"},
        "regmean_released": {"coefficient", "alpha"},
    }.items():
        assert get_op("merge", name).searchable == searchable
    assert set(validate_params(get_op("merge", "dare_ties"), {})) == {
        "drop_rate", "coefficient", "seed",
    }  # fmt: skip
    assert set(validate_params(get_op("merge", "regmean"), {})) == {"grams", "alpha", "coefficient"}
