"""TransformerLayout: detection per family, prefixed keys, accessors and block modules."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from mergesec.models.layout import (
    FAMILIES,
    TransformerLayout,
    UnsupportedArchitecture,
    detect_layout,
    layout_for_model,
)

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
ROPE = dict(SMALL, num_key_value_heads=2, vocab_size=100)


def configs() -> dict[str, tf.PretrainedConfig]:
    return {
        "bert": tf.BertConfig(**SMALL, vocab_size=100),
        "clip_vision": tf.CLIPVisionConfig(**SMALL, image_size=16, patch_size=8),
        "gpt2": tf.GPT2Config(
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_inner=64,
            vocab_size=100,
            n_positions=32,
            bos_token_id=0,
            eos_token_id=0,
        ),
        "llama": tf.LlamaConfig(**ROPE),
        "qwen2": tf.Qwen2Config(**ROPE),
        # head_dim set apart from hidden/heads: q_proj has 4*16 = 64 rows
        "mistral": tf.MistralConfig(**ROPE, head_dim=16),
    }


FAMILY_OF = {"bert": "bert", "clip_vision": "clip_vision", "gpt2": "gpt2"} | {
    k: "llama" for k in ("llama", "qwen2", "mistral")
}


def build(name: str, cfg: tf.PretrainedConfig) -> torch.nn.Module:
    torch.manual_seed(0)
    model = tf.CLIPVisionModel(cfg) if name == "clip_vision" else tf.AutoModel.from_config(cfg)
    return model.eval()


def inputs(name: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    if name == "clip_vision":
        return {"pixel_values": torch.randn(2, 3, 16, 16, generator=g)}
    return {"input_ids": torch.randint(0, 100, (2, 7), generator=g)}


@pytest.mark.parametrize("name", list(configs()))
def test_detect_each_family(name: str) -> None:
    cfg = configs()[name]
    model = build(name, cfg)
    lay = layout_for_model(model)
    assert lay.family == FAMILY_OF[name]
    assert lay.prefix == ""
    assert lay.num_layers == 2 and lay.num_heads == 4 and lay.hidden_size == 32
    rope = FAMILY_OF[name] == "llama"
    assert lay.num_kv_heads == (2 if rope else 4)
    assert lay.head_dim == (16 if name == "mistral" else 8)
    assert lay.rope is rope
    assert ("gate" in lay.parts) is rope
    hash(lay)  # frozen and hashable: usable as a cache key
    sd = model.state_dict()
    for layer in range(lay.num_layers):
        for part in lay.parts:
            w, _ = lay.read(sd, layer, part)
            if lay.out_features(part) is not None:
                assert w.shape[0] == lay.out_features(part)
        assert lay.read(sd, layer, "q")[0].shape == (lay.num_heads * lay.head_dim, 32)


@pytest.mark.parametrize("name", list(configs()))
def test_read_matches_module_outputs(name: str) -> None:
    """``read`` returns what the module computes: module(x) == x Wᵀ + b for every part."""
    model = build(name, configs()[name])
    lay = layout_for_model(model)
    sd = model.state_dict()
    torch.manual_seed(2)
    for part in lay.parts:
        w, b = lay.read(sd, 1, part)
        x = torch.randn(5, w.shape[1])
        mod = model.get_submodule(lay.module_path(1, part))
        with torch.no_grad():
            y = mod(x)
        if lay.spec.fused_qkv and part in "qkv":
            i = "qkv".index(part)
            y = y[:, i * 32 : (i + 1) * 32]
        expect = x @ w.t() + (0 if b is None else b)
        torch.testing.assert_close(y, expect, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["gpt2", "qwen2", "bert"])
def test_write_roundtrip_and_locality(name: str) -> None:
    model = build(name, configs()[name])
    lay = layout_for_model(model)
    sd = model.state_dict()
    copy = dict(sd)
    for part in lay.parts:
        w, b = lay.read(sd, 0, part)
        lay.write(copy, 0, part, w.clone(), None if b is None else b.clone())
    assert all(torch.equal(copy[k], sd[k]) for k in sd)
    # Writing Q changes Q only (the fused GPT-2 tensor keeps its K and V blocks).
    w, b = lay.read(sd, 0, "q")
    lay.write(copy, 0, "q", w + 1.0, None if b is None else b - 1.0)
    torch.testing.assert_close(lay.read(copy, 0, "q")[0], w + 1.0)
    for part in ("k", "v", "o"):
        assert torch.equal(lay.read(copy, 0, part)[0], lay.read(sd, 0, part)[0])
    before = {k: v.clone() for k, v in sd.items()}
    assert all(torch.equal(before[k], sd[k]) for k in sd), "write must not modify tensors in place"
    changed = [k for k in sd if not torch.equal(copy[k], sd[k])]
    assert set(changed) <= set(lay.layer_keys(0, sd))
    with pytest.raises(ValueError, match="shape"):
        lay.write(copy, 0, "o", torch.zeros(3, 3))


@pytest.mark.parametrize(
    ("cls", "cfg_name", "prefix"),
    [
        (tf.BertForSequenceClassification, "bert", "bert."),
        (tf.GPT2LMHeadModel, "gpt2", "transformer."),
        (tf.LlamaForCausalLM, "llama", "model."),
        (tf.Qwen2ForCausalLM, "qwen2", "model."),
    ],
)
def test_prefixed_keys(cls, cfg_name: str, prefix: str) -> None:
    cfg = configs()[cfg_name]
    torch.manual_seed(0)
    wrapped = cls(cfg).eval()
    lay = layout_for_model(wrapped)
    assert lay.prefix == prefix
    assert lay.weight_key(1, "o").startswith(prefix)
    inner = getattr(wrapped, wrapped.base_model_prefix)
    torch.testing.assert_close(
        lay.read(wrapped.state_dict(), 1, "mlp_out")[0],
        layout_for_model(inner).read(inner.state_dict(), 1, "mlp_out")[0],
    )
    assert lay.block_modules(wrapped)[1] is layout_for_model(inner).block_modules(inner)[1]


def test_clip_full_model_uses_vision_tower() -> None:
    cfg = tf.CLIPConfig(
        text_config=dict(SMALL, vocab_size=100, max_position_embeddings=16),
        vision_config=dict(SMALL, image_size=16, patch_size=8),
    )
    model = tf.CLIPModel(cfg)
    lay = layout_for_model(model)
    assert lay.family == "clip_vision" and lay.prefix == "vision_model."
    assert lay.block_modules(model)[0] is model.vision_model.encoder.layers[0]


def test_unsupported_architecture_names_families() -> None:
    cfg = tf.DistilBertConfig(dim=32, n_layers=1, n_heads=4, hidden_dim=64, vocab_size=100)
    model = tf.AutoModel.from_config(cfg)
    with pytest.raises(UnsupportedArchitecture) as err:
        layout_for_model(model)
    assert isinstance(err.value, ValueError)
    for fam in FAMILIES:
        assert fam.name in str(err.value)
    assert "distilbert" in str(err.value)


def test_keys_of_another_model_are_refused() -> None:
    gpt2_keys = build("gpt2", configs()["gpt2"]).state_dict().keys()
    with pytest.raises(ValueError, match="bert"):
        detect_layout(configs()["bert"], gpt2_keys)
    bert = build("bert", configs()["bert"])
    keys = [k for k in bert.state_dict() if ".1." not in k]
    with pytest.raises(ValueError, match="missing key"):
        detect_layout(configs()["bert"], keys)


@pytest.mark.parametrize("name", list(configs()))
def test_residual_writers_and_blocks(name: str) -> None:
    model = build(name, configs()[name])
    lay = layout_for_model(model)
    sd = model.state_dict()
    writers = lay.residual_writer_weights(sd)
    assert set(writers) == {(i, kind) for i in range(2) for kind in ("attn_out", "mlp_out")}
    for (i, kind), w in writers.items():
        assert w.shape[0] == lay.hidden_size
        part = "o" if kind == "attn_out" else "mlp_out"
        assert torch.equal(w, lay.read(sd, i, part)[0])
    assert writers[(0, "mlp_out")].shape[1] == 64
    assert writers[(0, "attn_out")].shape[1] == lay.num_heads * lay.head_dim

    blocks = lay.block_modules(model)
    assert len(blocks) == lay.num_layers
    seen: list[torch.Tensor] = []
    hooks = [
        b.register_forward_hook(lambda _m, _i, o: seen.append(o[0] if isinstance(o, tuple) else o))
        for b in blocks
    ]
    with torch.no_grad():
        hidden = model(**inputs(name), output_hidden_states=True).hidden_states
    for h in hooks:
        h.remove()
    # The first block's output is the residual stream after layer 0 (the last one may be
    # normalised by the model's final norm before it is reported).
    torch.testing.assert_close(seen[0], hidden[1])
    assert isinstance(lay, TransformerLayout)
