"""Every registered task kind honours the ``TaskKind``/``TaskModel`` contract
(``mergesec.core.protocols``): build from the base, one training step, write the release, read it
back. A new kind adds one entry to ``STAND_INS`` and is checked here."""

from __future__ import annotations

import pytest
import torch
from test_lm_pipeline import make_tiny_llama
from test_vision_pipeline import make_tiny_clip

from mergesec import kinds
from mergesec.core.protocols import TaskModel
from mergesec.models.artifact import ModelArtifact, write_artifact
from mergesec.training.loop import FitConfig, fit

# kind -> (tiny base builder(tmp, tiny_bert), a dataset reference of that kind)
STAND_INS = {
    "text": (lambda tmp, bert: bert, {"uri": "builtin:synthetic_sentiment"}),
    "image": (lambda tmp, bert: make_tiny_clip(tmp / "clip"), {"uri": "builtin:synthetic_colors"}),
    "qa": (
        lambda tmp, bert: make_tiny_llama(tmp / "llama"),
        {"uri": "builtin:synthetic_arithmetic"},
    ),
}


def first(split, n: int):
    """The first ``n`` examples of a split (image splits slice into subsets too)."""
    return split[:n]


def test_every_registered_kind_has_a_stand_in():
    assert set(kinds.kind_names()) == set(STAND_INS)


@pytest.mark.parametrize("name", sorted(STAND_INS))
def test_registry_entry_agrees_with_its_kind(name):
    # The entry repeats a few facts so that study validation need not import the kind (torch).
    entry, kind = kinds.entry(name), kinds.get_kind(name)
    assert entry.column_roles == kind.column_roles
    assert (entry.supports_poison, entry.supports_monitor) == (
        kind.supports_poison,
        kind.supports_monitor,
    )


@pytest.mark.parametrize("name", sorted(STAND_INS))
def test_build_train_release_and_reload(name, tmp_path, tiny_bert):
    torch.set_num_threads(1)
    make_base, ref = STAND_INS[name]
    base = str(make_base(tmp_path, tiny_bert))
    kind = kinds.get_kind(name)
    assert kinds.dataset_kind(ref) == name and kind.name == name
    data = kind.load(ref)
    task = kind.build(base, data, device="cpu", allow_remote_code=False, seed=0)
    assert isinstance(task, TaskModel)
    before = {k: v.clone() for k, v in task.release_state().items()}

    train, validation = first(data.train, 16), first(data.validation, 8)
    m = fit(
        task,
        train,
        validation,
        FitConfig(max_steps=1, batch_size=8, lr=1e-2),
        precision=task.precision,
    )
    assert m["steps"] == 1 and 0.0 <= m["val_accuracy"] <= 1.0

    released = task.release_state()
    assert set(released) == set(before)
    assert any(not torch.equal(released[k], before[k]) for k in before), "one step changed nothing"
    slug = "ds"
    write_artifact(tmp_path / "art", base=base, backbone=released, heads=task.head_tensors(slug),
                   head_info={slug: task.head_info(data)}, extra={"kind": name})  # fmt: skip
    again = kind.from_artifact(
        ModelArtifact.open(tmp_path / "art"), device="cpu", allow_remote_code=False
    )
    again.use(data, ModelArtifact.open(tmp_path / "art").all_heads(), slug)
    for k, v in again.release_state().items():
        torch.testing.assert_close(v, released[k])
    loss, metric = again.score(validation, batch_size=8)
    assert loss > 0 and 0.0 <= metric <= 1.0
