"""Time plain fine-tuning steps against Trap² steps, full and LoRA, on a small BERT-like model.

The model has MiniLM-L6's shape (hidden 384, 6 layers, 12 heads, vocab 30522) with random weights
and a 2-class head; batches are 16 random sequences of 64 tokens. Every configuration runs in the
same process on the same data, plain and Trap² steps alternating. Trap² runs two forward and two backward passes per step, so the
expected ratio is about 2×.

    python benchmarks/trap2_step_time.py [--device cuda] [--steps 20] [--bf16] [--json F] [--png F]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import BertConfig, BertModel

from mergesec.defenses.trap2 import base_params_of, trainable_parameters, trap2_step
from mergesec.models.functional import forward_with
from mergesec.plots import png_bytes, pyplot


class Classifier(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.bert = BertModel(cfg, add_pooling_layer=False)
        self.head = nn.Linear(cfg.hidden_size, 2)

    def forward(self, input_ids, attention_mask):
        h = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.head(h[:, 0])


def build(mode: str, device: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    cfg = BertConfig(
        hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
        vocab_size=30522,
    )  # fmt: skip
    model: nn.Module = Classifier(cfg)
    if mode == "lora":
        lora = LoraConfig(
            r=16, lora_alpha=16, lora_dropout=0.1, modules_to_save=["head"],
            target_modules=["query", "key", "value", "attention.output.dense"],
        )  # fmt: skip
        model = get_peft_model(model, lora)
    return model.to(device).train()


def make_forward_loss(model: nn.Module, bf16: bool):
    def forward_loss(overrides, batch):
        with torch.autocast(batch["input_ids"].device.type, torch.bfloat16, enabled=bf16):
            logits = forward_with(
                model,
                overrides,
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
            )
        return F.cross_entropy(logits.float(), batch["labels"])

    return forward_loss


def _step_fns(mode: str, args, batch) -> tuple[Callable[[], None], Callable[[], None], int]:
    """A plain and a Trap² step, each on its own copy of the same initial model."""
    fns = []
    for trap in (False, True):
        model = build(mode, args.device, seed=0)
        params = list(trainable_parameters(model).values())
        opt = torch.optim.AdamW(params, lr=1e-5 if mode == "full" else 3e-4)
        fl = make_forward_loss(model, args.bf16)
        if trap:
            base, gen = base_params_of(model, mode), torch.Generator().manual_seed(0)

            def step(model=model, opt=opt, fl=fl, base=base, gen=gen) -> None:
                trap2_step(model, opt, batch, fl, base, generator=gen, lam=0.01, mode=mode)
        else:

            def step(params=params, opt=opt, fl=fl) -> None:
                opt.zero_grad(set_to_none=True)
                fl(None, batch).backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()

        fns.append(step)
    return fns[0], fns[1], sum(p.numel() for p in params)


def bench(mode: str, args, batch) -> list[dict]:
    """Alternate plain and Trap² steps so that load drifts hit both alike."""
    plain, trap, n_params = _step_fns(mode, args, batch)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    times: dict[str, list[float]] = {"plain": [], "trap2": []}
    for i in range(args.warmup + args.steps):
        for name, fn in (("plain", plain), ("trap2", trap)):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            if i >= args.warmup:
                times[name].append((time.perf_counter() - t0) * 1e3)
    return [
        {
            "mode": mode,
            "method": name,
            "ms_median": statistics.median(ts),
            "ms_mean": statistics.fmean(ts),
            "trainable_params": n_params,
        }
        for name, ts in times.items()
    ]


def plot_step_times(rows: Sequence[Mapping[str, Any]]) -> bytes | None:
    """Bars of Trap² step time relative to a plain step, per mode (full, lora), from the rows of
    ``--json`` (``{"mode", "method", "ms_median"}``); ``None`` without a plain/Trap² pair."""
    by_mode: dict[str, dict[str, float]] = {}
    for r in rows:
        by_mode.setdefault(r["mode"], {})[r["method"]] = float(r["ms_median"])
    ratios = {
        m: t["trap2"] / t["plain"] for m, t in by_mode.items() if {"trap2", "plain"} <= set(t)
    }
    if not ratios:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4, 3))
    bars = ax.bar(list(ratios), list(ratios.values()), color="tab:orange")
    for b, (m, r) in zip(bars, ratios.items(), strict=True):
        ax.annotate(
            f"{r:.2f}× ({by_mode[m]['plain']:.0f}→{by_mode[m]['trap2']:.0f} ms)",
            (b.get_x() + b.get_width() / 2, r), ha="center", va="bottom", fontsize=7,
        )  # fmt: skip
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.axhline(2.0, color="grey", linestyle="--", linewidth=0.8)
    ax.set_ylabel("Trap² step time / plain step time")
    ax.set_ylim(0, max(2.5, max(ratios.values()) * 1.2))
    ax.set_title("Cost of a Trap² step", fontsize=9)
    return png_bytes(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast for the forward passes")
    ap.add_argument("--json", default="", help="also write the results to this file")
    ap.add_argument("--png", default="", help="also draw the step-time ratios into this PNG")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 30522, (args.batch, args.seq), generator=g)
    batch = {
        "input_ids": ids.to(args.device),
        "attention_mask": torch.ones_like(ids).to(args.device),
        "labels": torch.randint(0, 2, (args.batch,), generator=g).to(args.device),
    }
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"device {name}, threads {torch.get_num_threads()}, batch {args.batch}x{args.seq}, "
          f"bf16 {args.bf16}, {args.steps} timed steps after {args.warmup} warm-up")  # fmt: skip
    rows = []
    for mode in ("full", "lora"):
        plain, trap = bench(mode, args, batch)
        ratio = trap["ms_median"] / plain["ms_median"]
        rows += [plain, trap]
        print(
            f"{mode:5s} trainable {plain['trainable_params']:>10,d}  plain {plain['ms_median']:8.1f}"
            f" ms/step  trap2 {trap['ms_median']:8.1f} ms/step  ratio {ratio:.2f}x"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "args": vars(args), "rows": rows}, f, indent=2)
    if args.png:
        png = plot_step_times(rows)
        if png is not None:
            with open(args.png, "wb") as f:
                f.write(png)


if __name__ == "__main__":
    main()
