"""LoRA merge spaces (KnOTS, Core) against small re-implementations of the released functions.

The references restate ``task_merger.py``'s ``get_knots_components`` and ``get_core_matrices`` and
its per-space merge (``merge``: ΔW = U diag(S) merge(V_i) in KnOTS space, U_B merge(M_i) V_A in
Core space, times the global coefficient), with the per-key released operators of
``test_merge_released``. Each space must match to a relative error of 1e-6 on tiny tensors.
"""

from __future__ import annotations

import pytest
import torch
from test_merge_released import KEY, REL, ref_cart, ref_dare, ref_ties, ref_tsv, rel_err
from torch import Tensor

from mergesec.core.registry import get_op
from mergesec.merging.methods.dare import key_seed
from mergesec.merging.spaces import core_components, in_space, knots_components, space_problem


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def lora_factors(n: int, m: int, d: int, r: int, seed: int) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(r, d, generator=g), 0.1 * torch.randn(m, r, generator=g)) for _ in range(n)
    ]


# ---- references: the released space functions, restated ----------------------------------


def ref_knots_components(dirs: list[Tensor]) -> tuple[Tensor, Tensor, list[Tensor]]:
    stack = torch.cat(dirs, dim=1)
    u, s, vh = torch.linalg.svd(stack.to(torch.float64), full_matrices=False)
    u, vh, s = u[:, s > 1e-5].float(), vh[s > 1e-5].float(), s[s > 1e-5].float()
    # einops.rearrange(Vh, 'Tr (b c) -> b Tr c', b=T)
    vs = [vh[:, i * dirs[0].shape[1] : (i + 1) * dirs[0].shape[1]] for i in range(len(dirs))]
    return u, s, vs


def ref_core_matrices(factors: list[tuple[Tensor, Tensor]]):
    a_list, b_list = zip(*factors, strict=True)
    vh_a_ref = torch.linalg.svd(torch.cat(a_list, 0).double(), full_matrices=False)[2]
    u_b_ref = torch.linalg.svd(torch.cat(b_list, 1).double(), full_matrices=False)[0]
    ms = []
    for a, b in zip(a_list, b_list, strict=True):
        u_a, s_a, vh_a = torch.linalg.svd(a.double(), full_matrices=False)
        u_b, s_b, vh_b = torch.linalg.svd(b.double(), full_matrices=False)
        m = torch.diag(s_b) @ (vh_b @ u_a) @ torch.diag(s_a)
        ms.append((u_b_ref.T @ u_b) @ m @ (vh_a @ vh_a_ref.T))
    return ms, u_b_ref, vh_a_ref


def ref_merge(method: str, ts: list[Tensor], **kw) -> Tensor:
    """``_merge_tensors`` for the released methods used here (no coefficient)."""
    if method == "tv":
        return torch.stack(ts).sum(0)
    if method == "ties":
        return ref_ties(ts, kw["k"])
    if method == "dare-ties":
        return ref_ties(ref_dare(ts, kw["p"], kw["draws"]), kw["k"])
    if method == "tsv":
        return ref_tsv(ts).to(ts[0].dtype)
    if method == "cart":
        return ref_cart(ts, kw["rank"]).to(ts[0].dtype)
    raise ValueError(method)


def ref_knots(method: str, dirs: list[Tensor], **kw) -> Tensor:
    u, s, vs = ref_knots_components(dirs)
    return u @ torch.diag(s) @ ref_merge(method, vs, **kw)


def ref_core(method: str, factors: list[tuple[Tensor, Tensor]], **kw) -> Tensor:
    ms, u_b, vh_a = ref_core_matrices(factors)
    return u_b @ ref_merge(method, ms, **kw) @ vh_a


# ---- mergesec, as the merge step calls it ----------------------------------------------------

CASES = [
    ("task_arithmetic", "tv", {}, {}),
    ("dare_ties_released", "ties", {"drop_rate": 0.0, "k": 0.3}, {"k": 0.3}),
    ("dare_ties_released", "dare-ties", {"drop_rate": 0.4, "k": 0.5, "seed": 3}, {"k": 0.5}),
    ("tsv_released", "tsv", {}, {}),
    ("cart_released", "cart", {"rank_fraction": 0.16}, {"rank": 0.16}),
]


def draws_for(comps: list[Tensor], seed: int) -> list[Tensor]:
    """The uniform draws mergesec's DARE takes for each component (seeded per key and expert)."""
    return [
        torch.rand(c.shape, generator=torch.Generator().manual_seed(key_seed(seed, KEY, i)))
        for i, c in enumerate(comps)
    ]


def spaced_update(op_name: str, space: str, factors, params: dict, coefficient: float) -> Tensor:
    """(merged − θ_0) / coefficient of ``op_name`` in ``space``; experts with a zero base (so the
    materialised task vectors are the exact B·A the released code sees)."""
    op = get_op("merge", op_name)
    base = {KEY: torch.zeros(factors[0][1].shape[0], factors[0][0].shape[1])}
    experts = [{KEY: b @ a} for a, b in factors]
    fn = in_space(op, space, [{KEY: f} for f in factors] if space == "core" else None)
    out = fn(base, experts, **(params | {"coefficient": coefficient}))[KEY]
    return out / coefficient


