"""Identities: unique dataset slugs, content-hashed local datasets, code versions in node records,
no silent op replacement, unpinned hub references flagged."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import mergesec
from mergesec.cli import app
from mergesec.core.content_hash import file_sha256, tree_sha256
from mergesec.core.registry import get_op, register_op, validate_params
from mergesec.orchestrator.plan import build_plan
from mergesec.orchestrator.spec import load_study


def _study(tmp_path: Path, **changes) -> Path:
    doc = {
        "study": "ids",
        "base": "builtin:minilm-l6",
        "datasets": ["builtin:synthetic_sentiment", "builtin:synthetic_topic"],
        "finetune": {"mode": "full", "epochs": 1},
        "scenarios": {"unprotected": {}},
        "merge": {"op": "task_arithmetic"},
    } | changes
    f = tmp_path / "study.yaml"
    f.write_text(yaml.safe_dump(doc))
    return f


def _save_dataset(path: Path, texts: list[str]) -> None:
    import datasets

    d = datasets.Dataset.from_dict({"text": texts, "label": [i % 2 for i in range(len(texts))]})
    datasets.DatasetDict({"train": d, "validation": d, "test": d}).save_to_disk(str(path))


def test_editing_a_local_dataset_directory_changes_node_ids(tmp_path):
    data = tmp_path / "mydata"
    texts = [f"example {i}" for i in range(40)]
    _save_dataset(data, texts)
    f = _study(tmp_path, datasets=["builtin:synthetic_sentiment", str(data)], victims=[str(data)])
    ids = set(build_plan(load_study(f)).nodes)
    assert ids == set(build_plan(load_study(f)).nodes), "the same content gives the same ids"
    texts[7] = "an edited row"
    _save_dataset(data, texts)
    edited = build_plan(load_study(f))
    assert ids != set(edited.nodes)
    fts = [n for n in edited.nodes.values() if n.step == "finetune"]
    hashed = [n.params["dataset"]["sha256"] for n in fts if n.params["dataset"]["uri"] == str(data)]
    assert hashed == [tree_sha256(data)[:16]]
    # the builtin expert did not change
    assert {n.id for n in fts if n.params["dataset"]["uri"] == "builtin:synthetic_sentiment"} <= ids


def test_file_hashes_are_memoised_by_size_and_mtime(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGESEC_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "a.csv"
    f.write_text("text,label\nhello,1\n")
    first = file_sha256(f)
    st = os.stat(f)
    f.write_text("text,label\nHELLO,1\n")  # same size
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert file_sha256(f) == first, "same size and mtime: the memo answers without reading"
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert file_sha256(f) != first, "a new mtime: hashed again"
    f.write_text("text,label\nhello,1\nmore,0\n")
    assert len({first, file_sha256(f)}) == 2


def test_dataset_slugs_must_be_unique(tmp_path):
    from mergesec.orchestrator.errors import StudyError

    f = _study(tmp_path, datasets=["builtin:synthetic_sentiment", "hf:glue/sst2", "hf:glue_sst2"])
    with pytest.raises(StudyError) as e:
        load_study(f)
    assert e.value.problems == [
        (
            "datasets.2",
            "'hf:glue_sst2' and 'hf:glue/sst2' have the same short name 'glue_sst2'; "
            "list only one of them",
        )
    ]


def test_registering_an_existing_op_needs_replace(tmp_path):
    original = get_op("merge", "ties")

    def other_ties(base, experts, *, k: float = 0.2, coefficient: float = 1.0):
        return base

    with pytest.raises(ValueError, match="already registered by mergesec.merging.methods.ties"):
        register_op("merge", "ties", fn=other_ties)
    assert get_op("merge", "ties").fn is original.fn
    # the same function registering again (a module imported twice) is not a replacement
    register_op(
        "merge", "ties", searchable=("coefficient", "k"), traits=tuple(original.traits),
        fn=original.fn,
    )  # fmt: skip
    try:
        register_op("merge", "ties", fn=other_ties, replace=True)
        assert get_op("merge", "ties").fn is other_ties
    finally:
        register_op(
            "merge", "ties", version=original.version, searchable=tuple(original.searchable),
            traits=tuple(original.traits), fn=original.fn, replace=True,
        )  # fmt: skip
    assert get_op("merge", "ties") == original


def test_range_pairs_and_strict_types():
    from mergesec.core.registry import OpError

    op = get_op("protect", "mergelock")
    assert validate_params(op, {"scale_min": 2, "scale_max": 2})["scale_min"] == 2.0
    with pytest.raises(OpError, match=r"scale_min \(3.0\) must not exceed scale_max \(2.0\)"):
        validate_params(op, {"scale_min": 3, "scale_max": 2}, "p")
    with pytest.raises(OpError, match="valid integer") as e:
        validate_params(op, {"seed": "1"}, "scenarios.s.protect")
    assert e.value.path == "scenarios.s.protect.seed"


def test_node_record_names_the_code_that_ran_it(tmp_path):
    from mergesec.orchestrator.node import Node
    from mergesec.orchestrator.runner import execute_node
    from mergesec.orchestrator.store import Store

    store = Store(str(tmp_path / "store"))
    # An evaluation of a model that is not in the store: the op fails, the record is written.
    node = Node("evaluate", "accuracy", "1", {"datasets": [], "op": {}}, {"model": "0" * 16})
    with pytest.raises(Exception):  # noqa: B017 (whatever the op raises, the record is kept)
        execute_node(node, store)
    code = store.read_node(node.id)["code"]
    root = Path(mergesec.__file__).resolve().parent.parent
    head = subprocess.run(
        ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True
    )
    assert code["mergesec"]["version"] == mergesec.__version__
    assert code["mergesec"]["commit"] == (head.stdout.strip() or None)
    import mlflow
    import peft
    import ray
    import torch
    import transformers

    for lib in (torch, transformers, peft, ray, mlflow):
        assert code["libraries"][lib.__name__] == lib.__version__, lib.__name__


def test_plan_flags_unpinned_hub_references(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    f = _study(
        tmp_path,
        base="hf:someorg/some-model",
        datasets=["builtin:synthetic_sentiment", "hf:glue/sst2@abc123", "hf:imdb"],
        victims=["builtin:synthetic_sentiment"],
    )
    r = CliRunner().invoke(app, ["plan", str(f), "--store", str(tmp_path / "st")])
    assert r.exit_code == 0, r.output
    flagged = [x for x in r.output.splitlines() if x.startswith("unpinned")]
    assert len(flagged) == 2, r.output
    assert flagged[0].startswith("unpinned dataset datasets.2: hf:imdb has no @revision")
    assert flagged[1].startswith("unpinned model base: hf:someorg/some-model has no @revision")
    assert all("the hub could not be asked" in x for x in flagged)
    assert "glue" not in " ".join(flagged)


def test_resolving_a_pin_without_the_hub_gives_none(monkeypatch):
    from mergesec.orchestrator.pins import Unpinned, is_unpinned, pin_uri, resolve_commit

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_commit(Unpinned("base", "hf:org/m", "model")) is None
    assert is_unpinned("hf:org/m") and not is_unpinned("hf:org/m@v1")
    assert not is_unpinned("hf:./local/dir") and not is_unpinned("builtin:synthetic_sentiment")
    assert pin_uri("hf:org/m", "0" * 40) == "hf:org/m@" + "0" * 40


def test_ops_lists_ranges():
    r = CliRunner().invoke(app, ["ops"])
    assert r.exit_code == 0
    line = next(x for x in r.output.splitlines() if "merge/ties" in x)
    assert "k: float > 0, <= 1" in line
