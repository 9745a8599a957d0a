"""The paper studies run the released protocols; mergesec's extensions are separate scenarios.

Also: AGA in its released mode (independent least-squares solves, no head matching) recovers
experts protected by the released PaRaMS draws on every family.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from test_aga import ATTN, FAMILIES, setup

from mergesec.attacks.aga import attack_aga, mlp_match_fraction, recovery_diagnostics
from mergesec.core.registry import get_op, validate_params
from mergesec.defenses.params import protect_params

PAPER = Path(__file__).resolve().parents[1] / "conf" / "paper"
RELEASED_AGA = {"solve_derived": False, "match_heads": False}


def scenarios(name: str) -> dict:
    return yaml.safe_load((PAPER / name).read_text())["scenarios"]


def test_the_aga_study_runs_the_released_attack_and_names_the_extensions():
    found = {"released": 0, "extension": 0}
    for name, sc in scenarios("aga_clip_vitb32.yaml").items():
        if (sc.get("protect") or {}).get("op") == "params":
            assert sc["protect"]["scaling"] == "nonsymmetric_released", name
        attack = sc.get("attack")
        if not attack:
            continue
        params = validate_params(
            get_op("attack", "aga"), {k: v for k, v in attack.items() if k != "op"}
        )
        if name.split("+")[-1].startswith("ext-"):
            found["extension"] += 1
            assert params["solve_derived"], name
        else:
            found["released"] += 1
            assert {k: params[k] for k in RELEASED_AGA} == RELEASED_AGA, name
    assert found["released"] >= 2 and found["extension"] >= 1


@pytest.mark.parametrize("study", ["trap2_clip_vitb32_lora.yaml", "trap2_clip_vitb32_full.yaml"])
def test_the_trap2_studies_use_the_released_merges_and_schedule(study):
    doc = yaml.safe_load((PAPER / study).read_text())
    ops = {m["op"] for m in doc["merge"]["grid"]}
    assert {"tsv_released", "cart_released", "dare_ties_released", "regmean_released"} <= ops
    assert not ops & {"tsv", "cart", "dare_ties", "regmean"}
    op = get_op("protect", "trap2")
    for name, sc in doc["scenarios"].items():
        protect = sc.get("protect")
        if protect:  # no schedule override: the released defaults apply
            params = validate_params(op, {k: v for k, v in protect.items() if k != "op"})
            assert params["max_steps"] == 100_000 and params["eval_every"] == 2000, name


@pytest.mark.parametrize("scaling", ["nonsymmetric_released", "symmetric"])
@pytest.mark.parametrize("name", FAMILIES)
def test_released_aga_recovers_released_params_releases(name: str, scaling: str) -> None:
    _, base, expert, layout, _ = setup(name)
    release = protect_params(expert, base, layout, scaling=scaling)
    assert recovery_diagnostics(release, expert, base, layout)["cos/all"] < 0.1
    recovered = attack_aga(release, base, layout, **RELEASED_AGA)
    assert mlp_match_fraction(recovered, expert, layout) == 1.0
    diag = recovery_diagnostics(recovered, expert, base, layout)
    assert diag["cos/all"] >= 0.9, diag
    for part in ATTN:
        assert diag[f"cos/{part}"] >= 0.85, (part, diag)
    assert torch.isfinite(torch.tensor([diag[f"rel_err/{p}"] for p in ATTN])).all()


def test_the_llm_trap2_study_uses_the_released_llm_schedule():
    doc = yaml.safe_load((PAPER / "trap2_llama_math.yaml").read_text())
    assert doc["base"] == "hf:meta-llama/Llama-3.1-8B"
    assert doc["datasets"] == ["hf:openai/gsm8k/main", "hf:EleutherAI/asdiv"]
    ft = doc["finetune"]
    assert (ft["mode"], ft["r"], ft["alpha"], ft["lr"], ft["batch_size"]) == (
        "lora",
        32,
        32,
        1e-4,
        4,
    )
    assert ft["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    protect = doc["scenarios"]["trap2"]["protect"]
    params = validate_params(
        get_op("protect", "trap2"), {k: v for k, v in protect.items() if k != "op"}
    )
    released = {
        "lam": 0.01, "weight": "inv_sqrt", "max_steps": 100_000, "lr_schedule": "linear",
        "warmup_steps": 2000, "eval_every": 500, "patience": 10, "betas": (0.9, 0.999),
        "eps": 1e-8, "weight_decay": 0.01, "clip_norm": 1.0,
    }  # fmt: skip
    assert {k: params[k] for k in released} == released
    assert doc["merge"] == {"op": "task_arithmetic", "search": "released"}


def test_the_text_trap2_study_covers_every_operator_and_space_with_the_released_search():
    from mergesec.orchestrator.plan import build_plan
    from mergesec.orchestrator.spec import load_study

    path = PAPER.parent / "trap2_text.yaml"
    doc = yaml.safe_load(path.read_text())
    grid = doc["merge"]["grid"]
    data_free = {"task_arithmetic", "ties", "dare_ties_released", "tsv_released", "cart_released"}
    pairs = {(m["op"], m.get("space", "full")) for m in grid}
    assert pairs >= {(op, sp) for op in data_free for sp in ("full", "knots", "core")}
    assert ("regmean_released", "full") in pairs
    assert all(m.get("search") == "released" for m in grid if m["op"] in data_free)
    assert doc["victims"] == "all" and doc["references"] == ["left_out"]
    assert doc["finetune"]["mode"] == "lora" and doc["diagnostics"]["scale_curve"]
    plan = build_plan(load_study(path))
    protects = [n for n in plan.nodes.values() if n.op == "trap2"]
    trapped = [n for n in protects if n.params["op"]["lam"] > 0]
    baseline = [n for n in protects if n.params["op"]["lam"] == 0]
    assert len(trapped) == len(baseline) == len(doc["datasets"])  # every victim once each
    # the clean baseline differs from the release in λ only
    same = {n.params["dataset"]["uri"]: n for n in baseline}
    for n in trapped:
        twin = same[n.params["dataset"]["uri"]]
        assert {k: v for k, v in n.params["op"].items() if k != "lam"} == {
            k: v for k, v in twin.params["op"].items() if k != "lam"
        }
    merges = {
        (n.op, n.params.get("space", "full")) for n in plan.nodes.values() if n.step == "merge"
    }
    assert merges >= pairs
