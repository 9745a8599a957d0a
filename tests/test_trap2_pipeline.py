"""Trap² wired into the pipeline: the protect op, scale diagnostics, merge-stage and post-merge
attacks, RegMean in the merge step, and a study using all of them through Ray."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from mergesec.core.context import NodeContext
from mergesec.core.registry import get_op, validate_params
from mergesec.defenses.trap2 import EPOCH_SCHEDULE
from mergesec.merging.methods.linear import task_arithmetic
from mergesec.models.artifact import ModelArtifact
from mergesec.models.hub import base_weights_file, model_identity
from mergesec.models.state_dict import load_state_dict
from mergesec.orchestrator.runner import executor_for
from mergesec.tasks import attack, evaluate, finetune, merge, protect

SENT, TOPIC = {"uri": "builtin:synthetic_sentiment"}, {"uri": "builtin:synthetic_topic"}
FT = {"epochs": 1, "lr": 1.0e-3, "batch_size": 64, "max_length": 24, "seed": 0}


@pytest.fixture(autouse=True)
def two_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(min(2, previous))
    yield
    torch.set_num_threads(previous)


class Runner:
    """Runs step executors directly on node contexts under one directory; keeps their reports."""

    def __init__(self, root: Path, base: str):
        self.root, self.base = root, {"base": base, "base_id": model_identity(base)}
        self.reports: dict[str, list[tuple[int, dict[str, float]]]] = {}

    def __call__(self, module, step: str, op: str, params: dict, inputs: dict, name: str):
        out = self.root / name
        if (out / "metrics.json").exists():
            return json.loads((out / "metrics.json").read_text())
        out.mkdir(parents=True)
        log = self.reports.setdefault(name, [])
        ctx = NodeContext(name, step, op, params, {k: self.root / v for k, v in inputs.items()},
                          out, report=lambda m, s: log.append((s, dict(m))))  # fmt: skip
        metrics = executor_for(step, op)(ctx)  # as a trial runs it: the op's own executor if any
        (out / "metrics.json").write_text(json.dumps(metrics))
        return metrics

    def finetune(self, ds: dict, name: str, mode: str = "full", **over) -> dict:
        params = validate_params(get_op("finetune", mode), FT | over)
        return self(finetune, "finetune", mode, self.base | {"dataset": ds, "op": params}, {}, name)

    def trap2(self, ds: dict, name: str, mode: str = "full", ft: dict | None = None, **op) -> dict:
        ft_params = validate_params(get_op("finetune", mode), FT | (ft or {}))
        # the finetune's own schedule, explicitly (version 2 defaults to the released one)
        same = {k: ft_params[k] for k in ("patience", "weight_decay")}
        params = self.base | {
            "dataset": ds,
            "finetune": {"mode": mode, **ft_params},
            "op": validate_params(get_op("protect", "trap2"), EPOCH_SCHEDULE | same | op),
        }
        return self(protect, "protect", "trap2", params, {}, name)


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_bert) -> Runner:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MERGESEC_CACHE", str(tmp_path_factory.getbasetemp() / "mergesec-cache"))
        r = Runner(tmp_path_factory.mktemp("trap2-pipeline"), str(tiny_bert))
        r.finetune(SENT, "clean-sentiment")
        r.finetune(TOPIC, "clean-topic")
        r.trap2(SENT, "trap2-sentiment", lam=0.2)
        yield r


def backbone(run: Runner, name: str) -> dict[str, torch.Tensor]:
    return ModelArtifact.open(run.root / name).backbone_state()


def base_state(run: Runner) -> dict[str, torch.Tensor]:
    return load_state_dict(base_weights_file(run.base["base"]))


# ---------------------------------------------------------------- protect/trap2


def test_trap2_registration_and_validation():
    op = get_op("protect", "trap2")
    assert "trains" in op.traits
    defaults = validate_params(op, {})
    assert {k: defaults[k] for k in ("lam", "s_min", "s_max", "delta", "weight", "clip_norm",
            "seed")} == {"lam": 0.005, "s_min": 0.05, "s_max": 2.0, "delta": 0.05,
                         "weight": "auto", "clip_norm": 1.0, "seed": 0}  # fmt: skip
    with pytest.raises(ValueError):
        validate_params(op, {"weight": "square"})


def test_trap2_with_lam_zero_is_plain_finetuning(run):
    m = run.trap2(SENT, "trap2-lam0", lam=0.0)
    assert m["skipped_steps"] == 0 and m["steps"] > 0
    clean, lam0 = backbone(run, "clean-sentiment"), backbone(run, "trap2-lam0")
    assert set(clean) == set(lam0)
    for k in clean:
        assert torch.equal(clean[k], lam0[k]), k
    a, b = (ModelArtifact.open(run.root / n) for n in ("clean-sentiment", "trap2-lam0"))
    assert torch.equal(
        a.all_heads()["synthetic_sentiment.weight"], b.all_heads()["synthetic_sentiment.weight"]
    )
    assert b.meta["protect"] == "trap2" and b.meta["release"] == "full"


def test_trap2_release_differs_from_clean_and_is_a_full_artifact(run):
    clean, trap = backbone(run, "clean-sentiment"), backbone(run, "trap2-sentiment")
    moved = [
        k for k in clean if clean[k].is_floating_point() and not torch.equal(clean[k], trap[k])
    ]
    assert len(moved) > len(clean) // 2
    metrics = json.loads((run.root / "trap2-sentiment" / "metrics.json").read_text())
    assert metrics["task_vector_norm/release"] > 0
    steps = [m for _, m in run.reports["trap2-sentiment"] if "train/s" in m]
    assert steps and all(0.05 <= m["train/s"] <= 2.0 for m in steps)
    assert any("train/scaled_loss" in m for m in steps)
    assert any("val/accuracy" in m for _, m in run.reports["trap2-sentiment"])


def test_trap2_keeps_the_head_out_of_the_scaled_pass(tiny_bert):
    from mergesec.data import load_dataset_splits
    from mergesec.defenses.trap2 import backbone_snapshot
    from mergesec.kinds.text import TextKind

    task = TextKind().build(str(tiny_bert), load_dataset_splits("builtin:synthetic_topic"))
    snap = backbone_snapshot(task)
    names = {n for n, p in task.model.named_parameters() if p.requires_grad}
    assert set(snap) == {n for n in names if n.startswith("backbone.")}
    assert not any(n.startswith("head.") for n in snap)


def test_trap2_lora_release_changes_only_adapted_layers(run):
    run.trap2(SENT, "trap2-lora", mode="lora", ft={"r": 4, "alpha": 8}, lam=0.1)
    art = ModelArtifact.open(run.root / "trap2-lora")
    assert art.meta["release"] == "lora" and art.meta["protect"] == "trap2"
    assert (art.path / "adapter" / "adapter_config.json").is_file()
    sd, base = art.backbone_state(), base_state(run)
    assert set(sd) == set(base)
    changed = {k for k in sd if not torch.equal(sd[k], base[k])}
    assert changed and all(k.endswith(".weight") for k in changed)
    assert not any("LayerNorm" in k or "embeddings" in k for k in changed)


def test_trap2_skips_and_counts_non_finite_steps(run, tiny_bert):
    from mergesec.data import load_dataset_splits
    from mergesec.defenses.trap2 import protect_trap2
    from mergesec.kinds.text import TextKind

    full = load_dataset_splits("builtin:synthetic_sentiment")
    data = replace(full, train=full.train[:192], validation=full.validation[:64])
    task = TextKind().build(str(tiny_bert), data)
    with torch.no_grad():
        task.model.head.bias[0] = float("nan")
    before = {k: v.clone() for k, v in task.model.backbone.state_dict().items()}
    ft = {"mode": "full"} | validate_params(get_op("finetune", "full"), FT)
    res = protect_trap2(task, data, ft, lam=0.1, **EPOCH_SCHEDULE)
    assert res["steps"] == 3
    assert res["skipped_steps"] == res["steps"]
    for k, v in task.model.backbone.state_dict().items():
        assert torch.equal(v, before[k]), k


# ---------------------------------------------------------------- evaluate/scale_curve


def test_scale_curve_node_sweeps_the_task_vector(run):
    scales = [0.0, 0.5, 1.0, 1.5]
    params = {"datasets": [SENT], "scales": scales, "op": {}}
    m = run(evaluate, "evaluate", "scale_curve", params, {"model": "trap2-sentiment"}, "sc-trap2")
    out = run.root / "sc-trap2"
    doc = json.loads((out / "scale_curve.json").read_text())
    assert [p["s"] for p in doc["curve"]] == scales
    assert (out / "scale_curve.png").read_bytes()[:4] == b"\x89PNG"
    points = run.reports["sc-trap2"]
    assert [s for s, _ in points] == [0, 1, 2, 3]
    assert [p["scale/s"] for _, p in points] == scales
    assert {"scale/loss", "scale/accuracy"} <= set(points[0][1])
    at = {p["s"]: p for p in doc["curve"]}
    assert m["sharpness/loss_s1"] == pytest.approx(at[1.0]["loss"])

    # s = 1 is the model itself, s = 0 the base backbone with the model's head
    art = ModelArtifact.open(run.root / "trap2-sentiment")
    own = evaluate.evaluate_artifact(art, [SENT], split="validation")
    assert at[1.0]["accuracy"] == pytest.approx(own["accuracy/synthetic_sentiment"])
    assert at[1.0]["loss"] == pytest.approx(own["loss/synthetic_sentiment"], rel=1e-4)
    base_dir = run.root / "base-with-trap2-head"
    base_dir.mkdir(exist_ok=True)
    from mergesec.models.artifact import write_artifact

    write_artifact(base_dir, base=art.base, backbone=base_state(run), heads=art.all_heads(),
                   head_info=art.heads)  # fmt: skip
    zero = evaluate.evaluate_artifact(ModelArtifact.open(base_dir), [SENT], split="validation")
    assert at[0.0]["loss"] == pytest.approx(zero["loss/synthetic_sentiment"], rel=1e-4)


# ---------------------------------------------------------------- merge-stage attack: rescale


def _merge_params(op: str, attack_params: dict | None = None, **op_params) -> dict:
    params = {"datasets": [SENT, TOPIC], "op": validate_params(get_op("merge", op), op_params)}
    if attack_params is not None:
        a = validate_params(get_op("attack", "rescale"), attack_params)
        params["attack"] = {
            "op": "rescale",
            "version": "1",
            "params": a,
            "victim": "synthetic_sentiment",
        }
    return params


def test_rescale_attack_searches_scale_and_coefficient_jointly(run):
    coefs, scales, n_val = [0.5, 1.0, 10.0], [0.25, 1.0, 4.0], 10
    params = run.base | _merge_params(
        "task_arithmetic", {"scales": scales, "n_val": n_val}, coefficient={"search": coefs}
    )
    inputs = {
        "expert.synthetic_sentiment": "trap2-sentiment",
        "expert.synthetic_topic": "clean-topic",
    }
    m = run(merge, "merge", "task_arithmetic", params, inputs, "m-rescale")
    points = [p for _, p in run.reports["m-rescale"]]
    assert len(points) == len(coefs) * len(scales)
    assert {(p["search/scale"], p["search/coefficient"]) for p in points} == {
        (s, c) for s in scales for c in coefs
    }
    for p in points:  # the victim is scored on n_val labelled examples only
        assert p["search/victim_accuracy"] * n_val == pytest.approx(
            round(p["search/victim_accuracy"] * n_val), abs=1e-9
        )
    best = max(points, key=lambda p: p["search/score"])
    assert m["search/best_score"] == best["search/score"]
    assert (m["chosen/scale"], m["chosen/coefficient"]) == (
        best["search/scale"], best["search/coefficient"],
    )  # fmt: skip

    # the written model is task arithmetic of W0 + s·τ_victim with the other expert
    base = base_state(run)
    victim, other = backbone(run, "trap2-sentiment"), backbone(run, "clean-topic")
    s = m["chosen/scale"]
    rescaled = {k: base[k] + s * (v - base[k]) if v.is_floating_point() else v
                for k, v in victim.items()}  # fmt: skip
    want = task_arithmetic(base, [rescaled, other], coefficient=m["chosen/coefficient"])
    got = backbone(run, "m-rescale")
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=1e-5)
    art = ModelArtifact.open(run.root / "m-rescale")
    assert art.meta["attack"] == "rescale" and art.meta["attack_choice"] == {"scale": s}
    assert set(art.heads) == {"synthetic_sentiment", "synthetic_topic"}


# ---------------------------------------------------------------- RegMean in the merge step


def test_regmean_merge_node_solves_the_regression_with_each_experts_grams(run):
    params = run.base | _merge_params("regmean", alpha=1.0)
    inputs = {
        "expert.synthetic_sentiment": "clean-sentiment",
        "expert.synthetic_topic": "clean-topic",
    }
    run(merge, "merge", "regmean", params, inputs, "m-regmean")
    got = backbone(run, "m-regmean")
    base = base_state(run)
    experts = [backbone(run, "clean-sentiment"), backbone(run, "clean-topic")]

    # recompute the Gram matrices from each expert on its own validation texts
    from mergesec.data import load_dataset_splits
    from mergesec.kinds.text import MAX_LENGTH
    from mergesec.merging.grams import collect_linear_grams
    from mergesec.models.hub import load_backbone, load_tokenizer
    from mergesec.tasks.merge_search import GRAM_EXAMPLES

    tok = load_tokenizer(run.base["base"])
    key = "encoder.layer.0.attention.self.query.weight"
    lhs = torch.zeros_like(base[key], dtype=torch.float64)
    rhs = torch.zeros_like(lhs)
    for sd, ds in zip(experts, (SENT, TOPIC), strict=True):
        model = load_backbone(run.base["base"])
        model.load_state_dict(sd)
        texts = [e.text for e in load_dataset_splits(ds["uri"]).validation[:GRAM_EXAMPLES]]
        enc = tok(texts, padding=True, truncation=True, max_length=MAX_LENGTH,
                  return_tensors="pt")  # fmt: skip
        g = collect_linear_grams(model, [dict(enc)])["encoder.layer.0.attention.self.query"]
        lhs += got[key].double() @ g.double()
        rhs += sd[key].double() @ g.double()
    # W Σ G_i = Σ W_i G_i (alpha = 1: no shrinkage), up to the batch layout of the Gram sums
    torch.testing.assert_close(lhs, rhs, atol=1e-3, rtol=1e-3)
    mean = (experts[0][key] + experts[1][key]) / 2
    assert not torch.allclose(got[key], mean, atol=1e-5)
    ln = "encoder.layer.0.attention.output.LayerNorm.weight"
    torch.testing.assert_close(got[ln], (experts[0][ln] + experts[1][ln]) / 2)


# ---------------------------------------------------------------- attack after merging


def test_finetune_after_merge_trains_backbone_and_victim_head_only(run):
    params = run.base | _merge_params("task_arithmetic", coefficient=0.7)
    inputs = {
        "expert.synthetic_sentiment": "trap2-sentiment",
        "expert.synthetic_topic": "clean-topic",
    }
    run(merge, "merge", "task_arithmetic", params, inputs, "m-plain")
    op = validate_params(
        get_op("attack", "finetune_after_merge"), {"n": 48, "epochs": 3, "lr": 1e-3}
    )
    params = run.base | {"dataset": SENT, "datasets": [SENT, TOPIC], "op": op}
    m = run(attack, "attack", "finetune_after_merge", params, {"release": "m-plain"}, "sft")
    assert m["examples"] == 48
    assert m["attacker/accuracy_after"] >= m["attacker/accuracy_before"]
    merged, tuned = (ModelArtifact.open(run.root / n) for n in ("m-plain", "sft"))
    assert tuned.meta["attack"] == "finetune_after_merge"
    h0, h1 = merged.all_heads(), tuned.all_heads()
    assert torch.equal(h0["synthetic_topic.weight"], h1["synthetic_topic.weight"])
    assert not torch.equal(h0["synthetic_sentiment.weight"], h1["synthetic_sentiment.weight"])
    b0, b1 = merged.backbone_state(), tuned.backbone_state()
    assert any(not torch.equal(b0[k], b1[k]) for k in b0)


def test_rescale_has_no_node_of_its_own(run, tmp_path):
    ctx = NodeContext("x", "attack", "rescale", run.base | {"op": {}}, {}, tmp_path)
    with pytest.raises(ValueError, match="inside the merge step"):
        attack.execute(ctx)


# ---------------------------------------------------------------- figures


def _benchmark(name: str):
    """A script of ``benchmarks/`` imported as a module (it is no package)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_report_figures(run):
    from mergesec.plots import plot_scale_curves
    from mergesec.report.scale import plot_scenario_merge

    plot_step_times = _benchmark("trap2_step_time").plot_step_times

    curve = [{"s": s, "loss": 1 + (s - 1) ** 2, "accuracy": 1 - abs(s - 1) / 3} for s in (0, 1, 2)]
    assert plot_scale_curves({"a": curve, "b": curve[::-1]})[:4] == b"\x89PNG"
    rows = [
        {"scenario": sc, "victim": "synthetic_sentiment", "merge": op, "variant": "", "status": "done",
         "victim_clean": 0.9, "victim_release": 0.88, "victim_merged": 0.4, "others_merged": 0.7}
        for sc in ("unprotected", "trap2") for op in ("task_arithmetic", "ties")
    ]  # fmt: skip
    assert plot_scenario_merge(rows)[:4] == b"\x89PNG"
    assert plot_scenario_merge([{**rows[0], "status": "missing"}]) is None
    bench = [{"mode": "full", "method": "plain", "ms_median": 10.0},
             {"mode": "full", "method": "trap2", "ms_median": 21.0}]  # fmt: skip
    assert plot_step_times(bench)[:4] == b"\x89PNG"
    assert plot_step_times(bench[:1]) is None


