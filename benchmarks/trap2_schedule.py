"""How Trap²'s sharpness along the scaling direction grows with training steps, on real data.

    python benchmarks/trap2_schedule.py [--dataset builtin:rotten_tomatoes] [--mode full]
        [--lam 0.005] [--lr 1e-4] [--length-pool 8] [--steps 1200] [--every 150] [--json F]

Trains the ``protect/trap2`` op from the base (``builtin:minilm-l6``) on a fixed stratified subset
of a real dataset (360/40/80 by default, as in the quickstart) at a constant learning rate, and
every ``--every`` optimizer steps sweeps the update's scale s on the validation split and on the
training split (W₀ + s·ΔW; for LoRA every B scaled by s). The baseline in the same run is the same
op with λ = 0 (a plain fine-tune with the same batches, schedule and optimiser). The two arms run
one after the other, one thread each unless ``--threads`` says otherwise.

It answers one question: after how many steps of the released objective does the update become
brittle under rescaling (accuracy near chance at s = 0.5 and s = 1.5–2 while s = 1 keeps the
expert's accuracy), and does a plain fine-tune of the same length do the same (overfitting
alone)?
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
SCALES = (0.0, 0.25, 0.5, 1.0, 1.5, 2.0)


def run_arm(args: argparse.Namespace, lam: float) -> list[dict[str, Any]]:
    from mergesec.core.registry import get_op, validate_params
    from mergesec.defenses.scale_curve import scale_curve
    from mergesec.defenses.trap2 import backbone_snapshot
    from mergesec.kinds import build_options, kind_of

    dataset = {"uri": args.dataset, "examples": {"train": args.train, "validation": 40, "test": 80}}
    kind = kind_of([dataset])
    data = kind.load(dataset)
    finetune = validate_params(
        get_op("finetune", args.mode),
        {"lr": args.lr, "batch_size": args.batch_size, "seed": 0, "length_pool": args.length_pool}
        | ({"r": 8, "alpha": 16, "dropout": 0.1} if args.mode == "lora" else {}),
    )
    finetune["mode"] = args.mode  # as a study's finetune block carries it
    task = kind.build(args.base, data, seed=0, **build_options(kind, finetune))
    reference = None
    if args.mode == "full":
        reference = backbone_snapshot(task)  # W₀, named as the model's parameters
    prepared = {split: task.prepare(getattr(data, split), 64) for split in ("validation", "train")}
    points: list[dict[str, Any]] = []
    start, sweeps = time.perf_counter(), [0.0]  # sweeps: seconds spent sweeping, not training
    last = {"train/loss": float("nan"), "train/scaled_loss": float("nan")}

    def report(metrics: dict[str, float], step: int) -> None:
        last.update({k: v for k, v in metrics.items() if k in last})
        if step % args.every or "train/loss" not in metrics:
            return
        t0 = time.perf_counter()
        elapsed = t0 - start - sweeps[0]
        row: dict[str, Any] = {"lam": lam, "step": step, "train_s": round(elapsed, 1)} | last
        for split, batches in prepared.items():
            curve = scale_curve(
                task.model, reference, lambda o, b=batches: task.score_batches(b, o),
                list(SCALES), mode=args.mode,
            )  # fmt: skip
            row[split] = {p["s"]: round(p["accuracy"], 3) for p in curve}
            row[f"{split}_loss"] = {p["s"]: round(p["loss"], 3) for p in curve}
        points.append(row)
        print(_line(row), flush=True)
        sweeps[0] += time.perf_counter() - t0

    get_op("protect", "trap2").fn(
        task, data, finetune, report=report, lam=lam,
        max_steps=args.steps, eval_every=args.steps, lr_schedule="constant", warmup_steps=0,
    )  # fmt: skip
    return points


def _line(row: dict[str, Any]) -> str:
    def fmt(curve: dict[float, float]) -> str:
        return " ".join(f"{curve[s]:.2f}" for s in SCALES)

    return (
        f"λ={row['lam']:<6} step {row['step']:5d} ({row['train_s']:6.0f} s)  "
        f"train loss {row['train/loss']:.3f} scaled {row['train/scaled_loss']:.3f}  "
        f"acc at s={'/'.join(str(s) for s in SCALES)}: val {fmt(row['validation'])}  "
        f"train {fmt(row['train'])}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--base", default="builtin:minilm-l6")
    ap.add_argument("--dataset", default="builtin:rotten_tomatoes")
    ap.add_argument("--train", type=int, default=360, help="training examples (stratified)")
    ap.add_argument("--mode", choices=["full", "lora"], default="full")
    ap.add_argument("--lam", type=float, default=0.005)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument(
        "--length-pool", type=int, default=None,
        help="batch texts of similar length within runs of this many batches (finetune length_pool)",
    )  # fmt: skip
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--every", type=int, default=150)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--arms", default="trap2,plain", help="trap2, plain or both")
    ap.add_argument("--json", help="write every sweep here")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    print(
        f"{args.dataset} ({args.train} training examples), {args.base} {args.mode}, lr {args.lr} "
        f"constant, batch {args.batch_size}, length pool {args.length_pool}, {args.steps} steps, "
        f"sweep every {args.every}; "
        f"accuracy at s = {', '.join(map(str, SCALES))}",
        flush=True,
    )
    rows: list[dict[str, Any]] = []
    for arm in args.arms.split(","):
        rows += run_arm(args, args.lam if arm == "trap2" else 0.0)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
