"""Trap² objective, training step and scale diagnostics on tiny models."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import BertConfig, BertModel

from mergesec.defenses.scale_curve import curve_sharpness, interpolate, scale_curve
from mergesec.defenses.trap2 import (
    RngState,
    base_params_of,
    sample_scale,
    scale_weight,
    scaled_overrides,
    trap2_loss,
    trap2_step,
)
from mergesec.models.functional import forward_with

ATOL, RTOL = 1e-6, 1e-5


@pytest.fixture(autouse=True)
def one_thread():
    # The models are tiny: intra-op threads only contend with each other on a shared machine.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ---------------------------------------------------------------- models and data


def mlp(p_drop: float = 0.2) -> nn.Module:
    return nn.Sequential(
        nn.Linear(6, 16), nn.ReLU(), nn.Dropout(p_drop), nn.Linear(16, 16), nn.Tanh(),
        nn.Dropout(p_drop), nn.Linear(16, 2),
    )  # fmt: skip


class BertClassifier(nn.Module):
    def __init__(self, p_drop: float = 0.1):
        super().__init__()
        cfg = BertConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            vocab_size=100, hidden_dropout_prob=p_drop, attention_probs_dropout_prob=p_drop,
        )  # fmt: skip
        self.bert = BertModel(cfg, add_pooling_layer=False)
        self.head = nn.Linear(32, 2)

    def forward(self, input_ids, attention_mask):
        h = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.head(h[:, 0])


def lora_bert(p_drop: float = 0.1) -> nn.Module:
    cfg = LoraConfig(
        r=4, lora_alpha=8, target_modules=["query", "value"], lora_dropout=p_drop,
        modules_to_save=["head"],
    )  # fmt: skip
    model = get_peft_model(BertClassifier(p_drop), cfg)
    with torch.no_grad():  # peft starts B at zero; give it a trained-looking value
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 1.0)
    return model


def mlp_batch():
    return torch.randn(8, 6), torch.randint(0, 2, (8,))


def bert_batch():
    ids = torch.randint(1, 100, (4, 10))
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 2, (4,))}


def run_on(module: nn.Module, batch) -> torch.Tensor:
    """The task loss of an explicit module (used by the hand-built reference)."""
    if isinstance(batch, dict):
        logits = module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return F.cross_entropy(logits, batch["labels"])
    return F.cross_entropy(module(batch[0]), batch[1])


def forward_loss_for(model: nn.Module):
    """The module contract: forward_loss(overrides, batch) -> loss."""

    def forward_loss(overrides, batch):
        if isinstance(batch, dict):
            logits = forward_with(
                model,
                overrides,
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
            )
            return F.cross_entropy(logits, batch["labels"])
        return F.cross_entropy(forward_with(model, overrides, batch[0]), batch[1])

    return forward_loss


def trained_like(model: nn.Module) -> dict[str, torch.Tensor]:
    """Snapshot W₀, then move the live weights so that W − W₀ is a non-trivial update."""
    base = base_params_of(model, "full")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return base


# ---------------------------------------------------------------- hand-built reference


def _replace(root: nn.Module, name: str, value: torch.Tensor) -> None:
    *path, leaf = name.split(".")
    mod = root.get_submodule(".".join(path)) if path else root
    del mod._parameters[leaf]
    setattr(mod, leaf, value)


def _explicit_scaled(name, p, base, s, mode):
    if mode == "full":
        return base[name] + s * (p - base[name])
    if "lora_B" in name:
        return s * p
    return p


def reference_loss_and_grads(model, batch, base, *, s, lam, weight, mode, seed):
    """L1 − λ w(s) L2 with an explicit scaled copy whose weights are functions of the live ones."""
    live = {n: p for n, p in model.named_parameters() if p.requires_grad}
    scaled = copy.deepcopy(model)
    for n, p in live.items():
        _replace(scaled, n, _explicit_scaled(n, p, base, s, mode))
    torch.manual_seed(seed)
    l1 = run_on(model, batch)
    torch.manual_seed(seed)
    l2 = run_on(scaled, batch)
    w = {"inv": 1 / s, "inv_sqrt": 1 / math.sqrt(s), "none": 1.0}[weight]
    total = l1 - lam * w * l2
    return total, l1, l2, torch.autograd.grad(total, list(live.values()))


CASES = [("mlp", "full", "inv"), ("bert", "full", "inv_sqrt"), ("bert", "lora", "inv")]


def build(kind: str, mode: str):
    if kind == "mlp":
        model, batch = mlp(), mlp_batch()
    elif mode == "lora":
        model, batch = lora_bert(), bert_batch()
    else:
        model, batch = BertClassifier(), bert_batch()
    base = trained_like(model) if mode == "full" else base_params_of(model, "lora")
    model.train()
    return model, batch, base


@pytest.mark.parametrize("kind,mode,weight", CASES)
def test_loss_and_gradient_match_hand_built_reference(kind, mode, weight):
    torch.manual_seed(0)
    model, batch, base = build(kind, mode)
    s, lam, seed = 0.37, 0.3, 11
    ref_total, ref_l1, ref_l2, ref_grads = reference_loss_and_grads(
        model, batch, base, s=s, lam=lam, weight=weight, mode=mode, seed=seed
    )
    torch.manual_seed(seed)
    out = trap2_loss(
        model, batch, forward_loss_for(model), base, s=s, lam=lam, weight=weight, mode=mode
    )
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out.total, params)

    assert out.clean.item() != pytest.approx(out.scaled.item(), abs=1e-3)  # scaling matters
    torch.testing.assert_close(out.clean, ref_l1, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(out.scaled, ref_l2, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(out.total, ref_total, atol=ATOL, rtol=RTOL)
    assert sum(g.abs().sum().item() for g in ref_grads) > 0
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("kind,mode,weight", CASES[:1] + CASES[2:])
def test_step_applies_the_reference_gradient(kind, mode, weight):
    torch.manual_seed(1)
    model, batch, base = build(kind, mode)
    s = sample_scale(torch.Generator().manual_seed(5))
    _, _, _, ref_grads = reference_loss_and_grads(
        model, batch, base, s=s, lam=0.2, weight=weight, mode=mode, seed=3
    )
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    opt = torch.optim.SGD(params, lr=1.0)
    torch.manual_seed(3)
    res = trap2_step(
        model, opt, batch, forward_loss_for(model), base, generator=torch.Generator().manual_seed(5),
        lam=0.2, weight=weight, mode=mode, clip_norm=None,
    )  # fmt: skip
    assert res.s == s and not res.skipped
    for b, p, g in zip(before, params, ref_grads, strict=True):
        torch.testing.assert_close(b - p.detach(), g, atol=ATOL, rtol=RTOL)


def test_step_clips_gradients():
    torch.manual_seed(2)
    model, batch, base = build("mlp", "full")
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    res = trap2_step(
        model, torch.optim.SGD(params, lr=1.0), batch, forward_loss_for(model), base,
        generator=torch.Generator().manual_seed(0), lam=0.1, clip_norm=1e-3,
    )  # fmt: skip
    moved = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, params, strict=True)])
    assert res.grad_norm > 1e-3
    assert moved.norm().item() == pytest.approx(1e-3, rel=1e-3)


# ---------------------------------------------------------------- same dropout randomness


@pytest.mark.parametrize("kind,mode", [("mlp", "full"), ("bert", "lora")])
def test_clean_and_scaled_share_dropout_at_scale_one(kind, mode):
    torch.manual_seed(3)
    if kind == "mlp":
        model, batch = mlp(p_drop=0.5), mlp_batch()
    else:
        model, batch = lora_bert(p_drop=0.5), bert_batch()
    base = trained_like(model) if mode == "full" else {}
    model.train()
    fl = forward_loss_for(model)
    assert fl(None, batch).item() != fl(None, batch).item()  # dropout really is random here
    out = trap2_loss(model, batch, fl, base, s=1.0, lam=0.1, weight="inv", mode=mode)
    assert out.clean.item() == out.scaled.item()


def test_given_rng_state_fixes_the_dropout_masks():
    torch.manual_seed(4)
    model, batch = mlp(p_drop=0.5), mlp_batch()
    base = trained_like(model)
    fl = forward_loss_for(model)
    state = RngState.capture()
    first = trap2_loss(model, batch, fl, base, s=0.5, lam=0.1, mode="full")
    torch.rand(100)  # move the global RNG elsewhere
    again = trap2_loss(model, batch, fl, base, s=0.5, lam=0.1, mode="full", rng_state=state)
    assert first.total.item() == again.total.item()


# ---------------------------------------------------------------- scales, weights, overrides


def test_sample_scale_avoids_band_and_covers_both_sides():
    g = torch.Generator().manual_seed(0)
    listed = [sample_scale(g) for _ in range(4000)]
    draws = torch.tensor(listed, dtype=torch.float64)
    assert draws.min() >= 0.05 and draws.max() <= 2.0
    assert not ((draws > 0.95) & (draws < 1.05)).any()
    below = (draws < 1).float().mean().item()
    assert 0.44 < below < 0.54  # (0.95 − 0.05) / 1.85 ≈ 0.486 of the accepted mass
    assert draws.min() < 0.15 and draws.max() > 1.9
    g2 = torch.Generator().manual_seed(0)
    assert [sample_scale(g2) for _ in range(5)] == listed[:5]
    narrow = [sample_scale(g, s_min=0.9, s_max=1.1, delta=0.05) for _ in range(200)]
    assert all(s <= 0.95 or s >= 1.05 for s in narrow)
    with pytest.raises(ValueError):
        sample_scale(g, s_min=0.96, s_max=1.04)
    with pytest.raises(ValueError):
        sample_scale(g, s_min=2.0, s_max=1.0)


def test_scale_weights():
    assert scale_weight(0.5, "inv") == pytest.approx(2.0)
    assert scale_weight(0.25, "inv_sqrt") == pytest.approx(2.0)
    assert scale_weight(1.7, "none") == 1.0
    with pytest.raises(ValueError):
        scale_weight(0.5, "square")
    with pytest.raises(ValueError):
        scale_weight(0.0, "inv")


def test_base_params_snapshot_only_trainable_and_detached():
    model = mlp()
    model[0].bias.requires_grad_(False)
    base = base_params_of(model, "full")
    assert "0.bias" not in base and set(base) == {
        n for n, p in model.named_parameters() if p.requires_grad
    }
    assert all(not t.requires_grad for t in base.values())
    assert base["0.weight"].data_ptr() != model[0].weight.data_ptr()
    assert base_params_of(lora_bert(), "lora") == {}


def test_full_overrides_interpolate_and_carry_gradient():
    torch.manual_seed(5)
    model = mlp()
    base = trained_like(model)
    over = scaled_overrides(model, base, 0.3, mode="full")
    assert set(over) == set(base)
    w, w0 = model[0].weight, base["0.weight"]
    torch.testing.assert_close(over["0.weight"], w0 + 0.3 * (w - w0), atol=1e-7, rtol=1e-6)
    (g,) = torch.autograd.grad(over["0.weight"].sum(), [w])
    torch.testing.assert_close(g, torch.full_like(w, 0.3))
    with pytest.raises(KeyError):
        scaled_overrides(model, {"nope.weight": w0}, 0.3, mode="full")
    with pytest.raises(ValueError):
        scaled_overrides(model, {}, 0.3, mode="full")


def test_lora_overrides_scale_only_b():
    torch.manual_seed(6)
    model = lora_bert()
    over = scaled_overrides(model, None, 0.4, mode="lora")
    b_names = {n for n, p in model.named_parameters() if "lora_B" in n}
    assert set(over) == b_names and len(b_names) == 4
    params = dict(model.named_parameters())
    for n, t in over.items():
        torch.testing.assert_close(t, 0.4 * params[n])
        assert t.requires_grad
    with pytest.raises(ValueError):
        scaled_overrides(mlp(), None, 0.4, mode="lora")


# ---------------------------------------------------------------- non-finite guard


def test_non_finite_batch_skips_the_step():
    torch.manual_seed(7)
    model, (x, y), base = build("mlp", "full")
    params = list(model.parameters())
    opt = torch.optim.Adam(params, lr=1e-2)
    before = [p.detach().clone() for p in params]
    x_bad = x.clone()
    x_bad[0, 0] = float("nan")
    res = trap2_step(
        model, opt, (x_bad, y), forward_loss_for(model), base,
        generator=torch.Generator().manual_seed(0), lam=0.05,
    )  # fmt: skip
    assert res.skipped and not math.isfinite(res.clean)
    assert all(torch.equal(b, p) for b, p in zip(before, params, strict=True))
    assert all(p.grad is None for p in params) and not opt.state
    ok = trap2_step(
        model, opt, (x, y), forward_loss_for(model), base,
        generator=torch.Generator().manual_seed(0), lam=0.05,
    )  # fmt: skip
    assert not ok.skipped and math.isfinite(ok.total)
    assert any(not torch.equal(b, p) for b, p in zip(before, params, strict=True))


# ---------------------------------------------------------------- scale curve


def _evaluator(model, x, y):
    def evaluate(overrides):
        logits = forward_with(model, overrides, x)
        return F.cross_entropy(logits, y).item(), (logits.argmax(-1) == y).float().mean().item()

    return evaluate


def test_scale_curve_full_matches_explicit_models():
    torch.manual_seed(8)
    model = mlp()
    base = trained_like(model)
    x, y = torch.randn(64, 6), torch.randint(0, 2, (64,))
    model.train()
    curve = scale_curve(model, base, _evaluator(model, x, y), scales=[0.0, 0.5, 1.0])
    assert model.training  # mode restored
    model.eval()
    explicit_base = copy.deepcopy(model)
    explicit_base.load_state_dict(base)
    assert curve[0]["loss"] == pytest.approx(run_on(explicit_base, (x, y)).item(), abs=1e-6)
    assert curve[2]["loss"] == pytest.approx(run_on(model, (x, y)).item(), abs=1e-6)
    assert curve[1]["loss"] not in (curve[0]["loss"], curve[2]["loss"])

    # the same sweep from the base model and the task vector
    tau = {n: p.detach() - base[n] for n, p in model.named_parameters()}
    curve_tv = scale_curve(
        explicit_base, tau, _evaluator(explicit_base, x, y), scales=[0.0, 0.5, 1.0],
        reference_kind="task_vector",
    )  # fmt: skip
    for a, b in zip(curve, curve_tv, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
    assert len(scale_curve(model, base, _evaluator(model, x, y))) == 26


def test_scale_curve_lora_zero_is_the_base_model():
    torch.manual_seed(9)
    model = lora_bert()
    batch = bert_batch()

    def evaluate(overrides):
        logits = forward_with(
            model, overrides, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        )
        return F.cross_entropy(logits, batch["labels"]).item(), 0.0

    curve = scale_curve(model, None, evaluate, scales=[0.0, 1.0], mode="lora")
    model.eval()
    with torch.no_grad():
        live = run_on(model, batch).item()
    assert curve[1]["loss"] == pytest.approx(live, abs=1e-6)
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in zeroed.named_parameters():
            if "lora_B" in n:
                p.zero_()
    assert curve[0]["loss"] == pytest.approx(run_on(zeroed, batch).item(), abs=1e-6)
    assert curve[0]["loss"] != pytest.approx(curve[1]["loss"], abs=1e-4)


def test_curve_sharpness_on_a_known_curve():
    curve = [{"s": s, "loss": (s - 1) ** 2 + 0.1, "accuracy": 1 - abs(s - 1) / 2} for s in
             (0.0, 0.5, 1.0, 1.5, 2.0)]  # fmt: skip
    m = curve_sharpness(curve)
    assert m["loss_s1"] == pytest.approx(0.1)
    assert m["acc_s1"] == pytest.approx(1.0)
    assert m["min_loss_off"] == pytest.approx(0.35) and m["s_min_loss_off"] == 0.5
    assert m["off_to_nominal"] == pytest.approx(3.5)
    assert m["s_argmin"] == 1.0
    assert m["acc_drop_s0.5"] == pytest.approx(0.25)
    assert m["acc_drop_s0.25"] == pytest.approx(0.375)  # interpolated between 0 and 0.5
    assert m["loss_s0.25"] == pytest.approx(0.725)
    assert math.isnan(interpolate(curve, "loss", 2.5))


# ---------------------------------------------------------------- a tiny protected training run


def _task(n, g):
    x = torch.randn(n, 10, generator=g)
    y = ((x[:, 0] + 0.5 * x[:, 1] * x[:, 2] - 0.3 * x[:, 3]) > 0).long()
    return x, y


def _train(lam: float, steps: int):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    (xtr, ytr), (xte, yte) = _task(2048, g), _task(1024, g)
    model = nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Dropout(0.1), nn.Linear(64, 2))
    base = base_params_of(model, "full")
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen, fl = torch.Generator().manual_seed(2), forward_loss_for(model)
    for _ in range(steps):
        idx = torch.randint(0, 2048, (64,), generator=g)
        res = trap2_step(model, opt, (xtr[idx], ytr[idx]), fl, base, generator=gen, lam=lam)
        assert not res.skipped
    curve = scale_curve(model, base, _evaluator(model, xte, yte), scales=[0.25, 0.3, 0.5, 1.0, 2.0])
    return {c["s"]: c for c in curve}, curve_sharpness(curve)


def test_trap2_sharpens_the_scale_curve_without_hurting_clean_accuracy():
    # At 200 steps the clean term still dominates and the s = 0.3 loss rises only ~4 %; the
    # ascent term needs the clean loss to settle before it reshapes the curve, hence 2000 steps.
    plain, plain_m = _train(0.0, 2000)
    trap, trap_m = _train(0.05, 2000)
    for name, c in (("plain", plain), ("trap2", trap)):
        print(name, {s: (round(v["loss"], 4), round(v["accuracy"], 4)) for s, v in c.items()})
    assert trap[1.0]["accuracy"] >= plain[1.0]["accuracy"] - 0.02
    assert trap[0.3]["loss"] > 1.2 * plain[0.3]["loss"]
    assert trap[0.3]["accuracy"] < plain[0.3]["accuracy"]
    assert trap_m["off_to_nominal"] > plain_m["off_to_nominal"]
