"""AGA: data-free recovery of PaRaMS/MergeLock releases against the public base model."""

from __future__ import annotations

import functools

import pytest
import torch
import transformers as tf

from mergesec.attacks.aga import (
    attack_aga,
    match_mlp_units,
    mlp_match_fraction,
    recovery_diagnostics,
    subspace_residual,
)
from mergesec.defenses import transforms as T
from mergesec.defenses.mergelock import protect_mergelock
from mergesec.defenses.params import protect_params
from mergesec.models.layout import layout_for_model

FAMILIES = ("bert", "clip_vision", "gpt2", "llama", "qwen2", "mistral")
ATTN = ("q", "k", "v", "o")


def make_config(name: str):
    # hidden 64 with head_dim 8: least squares absorbs about head_dim/hidden of the attention τ
    small = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=8, intermediate_size=128)
    if name == "bert":
        return tf.BertConfig(**small, vocab_size=100)
    if name == "clip_vision":
        return tf.CLIPVisionConfig(**small, image_size=16, patch_size=8)
    if name == "gpt2":
        return tf.GPT2Config(
            n_embd=64, n_layer=2, n_head=8, n_inner=128, vocab_size=100, n_positions=32,
            bos_token_id=0, eos_token_id=0,
        )  # fmt: skip
    cls = {"llama": tf.LlamaConfig, "qwen2": tf.Qwen2Config, "mistral": tf.MistralConfig}[name]
    return cls(**small, num_key_value_heads=4 if name != "mistral" else 2, vocab_size=100)


def synthetic_expert(base: dict[str, torch.Tensor], rel: float = 1e-2, rank: int = 4):
    g = torch.Generator().manual_seed(1)
    out = {}
    for k, v in base.items():
        if v.ndim == 2:
            d = torch.randn(v.shape[0], rank, generator=g) @ torch.randn(
                rank, v.shape[1], generator=g
            )
        elif v.is_floating_point():
            d = torch.randn(v.shape, generator=g)
        else:
            out[k] = v.clone()
            continue
        out[k] = v + rel * (v.norm() + 1e-3) / d.norm() * d
    return out


@functools.cache
def setup(name: str):
    torch.manual_seed(0)
    cfg = make_config(name)
    model = (
        tf.CLIPVisionModel(cfg) if name == "clip_vision" else tf.AutoModel.from_config(cfg)
    ).eval()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    for k, v in base.items():
        if k.endswith("bias"):
            v.normal_(0, 0.02)
    g = torch.Generator().manual_seed(3)
    if name == "clip_vision":
        inp = {"pixel_values": torch.randn(2, 3, 16, 16, generator=g)}
    else:
        inp = {"input_ids": torch.randint(0, 100, (2, 9), generator=g)}
    return model, base, synthetic_expert(base), layout_for_model(model), inp


def output(model: torch.nn.Module, sd: dict[str, torch.Tensor], inp) -> torch.Tensor:
    model.load_state_dict(sd)
    with torch.no_grad():
        return model(**inp).last_hidden_state


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("defense", ["params", "mergelock"])
@pytest.mark.parametrize("name", FAMILIES)
def test_aga_recovers_expert(name: str, defense: str) -> None:
    model, base, expert, layout, inp = setup(name)
    if defense == "params":
        release = protect_params(expert, base, layout, scaling="nonsymmetric", permute_heads=True)
    else:
        release = protect_mergelock(expert, base, layout)
    before = recovery_diagnostics(release, expert, base, layout)
    assert before["cos/all"] < 0.1  # the release itself is useless as a task vector

    recovered = attack_aga(release, base, layout)
    assert mlp_match_fraction(recovered, expert, layout) == 1.0
    diag = recovery_diagnostics(recovered, expert, base, layout)
    assert diag["cos/all"] >= 0.9, diag
    for part in ATTN:
        assert diag[f"cos/{part}"] >= 0.85, (part, diag)
    for part in ("mlp_in", "gate", "mlp_out"):
        if part in layout.parts:
            assert diag[f"rel_err/{part}"] <= 1e-5, (part, diag)  # permutation undone exactly
    # solve_derived keeps the recovered model exactly equivalent to the release (and the expert)
    release_out = output(model, release, inp)
    assert rel_err(output(model, recovered, inp), release_out) <= 1e-4
    assert rel_err(release_out, output(model, expert, inp)) <= 1e-4


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_independent_solves_recover_but_are_not_exact(name: str) -> None:
    model, base, expert, layout, inp = setup(name)
    release = protect_params(expert, base, layout, scaling="nonsymmetric", permute_heads=True)
    recovered = attack_aga(release, base, layout, solve_derived=False)
    diag = recovery_diagnostics(recovered, expert, base, layout)
    assert diag["cos/all"] >= 0.9 and min(diag[f"cos/{p}"] for p in ATTN) >= 0.85, diag
    derived = attack_aga(release, base, layout)
    release_out = output(model, release, inp)
    err_indep = rel_err(output(model, recovered, inp), release_out)
    assert err_indep > 10 * rel_err(output(model, derived, inp), release_out)


