"""PaRaMS and MergeLock: exact function preservation on every family, huge protected task vectors."""

from __future__ import annotations

import functools

import pytest
import torch
import transformers as tf

from mergesec.defenses import transforms as T
from mergesec.defenses.mergelock import protect_mergelock
from mergesec.defenses.params import dissimilar_permutation, protect_params
from mergesec.models.layout import TransformerLayout, layout_for_model

FAMILIES = ("bert", "clip_vision", "gpt2", "llama", "qwen2", "mistral")


def make_config(name: str, hidden: int = 32, heads: int = 4, kv: int = 2, layers: int = 2):
    small = dict(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=2 * hidden,
    )
    if name == "bert":
        return tf.BertConfig(**small, vocab_size=100)
    if name == "clip_vision":
        return tf.CLIPVisionConfig(**small, image_size=16, patch_size=8)
    if name == "gpt2":
        return tf.GPT2Config(
            n_embd=hidden, n_layer=layers, n_head=heads, n_inner=2 * hidden, vocab_size=100,
            n_positions=32, bos_token_id=0, eos_token_id=0,
        )  # fmt: skip
    cls = {"llama": tf.LlamaConfig, "qwen2": tf.Qwen2Config, "mistral": tf.MistralConfig}[name]
    return cls(**small, num_key_value_heads=kv, vocab_size=100)


def build(name: str, cfg) -> torch.nn.Module:
    model = tf.CLIPVisionModel(cfg) if name == "clip_vision" else tf.AutoModel.from_config(cfg)
    return model.eval()


def synthetic_expert(
    base: dict[str, torch.Tensor], rel: float = 1e-2, rank: int = 4, seed: int = 1
):
    """base + a rank-``rank`` update of relative norm ``rel`` on every matrix (noise on vectors)."""
    g = torch.Generator().manual_seed(seed)
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
def setup(name: str, hidden: int = 32, heads: int = 4, kv: int = 2, layers: int = 2):
    """(config, base, expert, layout, inputs, clean output) for one family; cached per module."""
    torch.manual_seed(0)
    cfg = make_config(name, hidden, heads, kv, layers)
    model = build(name, cfg)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    for k, v in base.items():  # non-zero biases so their transforms are exercised
        if k.endswith("bias"):
            v.normal_(0, 0.02)
    expert = synthetic_expert(base)
    g = torch.Generator().manual_seed(3)
    if name == "clip_vision":
        inp = {"pixel_values": torch.randn(2, 3, 16, 16, generator=g)}
    else:
        inp = {"input_ids": torch.randint(0, 100, (2, 9), generator=g)}
    return cfg, base, expert, layout_for_model(model), inp, run(name, cfg, expert, inp)


_MODELS: dict[int, torch.nn.Module] = {}


def run(name: str, cfg, sd: dict[str, torch.Tensor], inp) -> torch.Tensor:
    """Output of the config's model (built once per config) carrying the weights ``sd``."""
    model = _MODELS.get(id(cfg))
    if model is None:
        model = _MODELS[id(cfg)] = build(name, cfg)
    model.load_state_dict(sd)
    with torch.no_grad():
        return model(**inp).last_hidden_state


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def tv_norm(sd: dict[str, torch.Tensor], base: dict[str, torch.Tensor], keys: set[str]) -> float:
    return sum(((sd[k].double() - base[k].double()) ** 2).sum() for k in keys).sqrt().item()


OPTIONS = {
    "params-mlp-only": dict(scaling="none"),
    "params-diagonal": dict(scaling="diagonal"),
    "params-nonsymmetric": dict(scaling="nonsymmetric"),
    "params-diagonal-heads": dict(scaling="diagonal", permute_heads=True),
    "params-nonsymmetric-heads": dict(scaling="nonsymmetric", permute_heads=True),
    "params-heads-only": dict(scaling="none", permute_mlp=False, permute_heads=True),
    "params-symmetric": dict(scaling="symmetric"),
    "params-symmetric-heads": dict(scaling="symmetric", permute_heads=True),
    "params-nonsymmetric-released": dict(scaling="nonsymmetric_released"),
    "mergelock": None,
}


