"""Golden fingerprints: builtin datasets' content and small deterministic metrics of every step on
tiny models, per task kind.

Node ids hash (step, op, version, params, inputs), not code, so a change that moves a number
without bumping the op's version would let resumed studies mix old and new results. These values
were recorded with ``MERGESEC_WRITE_GOLDEN=1 python -m pytest tests/test_golden.py`` before the
task kinds were unified behind one pipeline; a refactor must leave them unchanged, or bump the op
version and record them again with the reason in the commit.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import pytest
import torch
from test_lm_pipeline import make_tiny_llama
from test_vision_pipeline import make_tiny_clip

from mergesec.core.context import NodeContext
from mergesec.core.registry import get_op, validate_params
from mergesec.defenses.trap2 import EPOCH_SCHEDULE
from mergesec.models.artifact import ModelArtifact
from mergesec.models.hub import model_identity
from mergesec.orchestrator.runner import executor_for

GOLDEN = Path(__file__).parent / "golden" / "steps.json"
WRITE = os.environ.get("MERGESEC_WRITE_GOLDEN") == "1"
TEXT_DATASETS = tuple(
    f"synthetic_{n}" for n in ("sentiment", "topic", "question", "negation", "emotion", "formality")
)
OTHER_DATASETS = ("synthetic_shapes", "synthetic_colors", "synthetic_arithmetic")


def _recorded() -> dict:
    return json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}


_RESULTS: dict = {}


def check(key: str, value: dict) -> None:
    """Compare ``value`` with the recorded one (or record it when writing goldens)."""
    if WRITE:
        _RESULTS[key] = value
        data = _recorded() | _RESULTS
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        return
    expected = _recorded().get(key)
    assert expected is not None, f"no golden value for {key}; record with MERGESEC_WRITE_GOLDEN=1"
    assert set(expected) <= set(value), f"{key}: missing {sorted(set(expected) - set(value))}"
    for name, want in expected.items():
        got = value[name]
        if isinstance(want, float):
            assert got == pytest.approx(want, rel=1e-4, abs=1e-6), f"{key}: {name}"
        else:
            assert got == want, f"{key}: {name}"


def split_digest(examples) -> str:
    h = hashlib.sha256()
    for e in examples:
        fields = e if isinstance(e, dict) else getattr(e, "__dict__", None) or e._asdict()
        for k in sorted(fields):
            v = fields[k]
            if hasattr(v, "tobytes"):
                v = hashlib.sha256(v.tobytes()).hexdigest()
            h.update(f"{k}={v!r};".encode())
        h.update(b"\n")
    return h.hexdigest()


@pytest.mark.parametrize("name", TEXT_DATASETS)
def test_builtin_text_dataset_content(name):
    from mergesec.data import load_dataset_splits

    data = load_dataset_splits(f"builtin:{name}")
    value = {s: split_digest(getattr(data, s)) for s in ("train", "validation", "test")}
    check(f"dataset/{name}", value | {"labels": list(data.label_names)})


def _image_digest(split) -> str:
    import numpy as np

    h = hashlib.sha256()
    for image, label in split:
        h.update(np.asarray(image).tobytes())
        h.update(str(label).encode())
    return h.hexdigest()


@pytest.mark.parametrize("name", OTHER_DATASETS)
def test_builtin_image_and_qa_dataset_content(name):
    from mergesec.data import load_dataset_splits

    data = load_dataset_splits(f"builtin:{name}")
    value = {}
    for s in ("train", "validation", "test"):
        split = data.split(s)
        value[s] = _image_digest(split) if name != "synthetic_arithmetic" else split_digest(split)
    check(f"dataset/{name}", value)


# ---- steps --------------------------------------------------------------------------------------


def fingerprint(path: Path) -> dict[str, float]:
    """Squared norms (float64) of the task vector (backbone minus the base) and of the heads."""
    from mergesec.models.hub import base_weights_file
    from mergesec.models.state_dict import load_state_dict

    art = ModelArtifact.open(path)
    base = load_state_dict(base_weights_file(art.base))
    tuned = art.backbone_state()
    tv = sum(
        (tuned[k].double() - base[k].double()).pow(2).sum()
        for k in tuned
        if tuned[k].is_floating_point()
    )
    heads = sum(v.double().pow(2).sum() for v in art.all_heads().values())
    return {"task_vector_ss": float(tv), "heads_ss": float(heads)}


def floats(metrics: dict) -> dict:
    return {
        k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)
    }


class Steps:
    """Runs step executors directly (no Ray, no store) under one directory."""

    def __init__(self, root: Path, base: Path):
        self.root = root
        self.base = {"base": str(base), "base_id": model_identity(str(base))}

    def run(self, step: str, op: str, params: dict, inputs: dict, name: str) -> dict:
        out = self.root / name
        out.mkdir(parents=True)
        ctx = NodeContext(name, step, op, self.base | params,
                          {k: self.root / v for k, v in inputs.items()}, out)  # fmt: skip
        return executor_for(step, op)(ctx)

    def finetune(self, ds: dict, name: str, mode: str, **p) -> dict:
        op = validate_params(get_op("finetune", mode), p)
        return self.run("finetune", mode, {"dataset": ds, "op": op}, {}, name)

    def trap2(self, ds: dict, name: str, ft: dict, **p) -> dict:
        ft_params = {"mode": "full", **validate_params(get_op("finetune", "full"), ft)}
        op = validate_params(get_op("protect", "trap2"), p)
        params = {"dataset": ds, "finetune": ft_params, "op": op}
        return self.run("protect", "trap2", params, {}, name)

    def evaluate(self, datasets: list, model: str, name: str) -> dict:
        op = validate_params(get_op("evaluate", "accuracy"), {})
        params = {"datasets": datasets, "split": "test", "op": op}
        return self.run("evaluate", "accuracy", params, {"model": model}, name)

    def scale_curve(self, ds: dict, model: str, name: str) -> dict:
        params = {"datasets": [ds], "scales": [0.0, 0.5, 1.0, 1.5], "op": {}}
        return self.run("evaluate", "scale_curve", params, {"model": model}, name)

    def merge(self, datasets: list, experts: dict, name: str) -> dict:
        op = validate_params(
            get_op("merge", "task_arithmetic"), {"coefficient": {"search": [0.3, 1.0]}}
        )
        params = {"datasets": datasets, "op": op}
        inputs = {f"expert.{k}": v for k, v in experts.items()}
        return self.run("merge", "task_arithmetic", params, inputs, name)

    def after_merge(self, ds: dict, datasets: list, release: str, name: str) -> dict:
        op = validate_params(
            get_op("attack", "finetune_after_merge"), {"n": 32, "epochs": 2, "lr": 1e-3}
        )
        params = {"dataset": ds, "datasets": datasets, "op": op}
        return self.run("attack", "finetune_after_merge", params, {"release": release}, name)


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def record(steps: Steps, key: str, metrics: dict, node: str | None = None) -> None:
    value = floats(metrics)
    if node is not None:
        value |= fingerprint(steps.root / node)
    check(key, value)


def run_kind(steps: Steps, kind: str, a: dict, b: dict, ft: dict, lora: dict) -> None:
    record(steps, f"{kind}/finetune/full", steps.finetune(a, "a", "full", **ft), "a")
    record(steps, f"{kind}/finetune/full-b", steps.finetune(b, "b", "full", **ft), "b")
    if lora is not None:
        record(
            steps, f"{kind}/finetune/lora", steps.finetune(a, "a-lora", "lora", **lora), "a-lora"
        )
    # Version 1's schedule, explicitly (protect/trap2 version 2 defaults to the released one)
    trap = steps.trap2(a, "trap2", ft, lam=0.2, patience=2, weight_decay=0.01, **EPOCH_SCHEDULE)
    record(steps, f"{kind}/protect/trap2", trap, "trap2")
    record(steps, f"{kind}/evaluate/accuracy", steps.evaluate([a], "a", "eval-a"))
    record(steps, f"{kind}/evaluate/scale_curve", steps.scale_curve(a, "trap2", "curve"))
    merged = steps.merge([a, b], {"x": "a", "y": "b"}, "merged")
    record(steps, f"{kind}/merge/task_arithmetic", merged, "merged")
    record(steps, f"{kind}/attack/finetune_after_merge",
           steps.after_merge(a, [a, b], "merged", "sft"), "sft")  # fmt: skip


def test_text_steps(tmp_path, tiny_bert):
    ft = {"epochs": 1, "lr": 1e-3, "batch_size": 64, "max_length": 24, "seed": 0}
    lora = {"epochs": 1, "lr": 1e-2, "batch_size": 64, "max_length": 24, "seed": 0, "r": 4}
    a, b = {"uri": "builtin:synthetic_sentiment"}, {"uri": "builtin:synthetic_topic"}
    run_kind(Steps(tmp_path, tiny_bert), "text", a, b, ft, lora)


def test_image_steps(tmp_path):
    clip = make_tiny_clip(tmp_path / "clip")
    ft = {"epochs": 1, "lr": 2e-3, "seed": 0}
    lora = {"epochs": 1, "lr": 1e-2, "seed": 0, "r": 4}
    a, b = {"uri": "builtin:synthetic_colors"}, {"uri": "builtin:synthetic_shapes"}
    run_kind(Steps(tmp_path / "steps", clip), "image", a, b, ft, lora)


def test_qa_steps(tmp_path):
    llama = make_tiny_llama(tmp_path / "llama")
    steps = Steps(tmp_path / "steps", llama)
    a = {"uri": "builtin:synthetic_arithmetic"}
    lora = {"epochs": 1, "lr": 5e-3, "batch_size": 16, "seed": 0, "r": 4}
    record(steps, "qa/finetune/lora", steps.finetune(a, "a-lora", "lora", **lora), "a-lora")
    record(steps, "qa/evaluate/accuracy", steps.evaluate([a], "a-lora", "eval-a"))
