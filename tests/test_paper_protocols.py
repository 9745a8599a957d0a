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
