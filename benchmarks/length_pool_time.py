"""Training batches grouped by length (the finetune setting ``length_pool``) against plain shuffled
batches: padded tokens and wall time of the same training run on real text.

    python benchmarks/length_pool_time.py [--datasets builtin:rotten_tomatoes,...] [--pool 8]
        [--epochs 1] [--batch-size 16] [--threads 1] [--device cpu] [--trap2]

For each dataset (a fixed stratified subset, 360 training examples by default, as in the
quickstart) the bundled all-MiniLM-L6-v2 is fine-tuned with ``training.loop.fit`` twice in the
same process, once on plain shuffled batches and once with ``length_pool``; the two runs see the
same examples per epoch, in other batches. ``--trap2`` times the ``protect/trap2`` step (two
forward and backward passes per batch) instead of the plain one. Printed per dataset: the share
of padding in the batches each order builds, the training time of each run, the ratio, and the
validation accuracy each run ends with (they differ: other batches, other weights).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def padding_share(task, split, batch_size: int, pool: int | None, epochs: int) -> float:
    real = padded = 0
    for epoch in range(epochs):
        for b in task.batches(split, batch_size, shuffle_seed=epoch, length_pool=pool):
            real += int(b["attention_mask"].sum())
            padded += b["attention_mask"].numel()
    return 1 - real / padded


def train_once(args: argparse.Namespace, uri: str, pool: int | None) -> dict[str, float]:
    from mergesec.core.registry import get_op, validate_params
    from mergesec.kinds import build_options, kind_of
    from mergesec.training.loop import fit, fit_config

    dataset = {"uri": uri, "examples": {"train": args.train, "validation": 40, "test": 80}}
    kind = kind_of([dataset])
    data = kind.load(dataset)
    settings = {"epochs": args.epochs, "lr": 1e-4, "batch_size": args.batch_size, "seed": 0}
    finetune = validate_params(get_op("finetune", "full"), settings | {"length_pool": pool})
    task = kind.build(args.base, data, seed=0, device=args.device, **build_options(kind, finetune))
    share = padding_share(task, data.train, args.batch_size, pool, args.epochs)
    t0 = time.perf_counter()
    if args.trap2:
        finetune["mode"] = "full"
        m = get_op("protect", "trap2").fn(
            task, data, finetune, device=args.device, lam=0.05,
            max_steps=None, eval_every=None, lr_schedule="linear", warmup_steps=None,
        )  # fmt: skip
    else:
        cfg = fit_config(finetune, eval_batch_size=task.eval_batch_size)
        m = fit(task, data.train, data.validation, cfg, device=args.device,
                precision=task.precision)  # fmt: skip
    return {"padding": share, "seconds": time.perf_counter() - t0, "val": m["val_accuracy"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--base", default="builtin:minilm-l6")
    ap.add_argument(
        "--datasets",
        default="builtin:rotten_tomatoes,builtin:election_tweets,builtin:reuters_r8,builtin:bbc_news",
    )
    ap.add_argument("--train", type=int, default=360)
    ap.add_argument("--pool", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--trap2", action="store_true", help="time the Trap² step (lam 0.05)")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    step = "Trap²" if args.trap2 else "plain"
    print(
        f"{step} training, {args.epochs} epoch(s) of {args.train} examples, batch {args.batch_size}, "
        f"{args.device}, {args.threads} thread(s); length_pool {args.pool} vs plain shuffled batches"
    )
    print(f"{'dataset':28} {'padding plain':>13} {'grouped':>8} {'plain s':>8} {'grouped s':>9} "
          f"{'ratio':>6} {'val plain':>9} {'grouped':>8}")  # fmt: skip
    for uri in args.datasets.split(","):
        plain = train_once(args, uri, None)
        grouped = train_once(args, uri, args.pool)
        print(
            f"{uri:28} {plain['padding']:13.1%} {grouped['padding']:8.1%} "
            f"{plain['seconds']:8.1f} {grouped['seconds']:9.1f} "
            f"{grouped['seconds'] / plain['seconds']:6.2f} {plain['val']:9.3f} {grouped['val']:8.3f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
