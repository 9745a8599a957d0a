"""Training batches grouped by length (``length_pool``): the pure order function, every kind's
``batches``, the loop and the finetune op's setting."""

from __future__ import annotations

import math
import random

import pytest
import torch
from test_kind_conformance import STAND_INS, first

from mergesec import kinds
from mergesec.core.registry import OpError, get_op, validate_params
from mergesec.training.batch import chunks, length_grouped, shuffled
from mergesec.training.loop import FitConfig, fit, fit_config


def padded_tokens(lengths: list[int], batches: list[list[int]]) -> int:
    """Tokens the model runs when each batch is padded to its longest example."""
    return sum(max(lengths[j] for j in b) * len(b) for b in batches)


def skewed_lengths(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [min(64, int(rng.expovariate(1 / 25)) + 3) for _ in range(n)]


@pytest.mark.parametrize(("n", "batch_size", "pool"), [(360, 16, 8), (100, 7, 3), (5, 16, 4)])
def test_every_index_once_in_the_plain_number_of_batches(n, batch_size, pool):
    batches = length_grouped(skewed_lengths(n), batch_size, pool, seed=3)
    assert sorted(j for b in batches for j in b) == list(range(n))
    assert len(batches) == math.ceil(n / batch_size)
    assert sum(len(b) < batch_size for b in batches) <= 1  # only the last pool's tail is short


def test_the_draw_is_pinned_and_no_seed_shuffles_nothing():
    lengths = [7, 1, 5, 3, 9, 2, 8, 4, 6, 10]
    # Runs of 4 in split order, each sorted by length: [1, 3, 2, 0], [5, 7, 6, 4], [8, 9].
    assert length_grouped(lengths, 2, 2, seed=None) == [[1, 3], [2, 0], [5, 7], [6, 4], [8, 9]]
    # One generator shuffles the indices, then the batches: stored results depend on this draw.
    assert length_grouped(lengths, 2, 2, seed=0) == [[0, 4], [1, 5], [6, 9], [7, 8], [3, 2]]


def test_pool_one_is_the_plain_shuffled_order():
    lengths = skewed_lengths(50)
    assert length_grouped(lengths, 8, 1, seed=7) == list(chunks(shuffled(50, 7), 8))


def test_grouping_cuts_padding_and_each_seed_draws_other_batches():
    lengths = skewed_lengths(360)
    plain = list(chunks(shuffled(360, 0), 16))
    grouped = length_grouped(lengths, 16, 8, seed=0)
    # Skewed lengths waste about 40 % on padding in random batches; pools of 128 recover most.
    assert padded_tokens(lengths, grouped) < 0.8 * padded_tokens(lengths, plain)
    assert length_grouped(lengths, 16, 8, seed=0) == grouped  # seeded
    other = length_grouped(lengths, 16, 8, seed=1)
    assert {tuple(sorted(b)) for b in other} != {tuple(sorted(b)) for b in grouped}
    # Batches do not come out longest or shortest first: the order is shuffled after grouping.
    maxima = [max(lengths[j] for j in b) for b in grouped]
    assert maxima != sorted(maxima) and maxima != sorted(maxima, reverse=True)


def test_bad_pool_or_batch_size_is_refused():
    with pytest.raises(ValueError, match="pool >= 1"):
        length_grouped([1, 2], 2, 0, seed=0)
    with pytest.raises(ValueError, match="length_pool"):
        FitConfig(length_pool=0)


@pytest.mark.parametrize("name", sorted(STAND_INS))
def test_every_kind_groups_or_refuses(name, tmp_path, tiny_bert):
    make_base, ref = STAND_INS[name]
    kind = kinds.get_kind(name)
    data = kind.load(ref)
    task = kind.build(str(make_base(tmp_path, tiny_bert)), data, device="cpu", seed=0)
    train = first(data.train, 24)
    # The registry entry (what study validation reads) agrees with what the kind does.
    if not kinds.entry(name).supports_length_pool:
        with pytest.raises(ValueError, match="no length"):
            list(task.batches(train, 8, shuffle_seed=0, length_pool=2))
        return
    plain = list(task.batches(train, 8, shuffle_seed=0))
    grouped = list(task.batches(train, 8, shuffle_seed=0, length_pool=3))
    assert len(grouped) == len(plain)
    assert sum(b["labels"].shape[0] for b in grouped) == 24
    # The same examples, and no more padded positions than the plain batches carry.
    width = sum(b["input_ids"].numel() for b in grouped)
    assert width <= sum(b["input_ids"].numel() for b in plain)
    tokens = sorted(tuple(r[r != 0].tolist()) for b in grouped for r in b["input_ids"])
    assert tokens == sorted(tuple(r[r != 0].tolist()) for b in plain for r in b["input_ids"])


def test_text_batches_of_mixed_lengths_carry_less_padding(tiny_bert):
    kind = kinds.get_kind("text")
    data = kind.load({"uri": "builtin:synthetic_sentiment"})
    task = kind.build(str(tiny_bert), data, device="cpu", seed=0)
    rng = random.Random(0)
    # Texts of 1-40 words (under the 64-token cut): random batches pad to their longest member.
    train = [
        e.__class__(**{**vars(e), "text": " ".join(["good"] * rng.randint(1, 40))})
        for e in first(data.train, 96)
    ]
    plain = sum(b["input_ids"].numel() for b in task.batches(train, 8, shuffle_seed=1))
    grouped = sum(
        b["input_ids"].numel() for b in task.batches(train, 8, shuffle_seed=1, length_pool=12)
    )
    assert grouped < 0.8 * plain


def test_fit_trains_on_grouped_batches_and_the_op_takes_the_setting(tiny_bert):
    torch.set_num_threads(1)
    kind = kinds.get_kind("text")
    data = kind.load({"uri": "builtin:synthetic_sentiment"})
    params = validate_params(get_op("finetune", "full"), {"length_pool": 4, "batch_size": 8})
    cfg = fit_config(params, max_steps=3)
    assert cfg.length_pool == 4
    runs = []
    for pool in (None, 4):
        task = kind.build(str(tiny_bert), data, device="cpu", seed=0)
        fit(task, first(data.train, 64), first(data.validation, 8),
            FitConfig(max_steps=3, batch_size=8, lr=1e-3, length_pool=pool))  # fmt: skip
        runs.append({k: v.clone() for k, v in task.release_state().items()})
    # Other batches, so other weights (the grouped run is not the plain run under another name).
    assert any(not torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    with pytest.raises(OpError, match="greater than or equal to 1") as refused:
        validate_params(get_op("finetune", "lora"), {"length_pool": 0})
    assert "length_pool" in str(refused.value.path)
