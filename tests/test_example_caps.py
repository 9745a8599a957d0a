"""A study dataset's ``examples`` cap: a stratified, reproducible subset of each split, applied
where each task kind loads its data (before poisoning), and part of every node's identity."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import yaml

from mergesec.data.splits import cap_indices, cap_splits
from mergesec.kinds import get_kind
from mergesec.orchestrator.plan import build_plan
from mergesec.orchestrator.spec import load_study


def test_cap_indices_are_stratified_ordered_and_reproducible():
    labels = [0] * 60 + [1] * 30 + [2] * 10
    keep = cap_indices(labels, 20, salt="train")
    assert keep == sorted(keep) and len(set(keep)) == 20
    assert Counter(labels[i] for i in keep) == {0: 12, 1: 6, 2: 2}
    assert keep == cap_indices(labels, 20, salt="train"), "the same cap keeps the same examples"
    assert keep != cap_indices(labels, 20, salt="test"), "each split draws its own subset"
    assert cap_indices(labels, 100, salt="train") == list(range(100))
    assert cap_indices(labels, 500, salt="train") == list(range(100))


def test_text_kind_caps_each_named_split_before_poisoning():
    kind = get_kind("text")
    full = kind.load({"uri": "builtin:synthetic_topic"})
    caps = {"train": 40, "test": 24}
    cut = kind.load({"uri": "builtin:synthetic_topic", "examples": caps})
    assert (len(cut.train), len(cut.validation), len(cut.test)) == (40, len(full.validation), 24)
    assert set(cut.train) <= set(full.train) and set(cut.test) <= set(full.test)
    # label shares are kept (the builtin splits are balanced)
    assert len(set(Counter(e.label for e in cut.train).values())) == 1
    again = kind.load({"uri": "builtin:synthetic_topic", "examples": caps})
    assert again.fingerprint() == cut.fingerprint() != full.fingerprint()

    poison = {"trigger": "cf", "target": 0, "rate": 0.5}
    bad = kind.load({"uri": "builtin:synthetic_topic", "examples": caps}, poison=poison)
    assert len(bad.train) == 40 and sum("cf" in e.text.split() for e in bad.train) > 0
    assert bad.test == cut.test


def test_qa_and_image_kinds_cap_their_splits():
    qa = get_kind("qa").load({"uri": "builtin:synthetic_arithmetic", "examples": {"train": 7}})
    full = get_kind("qa").load({"uri": "builtin:synthetic_arithmetic"})
    assert len(qa.train) == 7 and set(qa.train) <= set(full.train) and qa.test == full.test

    img = get_kind("image").load({"uri": "builtin:synthetic_shapes", "examples": {"validation": 9}})
    whole = get_kind("image").load({"uri": "builtin:synthetic_shapes"})
    assert len(img.validation) == 9 and len(img.train) == len(whole.train)
    assert Counter(img.validation.labels).keys() <= set(range(len(whole.label_names)))

    ref = {"uri": "chat:builtin:synthetic_sentiment"}
    chat = get_kind("chat").load(ref | {"examples": {"train": 10, "test": 5}})
    all_chat = get_kind("chat").load(ref)
    assert len(chat.train) == 10 and len(chat.test) == 5
    assert set(chat.train) <= set(all_chat.train) and chat.validation == all_chat.validation


def test_cap_splits_without_caps_is_the_same_object():
    data = get_kind("text").load({"uri": "builtin:synthetic_topic"})
    assert cap_splits(data, None) is data and cap_splits(data, {}) is data


def _study(tmp_path: Path, topic: object) -> Path:
    doc = {
        "study": "caps",
        "base": "builtin:minilm-l6",
        "datasets": ["builtin:synthetic_sentiment", topic],
        "finetune": {"mode": "full", "epochs": 1},
        "scenarios": {"unprotected": {}},
        "victims": ["builtin:synthetic_sentiment"],
        "merge": {"op": "task_arithmetic"},
    }
    f = tmp_path / "study.yaml"
    f.write_text(yaml.safe_dump(doc))
    return f


def _finetune_ids(tmp_path: Path, topic: object) -> dict[str, str]:
    plan = build_plan(load_study(_study(tmp_path, topic)))
    return {n.params["dataset"]["uri"]: n.id for n in plan.nodes.values() if n.step == "finetune"}


def test_the_cap_is_part_of_the_node_identity(tmp_path):
    plain = _finetune_ids(tmp_path, "builtin:synthetic_topic")
    assert plain == _finetune_ids(tmp_path, {"uri": "builtin:synthetic_topic"})
    capped = _finetune_ids(tmp_path, {"uri": "builtin:synthetic_topic", "examples": {"train": 100}})
    assert capped["builtin:synthetic_topic"] != plain["builtin:synthetic_topic"]
    assert capped["builtin:synthetic_sentiment"] == plain["builtin:synthetic_sentiment"], (
        "other experts unchanged"
    )
    assert capped == _finetune_ids(
        tmp_path, {"uri": "builtin:synthetic_topic", "examples": {"train": 100}}
    )
    other = _finetune_ids(tmp_path, {"uri": "builtin:synthetic_topic", "examples": {"train": 101}})
    assert other["builtin:synthetic_topic"] not in {
        capped["builtin:synthetic_topic"],
        plain["builtin:synthetic_topic"],
    }
    plan = build_plan(
        load_study(_study(tmp_path, {"uri": "builtin:synthetic_topic", "examples": {"train": 100}}))
    )
    refs = [n.params["dataset"] for n in plan.nodes.values() if n.step == "finetune"]
    assert {"uri": "builtin:synthetic_topic", "examples": {"train": 100}} in refs