def test_scale_curve_table_has_one_cell_per_column():
    import re

    from mergesec.report.scale import scale_curve_table

    summary = {
        "sharpness/loss_s1": 0.05,
        "sharpness/off_to_nominal": 5.5,
        "sharpness/s_argmin": 1.0,
    }
    table = scale_curve_table({"trap2 sentiment: release": {"summary": summary}})
    cells = [len(re.findall(r"(?<!\\)\|", line)) for line in table.strip().splitlines()]
    assert len(cells) == 3 and len(set(cells)) == 1, table
    assert "| 5.500 | 1.000 |" in table


# ---------------------------------------------------------------- the nodes in a study DAG


@pytest.mark.slow
def test_trap2_study_runs_every_new_node_through_ray(tmp_path, tiny_bert):
    from e2e import child_runs, write_study
    from mlflow.tracking import MlflowClient

    from mergesec.orchestrator.engine import run_study
    from mergesec.orchestrator.plan import build_plan
    from mergesec.orchestrator.spec import load_study
    from mergesec.orchestrator.store import Store
    from mergesec.plots import plot_scale_curves
    from mergesec.report import build_results, write_reports
    from mergesec.report.scale import load_scale_curves

    trap = {"op": "trap2", "lam": 0.1, "max_steps": None, "eval_every": None, "warmup_steps": None}
    f = write_study(
        tmp_path, tiny_bert,
        scenarios={
            "trap2": {"protect": trap},
            "trap2-rescale": {"protect": trap, "attack": {"op": "rescale", "scales": [0.5, 1.0, 2.0], "n_val": 32}},
            "trap2-sft": {"protect": trap, "attack": {"op": "finetune_after_merge", "n": 32, "epochs": 1}},
        },
        merge={"op": "regmean", "coefficient": {"search": [0.5, 1.0]}},
        diagnostics={"scale_curve": True, "scales": [0.0, 0.5, 1.0, 1.5]},
    )  # fmt: skip
    study = load_study(f)
    plan = build_plan(study)
    ops = {(n.step, n.op) for n in plan.nodes.values()}
    assert {("protect", "trap2"), ("evaluate", "scale_curve"), ("merge", "regmean"),
            ("attack", "finetune_after_merge")} <= ops  # fmt: skip
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    summary = run_study(
        study, store_uri=str(tmp_path / "store"), tracking_uri=uri, on_finish=write_reports
    )
    assert summary.ok and summary.ran == len(plan.nodes)
    rows = {(r["scenario"], r["merge"]): r for r in build_results(plan, summary.store)}
    assert len(rows) == 3 and all(r["status"] == "done" for r in rows.values())
    assert rows[("trap2-rescale", "regmean")]["chosen_scale"] in (0.5, 1.0, 2.0)
    assert rows[("trap2-sft", "regmean")]["victim_merged"] is not None

    runs = {r.data.tags["mergesec.node_id"]: r for r in child_runs(uri, "smoke")}
    curve_nodes = [n for n in plan.nodes.values() if n.op == "scale_curve"]
    assert len(curve_nodes) == 2  # the clean expert (also "trained") and the Trap² release
    client = MlflowClient(uri)
    for n in curve_nodes:
        run_id = runs[n.id].info.run_id
        history = client.get_metric_history(run_id, "scale/loss")
        assert sorted(m.step for m in history) == [0, 1, 2, 3]
        assert "scale_curve.png" in {a.path for a in client.list_artifacts(run_id)}
    curves = load_scale_curves(plan, Store(str(tmp_path / "store")))
    assert {c["kind"] for c in curves.values()} == {"clean", "release"}
    assert plot_scale_curves({k: c["curve"] for k, c in curves.items()})[:4] == b"\x89PNG"
    # The study's own report carries the curves: a figure and the sharpness table.
    study_dir = tmp_path / "store" / "studies" / study.name
    assert (study_dir / "scale_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert (study_dir / "results_by_merge.png").read_bytes()[:4] == b"\x89PNG"
    md = (study_dir / "results.md").read_text()
    assert "## Loss along the scaling direction" in md
    assert sum(label in md for label in curves) == len(curves) == 2


# ---------------------------------------------------------------- the effect on the bundled MiniLM

MINILM_FT = {"epochs": 2, "lr": 1.0e-4, "batch_size": 16, "max_length": 64, "seed": 0}
MINILM_LAM = 0.3
MINILM_SCALES = [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0]
MINILM_COEFS = [0.1, 0.2, 0.3, 0.5, 0.7, 1.0]


def measure_minilm_effect(root: Path) -> dict:
    """Clean and Trap² sentiment experts on MiniLM, a clean topic expert, their scale curves and
    their task-arithmetic merges with the coefficient searched; every number the test checks."""
    run = Runner(root, "builtin:minilm-l6")
    run.finetune(SENT, "clean-sentiment", **MINILM_FT)
    run.finetune(TOPIC, "clean-topic", **MINILM_FT)
    trap = run.trap2(SENT, "trap2-sentiment", ft=MINILM_FT, lam=MINILM_LAM)
    record: dict = {"trap2_train": trap}
    for kind in ("clean", "trap2"):
        name = f"{kind}-sentiment"
        art = ModelArtifact.open(root / name)
        record[f"{kind}/standalone"] = evaluate.evaluate_artifact(art, [SENT])[
            "accuracy/synthetic_sentiment"
        ]
        params = {"datasets": [SENT], "scales": MINILM_SCALES, "op": {}}
        record[f"{kind}/sharpness"] = run(
            evaluate, "evaluate", "scale_curve", params, {"model": name}, f"sc-{kind}"
        )
        curve = json.loads((root / f"sc-{kind}" / "scale_curve.json").read_text())["curve"]
        record[f"{kind}/curve"] = {p["s"]: (p["loss"], p["accuracy"]) for p in curve}
        params = run.base | _merge_params("task_arithmetic", coefficient={"search": MINILM_COEFS})
        inputs = {"expert.synthetic_sentiment": name, "expert.synthetic_topic": "clean-topic"}
        m = run(merge, "merge", "task_arithmetic", params, inputs, f"m-{kind}")
        merged = evaluate.evaluate_artifact(ModelArtifact.open(root / f"m-{kind}"), [SENT, TOPIC])
        record[f"{kind}/merged"] = {"coefficient": m["chosen/coefficient"]} | merged
    return record


@pytest.mark.slow
def test_minilm_trap2_expert_is_sharp_at_one_and_loses_its_task_when_merged(tmp_path):
    torch.manual_seed(0)
    r = measure_minilm_effect(tmp_path)
    print(json.dumps(r, indent=1, default=str))
    # standalone: within a few points of the clean expert
    assert abs(r["trap2/standalone"] - r["clean/standalone"]) <= 0.03
    # scale curve: the clean expert's loss is flat around s = 1, the Trap² expert's is a sharp
    # minimum there (the lowest loss at |s - 1| >= 0.25 is several times the loss at s = 1)
    clean, trap = r["clean/sharpness"], r["trap2/sharpness"]
    assert clean["sharpness/off_to_nominal"] < 1.5
    assert trap["sharpness/s_argmin"] == 1.0
    assert trap["sharpness/off_to_nominal"] > 3.0
    # merged at the coefficient the attacker's search chose: the victim's accuracy drops below
    # what the clean expert keeps in the same merge
    assert (
        r["trap2/merged"]["accuracy/synthetic_sentiment"]
        < r["clean/merged"]["accuracy/synthetic_sentiment"]
    )
