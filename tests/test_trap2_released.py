"""``protect/trap2`` version 2: the released schedule and optimiser as defaults, w(s) by model
family, and the head kept out of the scaled pass."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from test_lm_pipeline import make_tiny_llama

from mergesec.core.registry import get_op, validate_params
from mergesec.data import load_dataset_splits
from mergesec.defenses.trap2 import (
    EPOCH_SCHEDULE,
    head_parameters,
    protect_trap2,
    resolve_weight,
    scaled_pass_loss,
    trap2_backward,
)

FT = {"epochs": 1, "lr": 1.0e-3, "batch_size": 32, "max_length": 24, "seed": 0}


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def text_task(tiny_bert, n_train: int = 96):
    from mergesec.kinds.text import TextKind

    full = load_dataset_splits("builtin:synthetic_sentiment")
    data = replace(full, train=full.train[:n_train], validation=full.validation[:32])
    return TextKind().build(str(tiny_bert), data, max_length=24), data


def test_the_defaults_are_the_released_schedule_and_optimiser():
    op = get_op("protect", "trap2")
    assert op.version == "2"
    p = validate_params(op, {})
    assert p["max_steps"] == 100_000 and p["eval_every"] == 2000 and p["warmup_steps"] == 500
    assert p["lr_schedule"] == "cosine" and p["patience"] == 5 and p["min_delta"] == 0.001
    assert p["betas"] == (0.9, 0.98) and p["eps"] == 1e-6 and p["weight_decay"] == 0.0
    assert p["weight"] == "auto" and p["grad_accumulation"] == 1
    # a YAML list is accepted for the betas; the short schedule is explicit
    short = validate_params(op, {"betas": [0.9, 0.999], **EPOCH_SCHEDULE})
    assert short["betas"] == (0.9, 0.999) and short["max_steps"] is None


def test_auto_weight_is_inv_sqrt_for_causal_lms_and_inv_otherwise(tiny_bert, tmp_path):
    from mergesec.data.qa import load_qa_splits
    from mergesec.kinds.qa.task import QAKind

    task, _ = text_task(tiny_bert)
    assert resolve_weight("auto", task) == "inv"
    assert resolve_weight("none", task) == "none"
    lm = QAKind().build(
        str(make_tiny_llama(tmp_path / "llama")), load_qa_splits("builtin:synthetic_arithmetic")
    )
    assert resolve_weight("auto", lm) == "inv_sqrt"
    assert head_parameters(lm) == {}  # a causal LM has no head outside its backbone


def test_the_head_gets_gradient_from_the_clean_loss_only(tiny_bert):
    task, data = text_task(tiny_bert)
    head = head_parameters(task)
    assert set(head) == {"head.weight", "head.bias"}
    batch = next(iter(task.batches(data.train, 16, shuffle_seed=0)))
    base = {
        n: p.detach().clone() for n, p in task.model.named_parameters() if n.startswith("backbone.")
    }
    with torch.no_grad():  # move away from the base so the scaled pass differs from the clean one
        for n, p in task.model.named_parameters():
            if n.startswith("backbone."):
                p.add_(0.05 * torch.randn_like(p))
    task.model.eval()  # no dropout: the two backward passes below see the same function

    def grads():
        out = {n: p.grad.clone() for n, p in task.model.named_parameters() if p.grad is not None}
        task.model.zero_grad(set_to_none=True)
        return out

    task.loss(batch).backward()
    clean = grads()
    trap2_backward(task.model, batch, scaled_pass_loss(task), base, s=0.5, lam=1.0, mode="full")
    trapped = grads()
    for n in head:
        torch.testing.assert_close(trapped[n], clean[n], rtol=0, atol=0)
    moved = [n for n in base if n in clean and not torch.allclose(trapped[n], clean[n])]
    assert moved, "the backbone should get the ascent gradient"
    # the plain forward (version 1) let the ascent reach the head
    trap2_backward(
        task.model, batch, lambda o, b: task.loss(b, o), base, s=0.5, lam=1.0, mode="full"
    )
    live = grads()
    assert not torch.allclose(live["head.weight"], clean["head.weight"])


def test_the_op_trains_on_its_step_schedule(tiny_bert):
    task, data = text_task(tiny_bert, n_train=64)  # 2 optimizer steps per epoch at batch 32
    ft = {"mode": "full"} | validate_params(get_op("finetune", "full"), FT)
    seen: list[dict] = []
    res = protect_trap2(
        task, data, ft, report=lambda m, _s: seen.append(dict(m)), lam=0.1,
        max_steps=7, eval_every=3, warmup_steps=1, patience=5,
    )  # fmt: skip
    assert res["steps"] == 7  # 3.5 epochs: max_steps wins over the finetune's one epoch
    assert res["evaluations"] == 3  # after steps 3 and 6, and the last one
    lrs = [m["train/lr"] for m in seen if "train/lr" in m]
    assert lrs and all(0 < lr <= FT["lr"] for lr in lrs)


def test_the_ops_own_lr_wins_over_the_finetunes(tiny_bert):
    task, data = text_task(tiny_bert, n_train=64)
    ft = {"mode": "full"} | validate_params(get_op("finetune", "full"), FT)
    seen: list[dict] = []
    protect_trap2(
        task, data, ft, report=lambda m, _s: seen.append(dict(m)), lam=0.1, lr=3 * FT["lr"],
        max_steps=5, eval_every=5, warmup_steps=0, lr_schedule="constant",
    )  # fmt: skip
    lrs = [m["train/lr"] for m in seen if "train/lr" in m]
    assert lrs and all(lr == pytest.approx(3 * FT["lr"]) for lr in lrs)
    assert ft["lr"] == FT["lr"]  # the study's finetune settings are not changed


def test_the_op_stops_after_patience_evaluations_without_gain(tiny_bert):
    task, data = text_task(tiny_bert, n_train=32)
    ft = {"mode": "full"} | validate_params(get_op("finetune", "full"), FT | {"lr": 1e-9})
    res = protect_trap2(
        task, data, ft, lam=0.1, max_steps=50, eval_every=1, patience=2, min_delta=0.5
    )
    # nothing can gain 0.5 accuracy: the first evaluation sets the best, two more end the run
    assert res["evaluations"] == 3 and res["steps"] == 3


def test_betas_from_a_yaml_list_validate_as_a_pair():
    from mergesec.core.registry import OpError, get_op, validate_params

    op = get_op("protect", "trap2")
    assert validate_params(op, {"betas": [0.9, 0.95]})["betas"] == (0.9, 0.95)
    with pytest.raises(OpError, match="at most 2 items"):
        validate_params(op, {"betas": [0.9, 0.95, 0.99]})
