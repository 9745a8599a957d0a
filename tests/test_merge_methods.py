"""Merge operators on hand-checkable tensors; expected values are worked out in the tests."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertModel

from mergesec.core.registry import get_op
from mergesec.merging.grams import collect_linear_grams, grams_by_weight_key
from mergesec.merging.methods.dare import dare_linear, dare_ties
from mergesec.merging.methods.linear import task_arithmetic, weight_average
from mergesec.merging.methods.regmean import regmean, regmean_linear
from mergesec.merging.methods.svd import cart, tsv
from mergesec.merging.methods.ties import elect_sign_disjoint_mean, ties, trim_top_k


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # SVDs on tiny matrices are dominated by thread start-up on a shared CPU.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def _experts(base: dict, *deltas: dict) -> list[dict]:
    return [{k: base[k] + d[k] for k in base} for d in deltas]


def test_ops_are_registered_with_their_searchable_params():
    expected = {
        "weight_average": set(),
        "task_arithmetic": {"coefficient"},
        "ties": {"coefficient", "k"},
        "dare_linear": {"coefficient", "drop_rate"},
        "dare_ties": {"coefficient", "drop_rate"},
        "tsv": {"coefficient", "rank_fraction"},
        "cart": {"coefficient", "rank_fraction"},
        "regmean": {"coefficient", "alpha"},
    }
    for name, searchable in expected.items():
        op = get_op("merge", name)
        assert set(op.searchable) == searchable, name
    assert get_op("merge", "ties").param("k").default == 0.2
    assert get_op("merge", "cart").param("rank_fraction").default == 0.16
    assert get_op("merge", "weight_average").params == ()


def test_task_arithmetic_and_weight_average_by_hand():
    base = {"w": _t([[1, 2, 3], [4, 5, 6]])}
    e1, e2 = _experts(base, {"w": _t([[1, 0, -1], [0, 2, 0]])}, {"w": _t([[0, 1, 1], [-2, 0, 0]])})
    ta = task_arithmetic(base, [e1, e2], coefficient=0.5)
    # base + 0.5 * ([[1,1,0],[-2,2,0]])
    assert torch.equal(ta["w"], _t([[1.5, 2.5, 3], [3, 6, 6]]))
    avg = weight_average(base, [e1, e2])
    # e1 = [[2,2,2],[4,7,6]], e2 = [[1,3,4],[2,5,6]]
    assert torch.equal(avg["w"], _t([[1.5, 2.5, 3], [3, 6, 6]]))
    ta1 = task_arithmetic(base, [e1, e2], coefficient=1.0)
    assert torch.equal(ta1["w"], _t([[2, 3, 3], [2, 7, 6]]))


def test_ties_trim_elect_disjoint_mean_by_hand():
    base = {"w": torch.ones(2, 3)}
    tau1 = _t([[4, -1, 2], [-3, 0.5, 1]])  # top 3: 4, -3, 2
    tau2 = _t([[-2, 3, -1], [5, -0.2, 0.1]])  # top 3: 5, 3, -2
    tau3 = _t([[1, -6, 0.3], [-4, 2, 0.2]])  # top 3: -6, -4, 2
    experts = _experts(base, {"w": tau1}, {"w": tau2}, {"w": tau3})
    out = ties(base, experts, k=0.5, coefficient=0.5)
    # trimmed: [[4,0,2],[-3,0,0]], [[-2,3,0],[5,0,0]], [[0,-6,0],[-4,2,0]]
    # sums [[2,-3,2],[-2,2,0]] -> signs + - + / - + (0 -> majority +)
    # agreeing means: 4, -6, 2 / mean(-3,-4) = -3.5, 2, nothing -> 0
    merged_tv = _t([[4, -6, 2], [-3.5, 2, 0]])
    assert torch.allclose(out["w"], 1 + 0.5 * merged_tv)


def test_ties_zero_sum_takes_majority_sign_and_k1_keeps_everything():
    base = {"b": torch.zeros(3)}
    experts = _experts(base, {"b": _t([2, 1, 1])}, {"b": _t([-2, 1, 1])})
    # sums [0, 2, 2]: entry 0 gets the majority sign (+), so only the +2 counts
    out = ties(base, experts, k=1.0)
    assert torch.equal(out["b"], _t([2, 1, 1]))


def test_trim_top_k_keeps_exact_count():
    tv = _t([0.1, -5, 3, -0.2, 4, 1, 0, 2, -2.5, 0.05])
    trimmed = trim_top_k(tv, 0.3)
    assert torch.equal(trimmed, _t([0, -5, 3, 0, 4, 0, 0, 0, 0, 0]))
    assert torch.count_nonzero(trim_top_k(tv, 0.01)) == 1


def test_dare_keeps_entries_rescaled_exactly():
    torch.manual_seed(0)
    base = {"w": torch.zeros(50, 50)}
    tau = torch.randn(50, 50)
    out = dare_linear(base, [{"w": tau}], drop_rate=0.5, seed=3)["w"]
    kept = out != 0
    assert torch.equal(out[kept], 2 * tau[kept])
    assert abs(kept.float().mean().item() - 0.5) < 0.05
    out3 = dare_linear(base, [{"w": tau}], drop_rate=0.75, seed=3)["w"]
    kept3 = out3 != 0
    assert torch.equal(out3[kept3], 4 * tau[kept3])
    assert abs(kept3.float().mean().item() - 0.25) < 0.05


def test_dare_is_unbiased_over_seeds():
    torch.manual_seed(0)
    base = {"w": torch.randn(10, 10)}
    tau = torch.randn(10, 10)
    expert = {"w": base["w"] + tau}
    runs = [dare_linear(base, [expert], drop_rate=0.7, seed=s)["w"] - base["w"] for s in range(400)]
    mean = torch.stack(runs).mean(0)
    # per-entry std of the mean is |tau| * sqrt(0.7 / 0.3) / 20 ~ 0.08 |tau|
    assert (mean - tau).norm() / tau.norm() < 0.15
    # without the 1/(1-p) rescaling the mean would be 0.3 * tau
    assert (mean - 0.3 * tau).norm() / tau.norm() > 0.5


def test_dare_masks_are_seeded_per_key_and_expert():
    torch.manual_seed(0)
    base = {"a": torch.zeros(20, 20), "b": torch.zeros(20, 20)}
    tau = torch.ones(20, 20)
    experts = [{"a": tau, "b": tau}, {"a": tau, "b": tau}]
    full = dare_linear(base, experts, drop_rate=0.5, seed=7)
    only_b = dare_linear({"b": base["b"]}, [{"b": tau}, {"b": tau}], drop_rate=0.5, seed=7)
    assert torch.equal(full["b"], only_b["b"])
    assert not torch.equal(full["a"], full["b"])  # different key, different mask
    # two identical experts get different masks: sums of 0, 2 and 4 all occur
    assert {0.0, 2.0, 4.0} <= set(full["a"].unique().tolist())
    again = dare_linear(base, experts, drop_rate=0.5, seed=7)
    other = dare_linear(base, experts, drop_rate=0.5, seed=8)
    assert torch.equal(full["a"], again["a"]) and not torch.equal(full["a"], other["a"])


def test_dare_ties_without_drop_is_sign_elected_disjoint_mean():
    base = {"b": torch.zeros(3)}
    experts = _experts(base, {"b": _t([1, -2, 3])}, {"b": _t([3, 1, -1])})
    out = dare_ties(base, experts, drop_rate=0.0, coefficient=1.0)
    # sums [4, -1, 2] -> + - + ; means over agreeing entries: (1+3)/2, -2, 3
    assert torch.equal(out["b"], _t([2, -2, 3]))
    dropped = dare_ties(base, experts, drop_rate=0.5, seed=1)["b"]
    # every merged entry is one of the rescaled agreeing values or their mean
    allowed = {0.0, 2.0, 4.0, 6.0, -4.0, -2.0}
    assert set(dropped.tolist()) <= allowed


def test_tsv_reconstructs_tasks_in_disjoint_subspaces_exactly():
    torch.manual_seed(0)
    base = {"w": torch.randn(6, 6)}
    tau1 = torch.zeros(6, 6)
    tau1[:3, :3] = torch.randn(3, 3)
    tau2 = torch.zeros(6, 6)
    tau2[3:, 3:] = torch.randn(3, 3)
    out = tsv(base, _experts(base, {"w": tau1}, {"w": tau2}), coefficient=1.0)
    assert torch.allclose(out["w"], base["w"] + tau1 + tau2, atol=1e-5)


def test_tsv_rank_one_by_hand():
    # tau1 = 2 * u1 e1^T with u1 at 0 degrees, tau2 = 3 * u2 e2^T with u2 at 45 degrees.
    # The nearest orthogonal matrix to [u1 u2] rotates u1 by -22.5 and u2 by +22.5 degrees,
    # so the merge is [2 * (cos -22.5, sin -22.5), 3 * (cos 67.5, sin 67.5)] as columns.
    c = math.cos(math.pi / 4)
    base = {"w": torch.zeros(2, 2)}
    tau1 = _t([[2, 0], [0, 0]])
    tau2 = _t([[0, 3 * c], [0, 3 * c]])
    out = tsv(base, [{"w": tau1}, {"w": tau2}], coefficient=0.5)["w"]
    a, b = math.radians(-22.5), math.radians(67.5)
    expected = _t([[2 * math.cos(a), 3 * math.cos(b)], [2 * math.sin(a), 3 * math.sin(b)]])
    assert torch.allclose(out, 0.5 * expected, atol=1e-5)


def test_tsv_one_dim_falls_back_to_mean():
    base = {"bias": _t([1, 1])}
    out = tsv(base, _experts(base, {"bias": _t([1, 2])}, {"bias": _t([3, 4])}), coefficient=2.0)
    assert torch.equal(out["bias"], _t([5, 7]))


def test_cart_by_hand():
    base = {"w": torch.zeros(2, 2), "bias": torch.zeros(2)}
    d1 = {"w": torch.diag(_t([5, 1])), "bias": _t([3, 0])}
    d2 = {"w": torch.diag(_t([1, 4])), "bias": _t([0, 3])}
    d3 = {"w": torch.diag(_t([0, 1])), "bias": _t([0, 0])}
    out = cart(base, _experts(base, d1, d2, d3), rank_fraction=0.5, coefficient=0.5)
    # mean = diag(2, 2); centred: diag(3,-1), diag(-1,2), diag(-2,-1)
    # rank-1 parts: diag(3,0), diag(0,2), diag(-2,0) -> sum diag(1, 2)
    assert torch.allclose(out["w"], torch.diag(_t([2 + 0.5, 2 + 0.5 * 2])))
    assert torch.allclose(out["bias"], _t([1, 1]))  # 1-D: the mean


def test_cart_with_two_experts_is_weight_average():
    torch.manual_seed(0)
    base = {"w": torch.randn(5, 4)}
    experts = _experts(base, {"w": torch.randn(5, 4)}, {"w": torch.randn(5, 4)})
    out = cart(base, experts, rank_fraction=0.25, coefficient=3.0)
    # the identity is exact; float32 SVD leaves rounding of order 1e-6
    assert torch.allclose(out["w"], weight_average(base, experts)["w"], atol=1e-5)


def test_passthrough_dtype_and_shape_checks():
    base = {
        "ids": torch.arange(4),
        "frozen": torch.randn(3, 3),
        "w": torch.randn(3, 3).to(torch.bfloat16),
    }
    experts = [
        {"ids": torch.arange(4) + 1, "frozen": base["frozen"].clone(), "w": base["w"] + 1},
        {"ids": torch.arange(4) + 2, "frozen": base["frozen"].clone(), "w": base["w"] + 3},
    ]
    for fn in (weight_average, task_arithmetic, ties, dare_linear, tsv, cart):
        out = fn(base, experts)
        assert out["ids"] is base["ids"], fn.__name__
        assert out["frozen"] is base["frozen"], fn.__name__
        assert out["w"].dtype == torch.bfloat16, fn.__name__
    avg = weight_average(base, experts)["w"]
    expected = ((experts[0]["w"].float() + experts[1]["w"].float()) / 2).to(torch.bfloat16)
    assert torch.equal(avg, expected)
    with pytest.raises(ValueError, match=r"'w'.*\(3, 4\).*\(3, 3\)"):
        task_arithmetic(base, [{**experts[0], "w": torch.zeros(3, 4)}])
    with pytest.raises(ValueError, match="k must be"):
        ties(base, experts, k=0.0)
    with pytest.raises(ValueError, match="drop_rate"):
        dare_linear(base, experts, drop_rate=1.0)


# --------------------------------------------------------------------------- RegMean


def test_regmean_linear_hand_cases():
    w1, w2 = _t([[1, 2], [3, 4]]), _t([[5, 6], [7, 8]])
    g1, g2 = torch.diag(_t([1, 3])), torch.diag(_t([3, 1]))
    # (W1 G1 + W2 G2)(G1 + G2)^-1 = [[16, 12], [24, 20]] / 4
    out = regmean_linear([w1, w2], [g1, g2], alpha=0.5)
    assert torch.allclose(out, _t([[4, 3], [6, 5]]))
    # alpha halves the off-diagonal of G1 = [[2,1],[1,2]] -> [[2,.5],[.5,2]];
    # sum [[4,.5],[.5,4]], rhs [1,0] G1' + [0,1] G2 = [2, 2.5]; solution [3/7, 4/7]
    out2 = regmean_linear(
        [_t([[1, 0]]), _t([[0, 1]])], [_t([[2, 1], [1, 2]]), torch.diag(_t([2, 2]))], alpha=0.5
    )
    assert torch.allclose(out2, _t([[3 / 7, 4 / 7]]))


def test_regmean_linear_identical_and_dominant_grams():
    torch.manual_seed(0)
    ws = [torch.randn(4, 5) for _ in range(3)]
    x = torch.randn(20, 5)
    g = x.T @ x
    assert torch.allclose(
        regmean_linear(ws, [g, g, g], alpha=0.9), torch.stack(ws).mean(0), atol=1e-5
    )
    eye = torch.eye(5)
    dominant = regmean_linear(ws, [1e7 * eye, eye, eye], alpha=1.0)
    assert torch.allclose(dominant, ws[0], atol=1e-5)


def test_regmean_linear_is_least_squares_over_all_data():
    torch.manual_seed(0)
    xs = [torch.randn(30, 6, dtype=torch.float64) for _ in range(3)]
    ws = [torch.randn(4, 6, dtype=torch.float64) for _ in range(3)]
    out = regmean_linear(ws, [x.T @ x for x in xs], alpha=1.0)
    x_all = torch.cat(xs)
    y_all = torch.cat([x @ w.T for x, w in zip(xs, ws, strict=True)])
    lstsq = torch.linalg.lstsq(x_all, y_all).solution.T
    assert torch.allclose(out, lstsq, atol=1e-8)


def test_regmean_linear_singular_gram_falls_back_to_mean_on_dead_inputs():
    ws = [_t([[1, 10]]), _t([[3, 20]])]
    grams = [torch.diag(_t([1, 0])), torch.diag(_t([3, 0]))]  # input 2 never active
    out = regmean_linear(ws, grams, alpha=1.0)
    assert torch.allclose(out, _t([[(1 * 1 + 3 * 3) / 4, 15]]), atol=1e-5)


def test_regmean_op_uses_grams_where_given_and_mean_elsewhere():
    base = {"lin.weight": torch.zeros(2, 2), "lin.bias": torch.zeros(2)}
    e1 = {"lin.weight": _t([[1, 2], [3, 4]]), "lin.bias": _t([1, 1])}
    e2 = {"lin.weight": _t([[5, 6], [7, 8]]), "lin.bias": _t([3, 5])}
    grams = [{"lin.weight": torch.diag(_t([1, 3]))}, {"lin.weight": torch.diag(_t([3, 1]))}]
    out = regmean(base, [e1, e2], grams=grams, coefficient=0.5)
    assert torch.allclose(out["lin.weight"], 0.5 * _t([[4, 3], [6, 5]]))
    assert torch.allclose(out["lin.bias"], 0.5 * _t([2, 3]))
    with pytest.raises(ValueError, match="grams"):
        regmean(base, [e1, e2])
    with pytest.raises(ValueError, match="only some experts"):
        regmean(base, [e1, e2], grams=[grams[0], {}])


def test_collect_linear_grams_matches_inputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    batches = [torch.randn(5, 3), torch.randn(7, 3)]
    grams = collect_linear_grams(model, batches)
    x = torch.cat(batches)
    h = torch.relu(model[0](x))
    assert set(grams) == {"0", "2"}
    assert torch.allclose(grams["0"], x.T @ x / 12, atol=1e-5)
    assert torch.allclose(grams["2"], h.T @ h / 12, atol=1e-5)
    raw = collect_linear_grams(model, batches, normalize=False)
    assert torch.allclose(raw["0"], x.T @ x, atol=1e-4)
    assert set(grams_by_weight_key(grams)) == {"0.weight", "2.weight"}


def test_collect_linear_grams_ignores_padding_tokens():
    torch.manual_seed(0)
    cfg = BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        vocab_size=100,
    )
    model = BertModel(cfg)
    ids = torch.randint(5, 100, (2, 6))
    short = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    padded_ids = torch.cat([ids, torch.zeros(2, 3, dtype=torch.long)], dim=1)
    padded = {
        "input_ids": padded_ids,
        "attention_mask": torch.cat([torch.ones_like(ids), torch.zeros(2, 3, dtype=torch.long)], 1),
    }
    g_short = collect_linear_grams(model, [short])
    g_padded = collect_linear_grams(model, [padded])
    key = "encoder.layer.0.attention.self.query"
    assert g_short[key].shape == (32, 32)
    assert set(g_short) == set(g_padded)
    for name in g_short:
        assert torch.allclose(g_short[name], g_padded[name], rtol=1e-4, atol=1e-5), name
    model.train()
    collect_linear_grams(model, [short])
    assert model.training


def _topk_mask(magnitude: torch.Tensor, keep: int) -> torch.Tensor:
    mask = torch.zeros(magnitude.numel(), dtype=torch.bool)
    mask[magnitude.reshape(-1).topk(keep, sorted=False).indices] = True
    return mask.view_as(magnitude)


@pytest.mark.parametrize("threads", [1, 2])
def test_top_k_mask_selects_what_topk_selects(threads):
    """The histogram selection keeps exactly the entries ``torch.topk`` keeps where no two
    magnitudes tie at the cut (random floats of several sizes and spreads, one and two threads)."""
    from mergesec.merging.methods.ties import top_k_mask

    g = torch.Generator().manual_seed(0)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for n, k, scale in [(1, 0.2, 1.0), (9, 0.5, 1e-3), (1000, 0.01, 1e4), (1 << 20, 0.2, 1e-2)]:
            magnitude = (scale * torch.randn(n, generator=g)).abs()
            keep = max(1, int(k * n))
            mask = top_k_mask(magnitude, keep)
            assert torch.equal(mask, _topk_mask(magnitude, keep)), (n, k)
        wide = torch.exp(20 * torch.randn(50_000, generator=g))  # spans most float exponents
        assert torch.equal(top_k_mask(wide, 1234), _topk_mask(wide, 1234))
        half = torch.randn(100, generator=g).abs().half()  # other dtypes go through topk
        assert torch.equal(top_k_mask(half, 10), _topk_mask(half, 10))
    finally:
        torch.set_num_threads(before)


def test_top_k_mask_at_ties_and_special_values():
    """Exactly ``keep`` entries where many tie at the cut (the first by index), none smaller than
    one left out; NaN counts as the largest value, as in ``torch.topk``."""
    from mergesec.merging.methods.ties import top_k_mask

    g = torch.Generator().manual_seed(1)
    magnitude = torch.randint(0, 6, (10_000,), generator=g).float()
    mask = top_k_mask(magnitude, 2500)
    assert int(mask.sum()) == 2500
    assert magnitude[~mask].max() <= magnitude[mask].min()
    cut = magnitude[mask].min()
    at_cut = (magnitude == cut).nonzero().view(-1)
    kept_at_cut = (mask & (magnitude == cut)).nonzero().view(-1)
    assert torch.equal(kept_at_cut, at_cut[: kept_at_cut.numel()])
    special = torch.tensor([float("nan"), 1.0, float("inf"), 0.0, 2.0, 0.5])
    assert top_k_mask(special, 2).tolist() == [True, False, True, False, False, False]
    assert top_k_mask(special, 6).all()


def _elect_reference(tvs: torch.Tensor) -> torch.Tensor:
    """The sign election and disjoint mean as first written (and as in the TIES reference code):
    agreeing entries selected by comparison, counted as booleans."""
    sign = torch.sign(tvs.sum(0))
    sign[sign == 0] = torch.sign(sign.sum())
    agree = torch.where(sign > 0, tvs > 0, tvs < 0)
    count = agree.sum(0, dtype=tvs.dtype).clamp_(min=1)
    return (tvs * agree).sum(0).div_(count)


def test_sign_election_equals_the_comparison_form():
    """The signed-magnitude form gives the comparison form's values bit for bit, on trimmed
    random task vectors, where sums cancel exactly, and where even the majority sign is zero."""
    g = torch.Generator().manual_seed(2)
    tvs = 0.01 * torch.randn(5, 40_000, generator=g)
    tvs[torch.rand(5, 40_000, generator=g) < 0.8] = 0
    tvs[:2, :100] = torch.tensor([1.0, -1.0]).view(2, 1)  # cancels: the tensor's majority sign
    for t in (tvs, torch.tensor([[1.0, -1.0, 0.0], [-1.0, 1.0, 0.0]])):
        got, want = elect_sign_disjoint_mean(t.clone(), inplace=True), _elect_reference(t.clone())
        assert torch.equal(got, want)  # equal values (a zero may differ in sign)
        assert torch.equal(elect_sign_disjoint_mean(t), want)
        nonzero = want != 0
        assert nonzero.any()
        assert torch.equal(got[nonzero].view(torch.int32), want[nonzero].view(torch.int32))
