"""Plan expansion (grid, dedup, content ids) and the store's atomic node directories."""

from __future__ import annotations

import json

import pyarrow.fs
import pytest

from mergesec.orchestrator.grid import apply_overrides, expand_grid
from mergesec.orchestrator.node import Node
from mergesec.orchestrator.plan import build_plan
from mergesec.orchestrator.spec import load_study
from mergesec.orchestrator.store import Store, safe_name

STUDY = """
study: p
base: builtin:minilm-l6
datasets: [builtin:synthetic_sentiment, builtin:synthetic_topic, builtin:synthetic_question]
finetune: {mode: full, epochs: 1}
scenarios:
  unprotected: {}
  params: {protect: {op: params}}
  params+aga: {protect: {op: params}, attack: {op: aga}}
victims: all
merge: {op: {grid: [task_arithmetic, ties]}, coefficient: {search: [0.3, 1.0]}}
"""


def test_grid_and_overrides():
    raw = {"a": {"grid": [1, 2]}, "b": {"c": {"grid": ["x", "y", "z"]}}, "d": 0}
    variants = expand_grid(raw)
    assert len(variants) == 6
    assert variants[0] == ({"a": "1", "b.c": "x"}, {"a": 1, "b": {"c": "x"}, "d": 0})
    assert apply_overrides(raw, ["d=5", "e.f=[1, 2]"]) | {} == {**raw, "d": 5, "e": {"f": [1, 2]}}


def test_plan_dedups_and_ids_are_content_hashes(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text(STUDY)
    plan = build_plan(load_study(f))
    steps = [n.step for n in plan.nodes.values()]
    # 3 clean experts, shared by all 3 scenarios x 3 victims x 2 merge ops
    assert steps.count("finetune") == 3
    # params protects each victim once, shared by "params" and "params+aga"
    assert steps.count("protect") == 3 and steps.count("attack") == 3
    # unprotected merge is one per merge op whatever the victim; protected/attacked: one per victim
    assert steps.count("merge") == 2 * (1 + 3 + 3)
    assert len(plan.rows) == 2 * 3 * 3
    again = build_plan(load_study(f))
    assert list(again.nodes) == list(plan.nodes)
    f.write_text(STUDY.replace("epochs: 1", "epochs: 2"))
    changed = build_plan(load_study(f))
    assert not set(changed.nodes) & set(plan.nodes) - {
        n.id
        for n in plan.nodes.values()
        if n.step not in {"finetune", "evaluate", "protect", "attack", "merge"}
    }
    # a node comes after all of its inputs
    seen: set[str] = set()
    for n in plan.topological():
        assert set(n.inputs.values()) <= seen
        seen.add(n.id)


def test_defaults_do_not_change_ids():
    a = Node("merge", "ties", "1", {"op": {"k": 0.2}}, {"x": "00000000"})
    b = Node("merge", "ties", "1", {"op": {"k": 0.2}}, {"x": "00000000"})
    c = Node("merge", "ties", "2", {"op": {"k": 0.2}}, {"x": "00000000"})
    assert a.id == b.id != c.id and len(a.id) == 16


@pytest.mark.parametrize("remote", [False, True])
def test_store_atomic_publish_and_failure(tmp_path, remote):
    if remote:
        # The generic pyarrow.fs path, exercised on a SubTreeFileSystem over a local directory.
        store = Store(str(tmp_path / "s"))
        store.fs = pyarrow.fs.SubTreeFileSystem(str(tmp_path / "s"), pyarrow.fs.LocalFileSystem())
        store.root, store.local = "", None
        (tmp_path / "s").mkdir()
    else:
        store = Store(str(tmp_path / "s"))
    nid = "0123456789abcdef"
    assert not store.is_done(nid)
    with pytest.raises(RuntimeError), store.writing(nid, {"id": nid}) as out:
        (out / "half.txt").write_text("x")
        raise RuntimeError("crash mid-write")
    assert not store.is_done(nid) and not (tmp_path / "s" / "nodes" / nid).exists()
    store.mark_failed(nid, {"id": nid}, "Traceback ...\nValueError: boom")
    assert store.is_failed(nid) and store.failure(nid).endswith("boom")
    with store.writing(nid, {"id": nid}) as out:
        (out / "metrics.json").write_text(json.dumps({"a": 1.0}))
        (out / "w.bin").write_bytes(b"123")
    assert store.is_done(nid) and not store.is_failed(nid)
    assert store.read_metrics(nid) == {"a": 1.0} and store.read_node(nid)["id"] == nid
    assert (store.local_dir(nid) / "w.bin").read_bytes() == b"123"
    assert not [p for p in (tmp_path / "s" / "nodes").iterdir() if p.name.startswith(".")]
    with pytest.raises(ValueError):
        store.local_dir("../../etc")


def test_safe_names():
    assert safe_name("../../etc/passwd") == "_.._etc_passwd"
    assert "/" not in safe_name("a/b") and safe_name("") == "_"