@pytest.mark.parametrize(
    ("op_name", "method", "params", "ref_kw"), CASES, ids=[c[1] for c in CASES]
)
@pytest.mark.parametrize("n", [2, 3])
def test_knots_space_matches_the_released_knots(op_name, method, params, ref_kw, n):
    factors = lora_factors(n, 12, 10, 2, seed=n)
    dirs = [b @ a for a, b in factors]
    kw = dict(ref_kw)
    if method == "dare-ties":
        kw |= {"p": params["drop_rate"], "draws": draws_for(ref_knots_components(dirs)[2], 3)}
    got = spaced_update(op_name, "knots", factors, params, coefficient=1.7)
    assert rel_err(got, ref_knots(method, dirs, **kw)) <= REL


@pytest.mark.parametrize(
    ("op_name", "method", "params", "ref_kw"), CASES, ids=[c[1] for c in CASES]
)
@pytest.mark.parametrize("n", [2, 3])
def test_core_space_matches_the_released_core(op_name, method, params, ref_kw, n):
    factors = lora_factors(n, 12, 10, 2, seed=10 + n)
    kw = dict(ref_kw)
    if method == "dare-ties":
        kw |= {"p": params["drop_rate"], "draws": draws_for(ref_core_matrices(factors)[0], 3)}
    got = spaced_update(op_name, "core", factors, params, coefficient=0.6)
    assert rel_err(got, ref_core(method, factors, **kw)) <= REL


def test_the_components_rebuild_each_update_and_task_arithmetic_is_the_same_in_every_space():
    factors = lora_factors(3, 9, 7, 2, seed=21)
    dirs = [b @ a for a, b in factors]
    u, s, vs = knots_components(dirs)
    assert u.shape[1] == 6  # the stacked rank-2 updates span 3·2 directions, the rest is dropped
    for d, v in zip(dirs, vs, strict=True):
        assert rel_err(u @ torch.diag(s) @ v, d) <= 1e-5
    ms, u_b, vh_a = core_components(*zip(*factors, strict=True))
    for d, m in zip(dirs, ms, strict=True):
        assert rel_err((u_b @ m @ vh_a).float(), d) <= 1e-6
    full = spaced_update("task_arithmetic", "full", factors, {}, 1.0)
    for space in ("knots", "core"):
        assert rel_err(spaced_update("task_arithmetic", space, factors, {}, 1.0), full) <= 1e-5


def test_the_spaces_change_a_non_linear_merge():
    factors = lora_factors(3, 12, 10, 2, seed=5)
    params = {"drop_rate": 0.0, "k": 0.2}
    full = spaced_update("dare_ties_released", "full", factors, params, 1.0)
    for space in ("knots", "core"):
        assert (
            rel_err(spaced_update("dare_ties_released", space, factors, params, 1.0), full) > 0.05
        )


def test_keys_outside_the_space_are_merged_in_the_full_space():
    op = get_op("merge", "ties")
    base = {"w": torch.zeros(4, 3), "bias": torch.zeros(4), "ids": torch.arange(4)}
    g = torch.Generator().manual_seed(0)
    experts = [
        {
            "w": torch.randn(4, 3, generator=g),
            "bias": torch.randn(4, generator=g),
            "ids": base["ids"],
        }
        for _ in range(2)
    ]
    got = in_space(op, "knots")(base, experts, k=0.5, coefficient=1.0)
    want = op.fn(base, experts, k=0.5, coefficient=1.0)
    assert torch.equal(got["bias"], want["bias"]) and torch.equal(got["ids"], base["ids"])
    # core: a key without factors is merged by the op itself
    got = in_space(op, "core", [{}, {}])(base, experts, k=0.5, coefficient=1.0)
    assert torch.equal(got["w"], want["w"])


def test_data_dependent_ops_have_no_space():
    assert space_problem(get_op("merge", "regmean"), "knots")
    assert space_problem(get_op("merge", "regmean"), "full") is None
    assert space_problem(get_op("merge", "ties"), "core") is None
    with pytest.raises(ValueError, match="LoRA factors"):
        in_space(get_op("merge", "ties"), "core")


# ---- through the merge step, on LoRA experts of a tiny BERT ----------------------------------


def lora_expert(
    path, tiny_bert, slug: str, seed: int, r: int = 2, alpha: int = 8, classes: int = 2
):
    """A LoRA release as ``finetune/lora`` writes it: the peft adapter (random A and B) and the
    materialised backbone W₀ + (α/r)·B A."""
    from mergesec.models.artifact import HeadInfo, write_artifact
    from mergesec.models.hub import load_backbone
    from mergesec.training.lora import wrap_with_lora

    torch.manual_seed(seed)
    model = wrap_with_lora(load_backbone(str(tiny_bert)), r=r, alpha=alpha, dropout=0.0,
                           target_modules=["query", "value"])  # fmt: skip
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.2 * torch.randn_like(p))
    model.save_pretrained(str(path / "adapter"))
    sd = {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}
    heads = {f"{slug}.weight": torch.randn(classes, 32), f"{slug}.bias": torch.zeros(classes)}
    labels = [str(i) for i in range(classes)]
    write_artifact(path, base=str(tiny_bert), backbone=sd, heads=heads,
                   head_info={slug: HeadInfo(f"builtin:{slug}", labels)})  # fmt: skip
    return path


