"""One AdamW step over all-MiniLM-L6-v2's 22.7M parameters: the fused kernel that the training
loop uses (``training.loop.fused_adamw_ok``) against torch's per-tensor and foreach kernels.

    python benchmarks/adamw_step_time.py [--device cuda] [--threads 1] [--steps 20]

The parameters have MiniLM-L6's shapes (30522×384 word embeddings, six layers of 384/1536
projections, biases and norms) with random gradients; every kernel runs on its own copy of the
same tensors in the same process, and the final weights are compared.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

KERNELS = {"per-tensor": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def minilm_shapes() -> list[tuple[int, ...]]:
    layer = [(384, 384), (384,)] * 4 + [(1536, 384), (1536,), (384, 1536), (384,)] + [(384,)] * 4
    return [(30522, 384), (512, 384), (2, 384), (384,), (384,)] + layer * 6


def time_kernel(kw: dict, args: argparse.Namespace) -> tuple[float, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    params = [
        torch.nn.Parameter(torch.randn(s, generator=g).to(args.device)) for s in minilm_shapes()
    ]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(args.device)
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.98), eps=1e-6, **kw)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    times = []
    for i in range(args.warmup + args.steps):
        sync()
        t0 = time.perf_counter()
        opt.step()
        sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times), [p.detach().cpu() for p in params]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    n = sum(torch.Size(s).numel() for s in minilm_shapes())
    print(f"AdamW step, {n / 1e6:.1f}M parameters, {args.device}, {args.threads} thread(s)")
    results = {name: time_kernel(kw, args) for name, kw in KERNELS.items()}
    base_s, base_w = results["per-tensor"]
    for name, (s, w) in results.items():
        err = max(
            float((a - b).abs().max() / b.abs().max()) for a, b in zip(w, base_w, strict=True)
        )
        print(
            f"  {name:10s} {s * 1e3:8.1f} ms/step  {base_s / s:5.2f}x per-tensor  "
            f"max rel. difference in the weights {err:.1e}"
        )


if __name__ == "__main__":
    main()