def test_head_matching_is_needed_for_permuted_heads() -> None:
    _, base, expert, layout, _ = setup("qwen2")
    release = protect_params(expert, base, layout, scaling="diagonal", permute_heads=True)
    good = recovery_diagnostics(attack_aga(release, base, layout), expert, base, layout)
    bad = recovery_diagnostics(
        attack_aga(release, base, layout, match_heads=False), expert, base, layout
    )
    assert good["cos/v"] >= 0.85
    assert bad["cos/v"] < 0.5
    no_mlp = attack_aga(release, base, layout, match_mlp=False)
    assert mlp_match_fraction(no_mlp, expert, layout) < 0.2


def test_mismatched_anchor_is_refused() -> None:
    _, base, expert, layout, _ = setup("bert")
    release = protect_params(expert, base, layout)
    key = layout.weight_key(1, "mlp_in")
    smaller = dict(base)
    smaller[key] = base[key][:100]
    with pytest.raises(ValueError) as err:
        attack_aga(release, smaller, layout)
    msg = str(err.value)
    assert "\n" not in msg and key in msg
    assert str(tuple(release[key].shape)) in msg and str(tuple(smaller[key].shape)) in msg

    _, gpt2_base, _, _, _ = setup("gpt2")
    with pytest.raises(ValueError, match="missing"):
        attack_aga(release, gpt2_base, layout)


def test_matching_primitives() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(50, 16, generator=g, dtype=torch.float64)
    perm = torch.randperm(50, generator=g)
    noisy = w[perm] + 1e-2 * torch.randn(50, 16, generator=g, dtype=torch.float64)
    cost = -(noisy / noisy.norm(dim=1, keepdim=True)) @ (w / w.norm(dim=1, keepdim=True)).t()
    restore = match_mlp_units(cost)
    assert torch.equal(perm[restore], torch.arange(50))

    heads = torch.randn(3, 40, 8, generator=g, dtype=torch.float64)
    mixed = heads @ torch.randn(
        3, 8, 8, generator=g, dtype=torch.float64
    )  # per-head invertible maps
    res = subspace_residual(mixed, heads)
    assert res.diagonal().max() < 1e-10
    assert (res + torch.eye(3, dtype=torch.float64)).min() > 0.5


def test_rope_fit_stays_rotary() -> None:
    """The map from released to recovered Q/K of a llama layer is a scaled rotation per pair."""
    _, base, expert, layout, _ = setup("llama")
    release = protect_mergelock(expert, base, layout)
    recovered = attack_aga(release, base, layout, match_heads=False, match_mlp=False)
    hd, half = layout.head_dim, layout.head_dim // 2
    rel_q = T.split_rows(T.read_layer(release, layout, 0, ("q",)).w["q"], hd)[0]
    rec_q = T.split_rows(T.read_layer(recovered, layout, 0, ("q",)).w["q"], hd)[0]
    m = torch.linalg.lstsq(rel_q.t(), rec_q.t()).solution.t()  # rec_q = m @ rel_q
    re, im = m.diagonal()[:half], m.diagonal(offset=-half)
    torch.testing.assert_close(
        m, T.rope_pair_matrix(re, im), atol=1e-4 * m.abs().max().item(), rtol=0
    )
    assert (im.abs() > 1e-3 * re.abs()).any()  # a real rotation, not only a scaling
    exp_q = T.read_layer(expert, layout, 0, ("q",)).w["q"]
    assert rel_err(T.read_layer(recovered, layout, 0, ("q",)).w["q"], exp_q) < 0.05
