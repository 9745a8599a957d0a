"""The one training loop (``mergesec.training``) on a tiny MLP, against hand-computed values."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mergesec.defenses.trap2 import Trap2Steps, base_params_of, sample_scale
from mergesec.models.functional import forward_with
from mergesec.training import loop as training_loop
from mergesec.training.batch import Batch, shuffled
from mergesec.training.loop import FitConfig, MicroStep, fit, fused_adamw_ok, trainable_state
from mergesec.training.precision import Precision
from mergesec.training.sampling import fixed_subset
from mergesec.training.schedule import lr_factor, warmup_length

Example = tuple[Tensor, int]


class MLPTask:
    """A two-layer MLP classifier over 4 features (a ``Trainable``)."""

    def __init__(self, seed: int = 0, dropout: float = 0.0):
        torch.manual_seed(seed)
        self.model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(dropout), nn.Tanh(), nn.Linear(8, 3))

    def batches(
        self, split: Sequence[Example], batch_size: int, *, shuffle_seed: int | None = None
    ) -> Iterator[Batch]:
        order = shuffled(len(split), shuffle_seed)
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            yield {
                "x": torch.stack([split[j][0] for j in idx]),
                "labels": torch.tensor([split[j][1] for j in idx]),
            }

    def loss(self, batch: Batch, overrides: dict[str, Tensor] | None = None) -> Tensor:
        return F.cross_entropy(forward_with(self.model, overrides, batch["x"]), batch["labels"])

    @torch.no_grad()
    def score(self, split: Sequence[Example], *, batch_size: int) -> tuple[float, float]:
        total, correct = 0.0, 0
        for b in self.batches(split, batch_size):
            logits = self.model(b["x"])
            total += float(F.cross_entropy(logits, b["labels"], reduction="sum"))
            correct += int((logits.argmax(-1) == b["labels"]).sum())
        return total / len(split), correct / len(split)


class ScriptedScoreTask(MLPTask):
    """The MLP whose validation score is a fixed sequence, one value per evaluation."""

    def __init__(self, scores: Sequence[float]):
        super().__init__()
        self.scores = list(scores)
        self.evaluated = 0

    def score(self, split: Sequence[Example], *, batch_size: int) -> tuple[float, float]:
        self.evaluated += 1
        return 0.0, self.scores[self.evaluated - 1]


def make_data(n: int, seed: int = 0) -> list[Example]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return [(x[i], int(y[i])) for i in range(n)]


def params_of(task: MLPTask) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in task.model.state_dict().items()}


class Log:
    def __init__(self):
        self.rows: list[tuple[int, dict[str, float]]] = []

    def __call__(self, metrics: dict[str, float], step: int) -> None:
        self.rows.append((step, dict(metrics)))

    def train(self, key: str) -> dict[int, float]:
        return {s: m[f"train/{key}"] for s, m in self.rows if f"train/{key}" in m}

    def evals(self) -> list[int]:
        return [s for s, m in self.rows if "val/accuracy" in m]


TRAIN, VAL = make_data(64), make_data(32, seed=1)


# ---------------------------------------------------------------- schedules (pure)


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        # total 10, warm-up 4: (s+1)/4 for s < 4, then the shape over the 6 remaining steps.
        ("linear", [0.25, 0.5, 0.75, 1.0, 1.0, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6, 0.0]),
        (
            "cosine",
            [0.25, 0.5, 0.75, 1.0]
            + [0.5 * (1 + math.cos(math.pi * k / 6)) for k in range(6)]
            + [0.0],
        ),
        ("constant", [0.25, 0.5, 0.75, 1.0] + [1.0] * 7),
    ],
)
def test_lr_factor_matches_the_closed_form(schedule, expected):
    got = [lr_factor(s, total=10, warmup=4, schedule=schedule) for s in range(11)]
    assert got == pytest.approx(expected, abs=1e-12)
    assert lr_factor(25, total=10, warmup=4, schedule=schedule) == expected[-1]


def test_cosine_midpoint_and_unknown_schedule():
    assert lr_factor(5, total=10, warmup=0, schedule="cosine") == pytest.approx(0.5)
    with pytest.raises(ValueError, match="lr_schedule"):
        lr_factor(5, total=10, warmup=0, schedule="step")
    with pytest.raises(ValueError, match="lr_schedule"):
        FitConfig(lr_schedule="step")


def test_warmup_in_steps_wins_over_the_ratio():
    assert warmup_length(100, steps=None, ratio=0.1) == 10
    assert warmup_length(100, steps=3, ratio=0.1) == 3
    assert warmup_length(7, steps=None, ratio=0.5) == 3


# ---------------------------------------------------------------- schedules inside fit


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
@pytest.mark.parametrize("warmup", [{"warmup_steps": 3}, {"warmup_ratio": 0.3}])
def test_fit_applies_the_schedule_per_optimizer_step(schedule, warmup):
    log = Log()
    cfg = FitConfig(
        max_steps=10, batch_size=16, lr=0.1, lr_schedule=schedule, log_every=1, **warmup
    )
    m = fit(MLPTask(), TRAIN, VAL, cfg, report=log)
    assert m["steps"] == 10 and m["skipped_steps"] == 0
    lrs = log.train("lr")
    assert sorted(lrs) == list(range(1, 11))
    for step, lr in lrs.items():
        want = 0.1 * lr_factor(step - 1, total=10, warmup=3, schedule=schedule)
        assert lr == pytest.approx(want, rel=1e-12), (step, lr, want)


def test_default_schedule_is_linear_over_the_epochs():
    log = Log()
    # 64 examples at 16 = 4 steps per epoch, 3 epochs = 12 steps; warm-up int(0.1 * 12) = 1.
    fit(MLPTask(), TRAIN, VAL, FitConfig(epochs=3, batch_size=16, lr=1.0, log_every=1,
                                         patience=5), report=log)  # fmt: skip
    lrs = log.train("lr")
    assert [lrs[s] for s in range(1, 13)] == pytest.approx(
        [1.0] + [(12 - s) / 11 for s in range(1, 12)], abs=1e-12
    )
    assert log.evals() == [4, 8, 12]


def test_max_steps_wins_over_epochs():
    log = Log()
    cfg = FitConfig(epochs=1, max_steps=7, batch_size=16, lr=0.1, log_every=1, warmup_ratio=0)
    m = fit(MLPTask(), TRAIN, VAL, cfg, report=log)
    assert m["steps"] == 7
    # Without eval_every: the end of epoch 1 (step 4) and the last step (7).
    assert log.evals() == [4, 7] and m["evaluations"] == 2
    assert log.train("lr")[7] == pytest.approx(0.1 * 1 / 7)
    epochs = [r["epoch"] for s, r in log.rows if "epoch" in r]
    assert epochs == [1, 2]


# ---------------------------------------------------------------- evaluation and early stopping


def test_eval_every_patience_and_min_delta_stop_at_the_computed_step():
    scores = [0.5, 0.5005, 0.6, 0.6005, 0.6008, 0.9, 0.9]
    # min_delta 0.001: improvements at evaluations 1 and 3; 4 and 5 are not -> stop at 5.
    log = Log()
    cfg = FitConfig(max_steps=100, eval_every=3, patience=2, min_delta=0.001, batch_size=16)
    task = ScriptedScoreTask(scores)
    m = fit(task, TRAIN, VAL, cfg, report=log)
    assert log.evals() == [3, 6, 9, 12, 15]
    assert m["steps"] == 15 and m["best_step"] == 9 and m["val_accuracy"] == 0.6
    assert m["best_epoch"] == 3  # step 9 is in the third epoch of 4 steps
    # Without min_delta every evaluation but the tie improves; it runs to max_steps = 21.
    task = ScriptedScoreTask(scores)
    m = fit(task, TRAIN, VAL, replace(cfg, min_delta=0.0, max_steps=21))
    assert m["steps"] == 21 and m["best_step"] == 18 and m["evaluations"] == 7


def test_ties_keep_the_earliest_and_the_best_weights_are_restored():
    # Evaluations at steps 4, 8, 12, 16: 0.8 at step 8, a tie at 12, then two misses: stop at 16.
    snapshots: dict[int, dict[str, Tensor]] = {}

    def recording(task, batch, micro):
        if micro.first:  # the weights after micro.step optimizer steps
            snapshots[micro.step] = params_of(task)
        loss = task.loss(batch)
        micro.backward(loss)
        return {"loss": float(loss.detach())}

    task = ScriptedScoreTask([0.5, 0.8, 0.8, 0.7])
    cfg = FitConfig(max_steps=40, eval_every=4, patience=2, batch_size=16, lr=0.05)
    m = fit(task, TRAIN, VAL, cfg, step_fn=recording)
    assert m["best_step"] == 8 and m["steps"] == 16 and m["val_accuracy"] == 0.8
    restored = params_of(task)
    for k, v in restored.items():
        assert torch.equal(v, snapshots[8][k]), k
    assert not torch.equal(restored["0.weight"], snapshots[15]["0.weight"])


def test_state_checkpoint_equals_the_trainable_checkpoint():
    a, b = ScriptedScoreTask([0.5, 0.9, 0.1]), ScriptedScoreTask([0.5, 0.9, 0.1])
    cfg = FitConfig(max_steps=12, eval_every=4, batch_size=16, lr=0.05)
    fit(a, TRAIN, VAL, cfg)
    fit(b, TRAIN, VAL, replace(cfg, keep="state", eval_batch_size=64))
    assert all(torch.equal(v, params_of(b)[k]) for k, v in params_of(a).items())


# ---------------------------------------------------------------- accumulation and clipping


def test_two_micro_batches_equal_one_double_batch():
    one, two = MLPTask(), MLPTask()
    common = dict(max_steps=3, lr=0.05, clip_norm=None, lr_schedule="constant")
    fit(one, TRAIN, VAL, FitConfig(batch_size=16, **common))
    fit(two, TRAIN, VAL, FitConfig(batch_size=8, grad_accumulation=2, **common))
    for k, v in params_of(one).items():
        torch.testing.assert_close(params_of(two)[k], v, rtol=1e-5, atol=1e-6)
    three = MLPTask()
    fit(three, TRAIN, VAL, FitConfig(batch_size=8, **common))  # 3 steps of 8: not the same
    assert not torch.allclose(params_of(three)["0.weight"], params_of(one)["0.weight"])


def test_fused_adamw_only_where_the_kernel_takes_every_parameter():
    assert fused_adamw_ok(list(MLPTask().model.parameters())) is True
    assert fused_adamw_ok([nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2, 2))]) is True
    assert (
        fused_adamw_ok([nn.Parameter(torch.zeros(2), requires_grad=False).to(torch.int64)]) is None
    )
    assert fused_adamw_ok([nn.Parameter(torch.zeros(2), requires_grad=False).to("meta")]) is None


def test_fused_adamw_trains_to_the_same_weights_as_the_per_tensor_kernel(monkeypatch):
    common = dict(max_steps=5, lr=0.05, clip_norm=1.0, lr_schedule="constant", weight_decay=0.01)
    fused = MLPTask()
    fit(fused, TRAIN, VAL, FitConfig(batch_size=16, **common))
    monkeypatch.setattr(training_loop, "fused_adamw_ok", lambda params: None)
    plain = MLPTask()
    fit(plain, TRAIN, VAL, FitConfig(batch_size=16, **common))
    moved = False
    for k, v in params_of(plain).items():
        torch.testing.assert_close(params_of(fused)[k], v, rtol=1e-5, atol=1e-6)
        moved |= not torch.equal(v, params_of(MLPTask())[k])
    assert moved


def test_a_short_last_step_averages_over_its_own_micro_batches():
    # 40 examples at 8 = 5 micro-batches, accumulation 2: steps of 2, 2 and 1 micro-batches.
    seen: list[tuple[int, int, int]] = []

    def step(task, batch, micro: MicroStep):
        seen.append((micro.step, micro.micro, micro.size))
        loss = task.loss(batch)
        micro.backward(loss)
        return {"loss": float(loss.detach())}

    m = fit(MLPTask(), TRAIN[:40], VAL, FitConfig(epochs=1, batch_size=8, grad_accumulation=2),
            step_fn=step)  # fmt: skip
    assert seen == [(0, 0, 2), (0, 1, 2), (1, 0, 2), (1, 1, 2), (2, 0, 1)]
    assert m["steps"] == 3


def test_clipping_bounds_the_update():
    # AdamW with beta1 = 0 and a large eps moves each weight by -lr·g/(|g| + eps) on its first
    # step, so the update is proportional to the clipped gradient g and its norm to clip_norm.
    lr, eps, clip = 1.0, 100.0, 0.01
    task = MLPTask()
    before = params_of(task)
    batch = next(task.batches(TRAIN, 16, shuffle_seed=0))
    task.model.zero_grad()
    task.loss(batch).backward()
    grads = {n: p.grad.clone() for n, p in task.model.named_parameters()}
    norm = math.sqrt(sum(float(g.pow(2).sum()) for g in grads.values()))
    assert norm > 10 * clip
    cfg = FitConfig(max_steps=1, batch_size=16, lr=lr, eps=eps, betas=(0.0, 0.999),
                    weight_decay=0.0, clip_norm=clip, lr_schedule="constant", warmup_ratio=0,
                    log_every=1)  # fmt: skip
    task.model.zero_grad(set_to_none=True)
    log = Log()
    fit(task, TRAIN, VAL, cfg, report=log)
    assert log.rows[0][1]["train/grad_norm"] == pytest.approx(norm, rel=1e-5)
    moved = 0.0
    for n, p in task.model.named_parameters():
        g = grads[n] * (clip / (norm + 1e-6))
        want = before[n] - lr * g / (g.abs() + eps)
        torch.testing.assert_close(p.detach(), want, rtol=1e-5, atol=1e-8)
        moved += float((p.detach() - before[n]).pow(2).sum())
    assert math.sqrt(moved) <= lr * clip / eps * (1 + 1e-4)


# ---------------------------------------------------------------- non-finite steps


def test_a_non_finite_step_is_skipped_and_the_schedule_does_not_advance():
    data = list(TRAIN)
    order = shuffled(len(data), 0)  # epoch 0's order for seed 0
    bad = order[16 + 3]  # an example of the second batch of 16
    data[bad] = (torch.full((4,), float("nan")), data[bad][1])
    log = Log()
    cfg = FitConfig(epochs=1, batch_size=16, lr=0.1, log_every=1, warmup_ratio=0)
    task = MLPTask()
    m = fit(task, data, VAL, cfg, report=log)
    assert m["steps"] == 4 and m["skipped_steps"] == 1
    assert log.train("skipped") == {1: 0.0, 2: 1.0, 3: 0.0, 4: 0.0}
    lrs = log.train("lr")
    assert 2 not in lrs
    # Taken steps 1, 3, 4 are scheduler steps 0, 1, 2 of 4.
    assert [lrs[1], lrs[3], lrs[4]] == pytest.approx([0.1, 0.1 * 3 / 4, 0.1 * 2 / 4])
    assert all(torch.isfinite(v).all() for v in params_of(task).values())


class HalfMLPTask(MLPTask):
    """The MLP under float16 autocast (on the CPU), its loss multiplied by ``factor``."""

    def __init__(self, factor: float):
        super().__init__()
        self.factor, self.precision = factor, Precision("cpu", torch.float16)

    def loss(self, batch: Batch, overrides: dict[str, Tensor] | None = None) -> Tensor:
        with self.precision.autocast():
            logits = forward_with(self.model, overrides, batch["x"])
        return F.cross_entropy(logits.float(), batch["labels"]) * self.factor


def test_float16_loss_scaling_unscales_before_clipping_and_skips_overflows():
    cfg = FitConfig(epochs=3, batch_size=16, lr=0.01, log_every=1)
    fp32, fp16 = Log(), Log()
    fit(MLPTask(), TRAIN, VAL, cfg, report=fp32)
    task = HalfMLPTask(1.0)
    m = fit(task, TRAIN, VAL, cfg, report=fp16, precision=task.precision)
    assert m["skipped_steps"] == 0
    # The gradient norm is that of the unscaled gradient (the loss scale is 2**16).
    assert fp16.train("grad_norm")[1] == pytest.approx(fp32.train("grad_norm")[1], rel=2e-2)
    # A loss 1000x larger overflows float16 gradients at scale 2**16: those steps are skipped
    # (the scaler halves its scale each time) until the scale fits, then training proceeds.
    task, log = HalfMLPTask(1000.0), Log()
    m = fit(task, TRAIN, VAL, cfg, report=log, precision=task.precision)
    skipped = log.train("skipped")
    assert 0 < m["skipped_steps"] < m["steps"] == 12
    assert skipped[1] == 1.0 and skipped[12] == 0.0
    taken = sorted(s for s, v in skipped.items() if v == 0.0)
    lrs = log.train("lr")
    assert [lrs[s] for s in taken] == pytest.approx(
        [0.01 * lr_factor(i, total=12, warmup=1) for i in range(len(taken))]
    )
    assert all(torch.isfinite(p).all() for p in task.model.parameters())


def test_fit_refuses_bad_settings():
    with pytest.raises(ValueError, match="grad_accumulation"):
        FitConfig(grad_accumulation=0)
    with pytest.raises(ValueError, match="keep"):
        FitConfig(keep="all")
    with pytest.raises(ValueError, match="betas"):
        FitConfig(betas=(0.9, 1.0))
    # Trap²'s released settings, with betas as a YAML list.
    released = FitConfig(max_steps=100_000, eval_every=2000, patience=5, min_delta=0.001,
                         lr_schedule="cosine", warmup_steps=500, betas=[0.9, 0.98], eps=1e-6,
                         weight_decay=0.0)  # fmt: skip
    assert released.betas == (0.9, 0.98)
    task = MLPTask()
    for p in task.model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        fit(task, TRAIN, VAL, FitConfig())


# ---------------------------------------------------------------- Trap² as a step function


def trap2_steps(task: MLPTask, lam: float = 0.3) -> Trap2Steps:
    return Trap2Steps(
        lambda overrides, batch: task.loss(batch, overrides), base_params_of(task.model, "full"),
        mode="full", lam=lam, s_min=0.05, s_max=2.0, delta=0.05, weight="inv", clip_norm=1.0,
        seed=7,
    )  # fmt: skip


def test_trap2_draws_one_scale_per_optimizer_step():
    task = MLPTask(dropout=0.1)
    step = trap2_steps(task)
    seen: list[tuple[int, float]] = []

    def recording(t, batch, micro):
        out = step(t, batch, micro)
        seen.append((micro.step, out["s"]))
        return out

    log = Log()
    cfg = FitConfig(epochs=1, batch_size=8, grad_accumulation=3, log_every=1)
    m = fit(task, TRAIN[:48], VAL, cfg, step_fn=recording, report=log)
    assert m["steps"] == 2 and len(seen) == 6
    gen = torch.Generator().manual_seed(7)
    draws = [sample_scale(gen) for _ in range(2)]
    assert [s for _, s in seen] == [draws[0]] * 3 + [draws[1]] * 3
    assert log.train("s") == pytest.approx({1: draws[0], 2: draws[1]}, rel=1e-12)


def test_trap2_accumulation_equals_one_double_batch():
    one, two = MLPTask(), MLPTask()
    common = dict(max_steps=2, lr=0.05, lr_schedule="constant")
    fit(one, TRAIN, VAL, FitConfig(batch_size=16, **common), step_fn=trap2_steps(one))
    fit(two, TRAIN, VAL, FitConfig(batch_size=8, grad_accumulation=2, **common),
        step_fn=trap2_steps(two))  # fmt: skip
    for k, v in params_of(one).items():
        torch.testing.assert_close(params_of(two)[k], v, rtol=1e-5, atol=1e-6)


def test_trap2_with_lam_zero_is_the_plain_step():
    plain, trap = MLPTask(dropout=0.1), MLPTask(dropout=0.1)
    cfg = FitConfig(epochs=2, batch_size=16, lr=0.05)
    a = fit(plain, TRAIN, VAL, cfg)
    b = fit(trap, TRAIN, VAL, cfg, step_fn=trap2_steps(trap, lam=0.0))
    assert a == b
    assert all(torch.equal(v, params_of(trap)[k]) for k, v in params_of(plain).items())


def test_trainable_state_copies_only_trained_parameters():
    task = MLPTask()
    task.model[0].weight.requires_grad_(False)
    assert set(trainable_state(task.model)) == {"0.bias", "3.weight", "3.bias"}


# ---------------------------------------------------------------- fixed subsets


def test_fixed_subset_draws_sorted_indices():
    items = list(range(100, 150))
    idx = sorted(random.Random(3).sample(range(50), 10))
    assert fixed_subset(items, 10, seed=3) == [items[i] for i in idx]
    # In the order drawn: random.sample over the list itself draws the same positions.
    assert fixed_subset(items, 10, seed=3, in_order=False) == random.Random(3).sample(items, 10)
    assert sorted(fixed_subset(items, 10, seed=3, in_order=False)) == fixed_subset(items, 10, 3)
    assert fixed_subset(items, None) == items and fixed_subset(items, 80) == items
    with pytest.raises(ValueError, match="n must be >= 1"):
        fixed_subset(items, 0)


def test_fixed_subset_uses_a_split_s_subset_method():
    class Split(list):
        def subset(self, idx):
            return ("subset", list(idx))

    split = Split(range(20))
    assert fixed_subset(split, 4, seed=1) == (
        "subset",
        sorted(random.Random(1).sample(range(20), 4)),
    )