@pytest.mark.parametrize("space", ["knots", "core"])
def test_lora_spaces_through_the_merge_step(tmp_path, tiny_bert, space):
    from mergesec.core.context import NodeContext
    from mergesec.core.registry import validate_params
    from mergesec.models.artifact import ModelArtifact
    from mergesec.models.hub import base_weights_file, model_identity
    from mergesec.models.lora_factors import read_lora_factors
    from mergesec.models.state_dict import load_state_dict
    from mergesec.tasks import merge

    slugs = ["synthetic_sentiment", "synthetic_topic", "synthetic_question"]
    experts = {s: lora_expert(tmp_path / s, tiny_bert, s, seed=i) for i, s in enumerate(slugs)}
    op_params = validate_params(get_op("merge", "dare_ties_released"),
                                {"drop_rate": 0.0, "k": 0.4, "coefficient": 1.3})  # fmt: skip
    out = tmp_path / "merged"
    out.mkdir()
    params = {"base": str(tiny_bert), "base_id": model_identity(str(tiny_bert)),
              "datasets": [{"uri": f"builtin:{s}"} for s in slugs], "op": op_params,
              "space": space}  # fmt: skip
    ctx = NodeContext("m", "merge", "dare_ties_released", params,
                      {f"expert.{s}": d for s, d in experts.items()}, out)  # fmt: skip
    merge.execute(ctx)
    got = ModelArtifact.open(out).backbone_state()
    base = load_state_dict(base_weights_file(str(tiny_bert)))

    factors = [read_lora_factors(d, base) for d in experts.values()]
    lora_keys = set(factors[0])
    assert len(lora_keys) == 4  # query and value of 2 layers
    assert all(f[k][1].abs().max() > 0 for f in factors for k in lora_keys)
    for key in lora_keys:
        fs = [f[key] for f in factors]
        if space == "core":
            want = ref_core("ties", fs, k=0.4)
        else:
            want = ref_knots("ties", [(base[key] + b @ a) - base[key] for a, b in fs], k=0.4)
        # the adapter's scale α/r = 4 is in B: the released ΔW = B A of the scaled factors
        assert rel_err(got[key] - base[key], 1.3 * want.float()) <= REL, key
    # every other weight is the base's (LoRA changed nothing else)
    for key in base:
        if key not in lora_keys:
            assert torch.equal(got[key], base[key]), key


def test_a_searched_merge_in_a_space_writes_the_spaced_merge_at_the_chosen_coefficient(
    tmp_path, tiny_bert
):
    from mergesec.core.context import NodeContext
    from mergesec.core.registry import validate_params
    from mergesec.models.artifact import ModelArtifact
    from mergesec.models.hub import base_weights_file, model_identity
    from mergesec.models.state_dict import load_state_dict
    from mergesec.tasks import merge

    classes = {"synthetic_sentiment": 2, "synthetic_topic": 4}
    experts = {
        s: lora_expert(tmp_path / s, tiny_bert, s, seed=i, classes=c)
        for i, (s, c) in enumerate(classes.items())
    }
    op = get_op("merge", "ties")
    op_params = validate_params(op, {"k": 0.5, "coefficient": {"search": [0.5, 1.5]}})
    out = tmp_path / "merged"
    out.mkdir()
    params = {"base": str(tiny_bert), "base_id": model_identity(str(tiny_bert)),
              "datasets": [{"uri": f"builtin:{s}"} for s in classes], "op": op_params,
              "space": "knots", "search_examples": 40}  # fmt: skip
    ctx = NodeContext("m", "merge", "ties", params,
                      {f"expert.{s}": d for s, d in experts.items()}, out)  # fmt: skip
    m = merge.execute(ctx)
    assert m["chosen/coefficient"] in (0.5, 1.5)
    base = load_state_dict(base_weights_file(str(tiny_bert)))
    sds = [ModelArtifact.open(d).backbone_state() for d in experts.values()]
    want = in_space(op, "knots")(base, sds, k=0.5, coefficient=m["chosen/coefficient"])
    got = ModelArtifact.open(out).backbone_state()
    for key in want:
        assert torch.equal(got[key], want[key]), key


def test_core_refuses_weights_that_are_not_the_adapters_update():
    factors = lora_factors(2, 6, 5, 2, seed=3)
    base = {KEY: torch.zeros(6, 5)}
    experts = [{KEY: b @ a} for a, b in factors]
    fn = in_space(get_op("merge", "task_arithmetic"), "core", [{KEY: f} for f in factors])
    fn(base, experts, coefficient=1.0)  # consistent: fine
    experts[1] = {KEY: -experts[1][KEY]}  # a release rewritten after training
    with pytest.raises(ValueError, match="expert 1's weights at 'layer.weight' are not its LoRA"):
        fn(base, experts, coefficient=1.0)
