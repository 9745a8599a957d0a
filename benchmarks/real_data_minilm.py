"""MiniLM expert test accuracy on every real builtin text dataset, next to the TF-IDF baseline.

Each expert is ``builtin:minilm-l6`` fine-tuned in full through the ``finetune/full`` op (the
quickstart's settings: lr 1e-4, batch 32, 64 tokens, warm-up 10%) on a seeded subset of
``--train`` training examples for ``--epochs`` epochs, early-stopped on ``--val`` validation
examples, and scored on ``--test`` seeded test examples. Subsets keep CPU runs short; ``0``
means the whole split. The TF-IDF baseline (``real_data_baselines.py``) trains on the whole
train split and is scored on the whole test split.

    python benchmarks/real_data_minilm.py
    python benchmarks/real_data_minilm.py --datasets rotten_tomatoes bbc_news --train 0 --test 0
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch

from mergesec.data import load_dataset_splits
from mergesec.data.real import REAL_DATASETS
from mergesec.kinds import get_kind
from mergesec.tasks.finetune import finetune_full
from mergesec.training.sampling import fixed_subset

BASE = "builtin:minilm-l6"
# real_data_baselines.py on the whole splits (TF-IDF word 1-2-grams + logistic regression).
TFIDF = {
    "rotten_tomatoes": 0.774, "20newsgroups": 0.846, "reuters_r8": 0.967, "reuters_r52": 0.911,
    "election_tweets": 0.924, "bbc_news": 0.974, "vader_tweets": 0.849, "vader_amazon": 0.750,
    "vader_nyt": 0.656,
}  # fmt: skip


def expert_accuracy(
    name: str, n_train: int, n_val: int, n_test: int, epochs: int, max_length: int
) -> tuple[float, int, int]:
    """(test accuracy, training examples used, test examples scored) of one MiniLM expert."""
    d = load_dataset_splits(f"builtin:{name}")

    def cap(split, n):
        return tuple(fixed_subset(split, n or None, seed=0))

    data = replace(
        d,
        train=cap(d.train, n_train),
        validation=cap(d.validation, n_val),
        test=cap(d.test, n_test),
    )
    kind = get_kind("text")
    task = kind.build(BASE, data, seed=0, max_length=max_length)
    finetune_full(task, data, epochs=epochs, lr=1e-4, batch_size=32, max_length=max_length, seed=0)
    _, acc = task.score(data.test, batch_size=64)
    return acc, len(data.train), len(data.test)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="*", default=sorted(REAL_DATASETS))
    ap.add_argument("--train", type=int, default=1000, help="training examples (0: all)")
    ap.add_argument("--val", type=int, default=200, help="validation examples (0: all)")
    ap.add_argument("--test", type=int, default=500, help="test examples (0: all)")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{'dataset':18} {'train':>6} {'test':>5} {'minilm':>7} {'tfidf':>6} {'seconds':>8}")
    for name in args.datasets:
        start = time.perf_counter()
        acc, n_train, n_test = expert_accuracy(
            name, args.train, args.val, args.test, args.epochs, args.max_length
        )
        secs = time.perf_counter() - start
        tfidf = TFIDF.get(name, float("nan"))
        print(f"{name:18} {n_train:6d} {n_test:5d} {acc:7.3f} {tfidf:6.3f} {secs:8.1f}", flush=True)


if __name__ == "__main__":
    main()
