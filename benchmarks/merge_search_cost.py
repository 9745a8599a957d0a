"""Cost of a merge node's coefficient search against one merge plus its K evaluations.

    python benchmarks/merge_search_cost.py [--op ties] [--k 4] [--search-examples 100] [--old]

Builds two experts from ``--base`` (default the quickstart's ``builtin:minilm-l6``): the base plus
a small random update each, with a random head for ``builtin:synthetic_sentiment`` and ``builtin:synthetic_topic``.
Then, in one process, it times

- the baseline: the scorer set up and the experts' reference scores (what the node also does),
  one streamed merge, and K times (load a merged backbone, score it);
- the merge node searching K coefficients (``tasks/merge.py``), which must cost at most the
  baseline + 10 %;
- with ``--old``, the same node recomputing the whole merge for every candidate.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
DATASETS = ("synthetic_sentiment", "synthetic_topic")


def make_experts(base: str, root: Path) -> dict[str, Path]:
    import torch

    from mergesec.data import dataset_slug, load_dataset_splits
    from mergesec.models.artifact import HeadInfo, write_artifact
    from mergesec.models.hub import base_weights_file
    from mergesec.models.state_dict import load_state_dict

    sd = load_state_dict(base_weights_file(base))
    g = torch.Generator().manual_seed(0)
    hidden = next(v.shape[-1] for k, v in sd.items() if k.endswith("word_embeddings.weight"))
    dirs = {}
    for slug in DATASETS:
        uri = f"builtin:{slug}"
        labels = list(load_dataset_splits(uri).label_names)
        weights = {k: v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
                   for k, v in sd.items()}  # fmt: skip
        heads = {f"{slug}.weight": 0.1 * torch.randn(len(labels), hidden, generator=g),
                 f"{slug}.bias": torch.zeros(len(labels))}  # fmt: skip
        dirs[slug] = root / slug
        write_artifact(dirs[slug], base=base, backbone=weights, heads=heads,
                       head_info={dataset_slug(uri): HeadInfo(uri, labels)})  # fmt: skip
    return dirs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--base", default="builtin:minilm-l6")
    ap.add_argument("--op", default="ties")
    ap.add_argument("--k", type=int, default=4, help="coefficient candidates")
    ap.add_argument("--search-examples", type=int, default=100)
    ap.add_argument("--old", action="store_true", help="also time recomputing every candidate")
    ap.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="alternate baseline and node this many times; report the fastest of each",
    )
    args = ap.parse_args()

    import torch

    from mergesec.core.context import NodeContext
    from mergesec.core.registry import get_op, validate_params
    from mergesec.merging.stream import stream_merge
    from mergesec.models.artifact import ModelArtifact
    from mergesec.models.hub import base_weights_file, model_identity
    from mergesec.models.state_dict import LazyStateDict
    from mergesec.tasks import merge, merge_search
    from mergesec.tasks.merge_search import ValidationScorer

    coefs = [round(0.3 + 0.7 * i / max(args.k - 1, 1), 3) for i in range(args.k)]
    datasets = [{"uri": f"builtin:{s}"} for s in DATASETS]
    op = get_op("merge", args.op)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        experts = make_experts(args.base, root)
        arts = [ModelArtifact.open(d) for d in experts.values()]
        lazies = [a.backbone_lazy() for a in arts]
        base = LazyStateDict(base_weights_file(args.base))
        subsets = dict.fromkeys(DATASETS, args.search_examples)

        def forget() -> None:
            # every timed section starts without what an earlier one tokenised or scored
            merge._REFERENCE_MEMO.clear()
            merge_search._PREPARED.clear()

        def baseline() -> dict[str, float]:
            forget()
            t = {}
            start = time.perf_counter()
            scorer = ValidationScorer(args.base, datasets, subsets=subsets)
            for a, w in zip(arts, lazies, strict=True):
                scorer.load(w)
                scorer.accuracies(a.all_heads(), list(a.heads))
            t["setup + references"] = time.perf_counter() - start
            start = time.perf_counter()
            params = validate_params(op, {"coefficient": 1.0})
            stream_merge(op.fn, base, lazies, params, root / "one.safetensors")
            t["one merge"] = time.perf_counter() - start
            heads = {k: v for a in arts for k, v in a.all_heads().items()}
            start = time.perf_counter()
            for _ in coefs:
                scorer.load(LazyStateDict(root / "one.safetensors"))
                scorer.accuracies(heads, list(DATASETS))
            t[f"{args.k} evaluations"] = time.perf_counter() - start
            return t

        def node(name: str) -> float:
            out = root / name
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            params = {"base": args.base, "base_id": model_identity(args.base),
                      "datasets": datasets, "search_examples": args.search_examples,
                      "op": validate_params(op, {"coefficient": {"search": coefs}})}  # fmt: skip
            ctx = NodeContext("m", "merge", args.op, params,
                              {f"expert.{s}": d for s, d in experts.items()}, out)  # fmt: skip
            forget()
            start = time.perf_counter()
            merge.execute(ctx)
            return time.perf_counter() - start

        runs = []
        for _ in range(args.repeat):
            runs.append((baseline(), node("searched")))
        t = min((r[0] for r in runs), key=lambda x: sum(x.values()))
        baseline_s = sum(t.values())
        searched = min(r[1] for r in runs)
        old = None
        if args.old:
            merge.scale_trait = lambda _op: None  # the recompute-everything path
            old = node("old")
    n_params = sum(v.numel() for v in LazyStateDict(base_weights_file(args.base)).values())
    print(f"{args.op}, {n_params / 1e6:.1f}M parameters, 2 experts, K={args.k} coefficients "
          f"{coefs}, {args.search_examples} validation examples per dataset, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    for k, v in t.items():
        print(f"  baseline {k:22s} {v:7.2f} s")
    print(
        f"  baseline total                  {baseline_s:7.2f} s   (each run: "
        f"{', '.join(f'{sum(r[0].values()):.1f}' for r in runs)})"
    )
    print(
        f"  merge node, searched            {searched:7.2f} s   ratio {searched / baseline_s:.2f}"
        f"   (each run: {', '.join(f'{r[1]:.1f}' for r in runs)})"
    )
    if old is not None:
        print(f"  merge node, every candidate     {old:7.2f} s   ratio {old / baseline_s:.2f}")


if __name__ == "__main__":
    main()
