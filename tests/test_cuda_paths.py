"""The CUDA paths: every step of each task kind, and AGA, on a GPU against the same run on the CPU.

Skipped without a CUDA device (CI has none). On a GPU the forward passes run under bfloat16
autocast, so the comparison is by tolerance, not bit for bit.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_aga import setup
from test_golden import Steps, fingerprint, floats
from test_lm_pipeline import make_tiny_llama
from test_vision_pipeline import make_tiny_clip

from mergesec.attacks.aga import attack_aga
from mergesec.core.context import NodeContext, pick_device
from mergesec.defenses.params import protect_params
from mergesec.defenses.trap2 import EPOCH_SCHEDULE
from mergesec.orchestrator.runner import executor_for

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class DeviceSteps(Steps):
    def __init__(self, root: Path, base: Path, device: str):
        super().__init__(root, base)
        self.device = device

    def run(self, step: str, op: str, params: dict, inputs: dict, name: str) -> dict:
        out = self.root / name
        out.mkdir(parents=True)
        ctx = NodeContext(name, step, op, self.base | params,
                          {k: self.root / v for k, v in inputs.items()}, out,
                          device=self.device)  # fmt: skip
        return executor_for(step, op)(ctx)


def run_steps(steps: Steps, a: dict, b: dict, ft: dict, lora: dict | None) -> dict[str, dict]:
    """Metrics and weight fingerprints of each step, keyed like the goldens."""
    res: dict[str, dict] = {}

    def rec(key: str, metrics: dict, node: str | None = None) -> None:
        res[key] = floats(metrics) | (fingerprint(steps.root / node) if node else {})

    rec("finetune/full", steps.finetune(a, "a", "full", **ft), "a")
    rec("finetune/full-b", steps.finetune(b, "b", "full", **ft), "b")
    if lora is not None:
        rec("finetune/lora", steps.finetune(a, "a-lora", "lora", **lora), "a-lora")
    trap = steps.trap2(a, "trap2", ft, lam=0.2, patience=2, weight_decay=0.01, **EPOCH_SCHEDULE)
    rec("protect/trap2", trap, "trap2")
    rec("evaluate/accuracy", steps.evaluate([a], "a", "eval-a"))
    rec("evaluate/scale_curve", steps.scale_curve(a, "trap2", "curve"))
    rec("merge/task_arithmetic", steps.merge([a, b], {"x": "a", "y": "b"}, "merged"), "merged")
    rec("attack/finetune_after_merge", steps.after_merge(a, [a, b], "merged", "sft"), "sft")
    return res


def assert_close(cpu: dict[str, dict], gpu: dict[str, dict]) -> None:
    assert cpu.keys() == gpu.keys()
    for key in cpu:
        for name, c in cpu[key].items():
            g = gpu[key].get(name)
            assert g is not None, (key, name)
            if "accuracy" in name:
                assert abs(g - c) <= 0.1, (key, name, c, g)
            elif name.endswith("_ss") and c > 1e-8:
                assert abs(g - c) / c <= 0.25, (key, name, c, g)


def both(tmp_path: Path, base: Path, *args) -> tuple[dict, dict]:
    torch.cuda.reset_peak_memory_stats()
    cpu = run_steps(DeviceSteps(tmp_path / "cpu", base, "cpu"), *args)
    assert torch.cuda.max_memory_allocated() == 0, "the CPU run touched the GPU"
    gpu = run_steps(DeviceSteps(tmp_path / "cuda", base, "cuda"), *args)
    assert torch.cuda.max_memory_allocated() > 0, "the CUDA run never used the GPU"
    return cpu, gpu


def test_pick_device_uses_a_visible_gpu_only_when_given_one():
    assert pick_device(1.0) == "cuda" and pick_device(0.0) == "cpu"


def test_text_steps_on_cuda_match_cpu(tmp_path, tiny_bert):
    ft = {"epochs": 1, "lr": 1e-3, "batch_size": 64, "max_length": 24, "seed": 0}
    lora = {"epochs": 1, "lr": 1e-2, "batch_size": 64, "max_length": 24, "seed": 0, "r": 4}
    a, b = {"uri": "builtin:synthetic_sentiment"}, {"uri": "builtin:synthetic_topic"}
    assert_close(*both(tmp_path, tiny_bert, a, b, ft, lora))


def test_image_steps_on_cuda_match_cpu(tmp_path):
    clip = make_tiny_clip(tmp_path / "clip")
    ft = {"epochs": 1, "lr": 2e-3, "seed": 0}
    lora = {"epochs": 1, "lr": 1e-2, "seed": 0, "r": 4}
    a, b = {"uri": "builtin:synthetic_colors"}, {"uri": "builtin:synthetic_shapes"}
    assert_close(*both(tmp_path, clip, a, b, ft, lora))


def test_qa_lora_on_cuda_matches_cpu(tmp_path):
    llama = make_tiny_llama(tmp_path / "llama")
    lora = {"epochs": 1, "lr": 5e-3, "batch_size": 16, "seed": 0, "r": 4}
    res = {}
    for device in ("cpu", "cuda"):
        steps = DeviceSteps(tmp_path / device, llama, device)
        a = {"uri": "builtin:synthetic_arithmetic"}
        ft = floats(steps.finetune(a, "a-lora", "lora", **lora))
        res[device] = ft | floats(steps.evaluate([a], "a-lora", "eval"))
    for name, c in res["cpu"].items():
        if "accuracy" in name:
            assert abs(res["cuda"][name] - c) <= 0.1, (name, c, res["cuda"][name])


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_aga_on_cuda_matches_cpu(name):
    _, base, expert, layout, _ = setup(name)
    release = protect_params(expert, base, layout, scaling="nonsymmetric", permute_heads=True)
    cpu = attack_aga(release, base, layout, device="cpu")
    gpu = attack_aga(release, base, layout, device="cuda")
    for k, v in cpu.items():
        g = gpu[k].cpu()
        assert g.dtype == v.dtype and g.shape == v.shape, k
        # float64 solves on both devices; the Hungarian matching runs on the CPU for both
        assert (g.double() - v.double()).abs().max() <= 1e-5 * (1 + v.double().abs().max()), k