def protect(option: str, expert, base, layout: TransformerLayout, seed: int = 0):
    kw = OPTIONS[option]
    if kw is None:
        return protect_mergelock(expert, base, layout, seed=seed)
    return protect_params(expert, base, layout, seed=seed, **kw)


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("name", FAMILIES)
def test_protection_preserves_function_and_inflates_task_vector(name: str, option: str) -> None:
    cfg, base, expert, layout, inp, clean = setup(name)
    snapshot = {k: v.clone() for k, v in expert.items()}
    release = protect(option, expert, base, layout)
    assert all(torch.equal(snapshot[k], expert[k]) for k in expert), "expert modified in place"
    assert release.keys() == expert.keys()
    assert all(
        release[k].shape == expert[k].shape and release[k].dtype == expert[k].dtype for k in expert
    )
    assert rel_err(run(name, cfg, release, inp), clean) <= 1e-4

    # The task vector over the layer tensors grows by about two orders of magnitude (the rest,
    # embeddings and norms, is passed through unchanged).
    layer_keys = {k for i in range(layout.num_layers) for k in layout.layer_keys(i, expert)}
    changed = {k for k in expert if not torch.equal(release[k], expert[k])}
    assert changed and changed <= layer_keys
    ratio = tv_norm(release, base, layer_keys) / tv_norm(expert, base, layer_keys)
    # Moving whole heads alone inflates less than shuffling MLP units or scaling.
    assert ratio >= (50 if option == "params-heads-only" else 100), ratio


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_nonsymmetric_at_realistic_head_dim(name: str) -> None:
    """head_dim 64 (as in BERT-base/ViT-B): conditioning of A matters for float32 exactness."""
    cfg, base, expert, layout, inp, clean = setup(name, hidden=128, heads=2, kv=1, layers=1)
    assert layout.head_dim == 64
    release = protect_params(expert, base, layout, scaling="nonsymmetric", permute_heads=True)
    assert rel_err(run(name, cfg, release, inp), clean) <= 1e-4


def test_seed_determinism() -> None:
    _, base, expert, layout, _, _ = setup("gpt2")
    a = protect_params(expert, base, layout, scaling="nonsymmetric", permute_heads=True, seed=5)
    b = protect_params(expert, base, layout, scaling="nonsymmetric", permute_heads=True, seed=5)
    c = protect_params(expert, base, layout, scaling="nonsymmetric", permute_heads=True, seed=6)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    m1, m2 = (
        protect_mergelock(expert, base, layout, seed=1),
        protect_mergelock(expert, base, layout, seed=2),
    )
    assert any(not torch.equal(m1[k], m2[k]) for k in m1)


def test_mlp_permutation_is_maximally_dissimilar() -> None:
    _, base, expert, layout, _, _ = setup("llama")
    e = T.read_layer(expert, layout, 0, ("mlp_in", "gate", "mlp_out"))
    b = T.read_layer(base, layout, 0, ("mlp_in", "gate", "mlp_out"))
    sim = T.mlp_unit_features(b) @ T.mlp_unit_features(e).t()
    n = sim.shape[0]

    def score(perm: torch.Tensor) -> float:
        return sim[torch.arange(n), perm].sum().item()

    perm = dissimilar_permutation(e, b)
    assert sorted(perm.tolist()) == list(range(n))
    g = torch.Generator().manual_seed(0)
    assert score(perm) < score(torch.arange(n))
    assert all(score(perm) <= score(torch.randperm(n, generator=g)) for _ in range(50))
    assert (perm == torch.arange(n)).sum() <= n // 8


def test_general_matrix_breaks_rope_but_not_bert() -> None:
    """Negative control: only rotary-compatible Q/K maps keep a llama model's function."""
    g = torch.Generator().manual_seed(0)
    for name, should_hold in (("bert", True), ("llama", False)):
        cfg, base, expert, layout, inp, clean = setup(name)
        out = dict(expert)
        for layer in range(layout.num_layers):
            parts = T.read_layer(expert, layout, layer)
            m = T.random_orthogonal(layout.num_kv_heads, layout.head_dim, g)
            T.write_layer(out, layout, layer, T.apply_qk(parts, layout, m))
        err = rel_err(run(name, cfg, out, inp), clean)
        assert (err <= 1e-4) is should_hold, (name, err)


def test_rope_pair_matrix_commutes_with_rotation() -> None:
    g = torch.Generator().manual_seed(0)
    m = T.random_rope_qk(1, 8, 0.1, 15.0, g)[0]
    theta = torch.rand(4, dtype=torch.float64) * 6
    rot = T.rope_pair_matrix(torch.cos(theta), torch.sin(theta))
    torch.testing.assert_close(m @ rot, rot @ m)


def test_bad_options_are_refused() -> None:
    _, base, expert, layout, _, _ = setup("bert")
    with pytest.raises(ValueError, match="unknown scaling"):
        protect_params(expert, base, layout, scaling="symmetric-ish")
    with pytest.raises(ValueError, match="scale_min"):
        protect_mergelock(expert, base, layout, scale_min=2.0, scale_max=1.0)
    short = {k: v[:-1] if "intermediate.dense.weight" in k else v for k, v in base.items()}
    with pytest.raises(ValueError, match="intermediate.dense.weight"):
        protect_params(expert, short, layout)
