"""Cost of WeightWatch monitoring: direction extraction (exact vs randomized SVD) and scoring overhead.

1. One ΔW the size of a 7B Llama down_proj (4096 × 11008, float32): a full thin SVD (what the
   released code runs) against the randomized range finder for k = 20, one run each; prints the
   seconds, the speed-up, and how far the randomized top-k subspace is from the exact one.
   The synthetic ΔW is a rank-64 signal with a 1/i spectrum plus a Gaussian bulk, a shape
   typical of fine-tuning updates; because σ_20 and σ_21 are close on such a spectrum the largest
   principal angle of the full top-20 is the pessimistic number, so the captured energy
   ``‖U_randᵀ ΔW‖²_F / ‖U_exactᵀ ΔW‖²_F`` and the error of the top-10 are printed too.
2. Monitoring overhead on a BERT-sized encoder (hidden 384, 6 layers, seq 64, batch 16): a plain
   forward pass against forward + ``output_hidden_states`` + cosine scoring of 40 directions per
   layer (k = 20 for each of the two writers), as a ratio of median times.

    python benchmarks/weightwatch_cost.py [--device cuda] [--repeats 20] [--threads 1] [--skip-svd]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
from transformers import BertConfig, BertModel

from mergesec.monitor import (
    direction_cosines,
    exact_left_singular,
    randomized_left_singular,
    subspace_sines,
    weight_directions,
)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def synthetic_delta(
    m: int, n: int, *, rank: int = 64, bulk: float = 0.02, seed: int = 0
) -> torch.Tensor:
    """Rank-``rank`` signal with σ_i = 1/i plus Gaussian noise whose top singular value is ≈ ``bulk``."""
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, rank, generator=g)).Q
    v = torch.linalg.qr(torch.randn(n, rank, generator=g)).Q
    sig = 1.0 / torch.arange(1, rank + 1, dtype=torch.float32)
    noise = torch.randn(m, n, generator=g) * (bulk / (m**0.5 + n**0.5))
    return (u * sig) @ v.T + noise


def bench_svd(device: str, k: int = 20) -> None:
    delta = synthetic_delta(4096, 11008).to(device)
    _sync(device)
    t0 = time.perf_counter()
    u_exact, s_exact = exact_left_singular(delta, k + 1)  # σ_{k+1} only for the gap below
    _sync(device)
    t_exact = time.perf_counter() - t0
    t0 = time.perf_counter()
    u_rand, s_rand = randomized_left_singular(delta, k, oversample=10, n_iter=4, seed=0)
    _sync(device)
    t_rand = time.perf_counter() - t0
    gap = (s_exact[k] / s_exact[k - 1]).item()
    u_exact, s_exact = u_exact[:, :k], s_exact[:k]

    sines = subspace_sines(u_rand.cpu(), u_exact.cpu())
    top10 = subspace_sines(u_rand[:, :10].cpu(), u_exact[:, :10].cpu()).max().item()
    energy = (u_rand.T @ delta).norm() ** 2 / (u_exact.T @ delta).norm() ** 2
    print(f"SVD of a 4096x11008 float32 ΔW on {device} (k={k}, oversample 10, 4 power iterations)")
    print(f"  exact thin SVD        {t_exact:8.2f} s")
    print(f"  randomized            {t_rand:8.2f} s")
    print(f"  speed-up              {t_exact / t_rand:8.1f}x")
    print(f"  gap σ_{k + 1}/σ_{k}          {gap:.3f}")
    print(
        f"  subspace error top-{k}  max sin θ = {sines.max().item():.2e}, mean sin θ = {sines.mean().item():.2e}"
    )
    print(f"  subspace error top-10  max sin θ = {top10:.2e}")
    print(f"  captured energy ratio  {energy.item():.6f}")
    print(f"  max rel. σ error       {((s_rand - s_exact).abs() / s_exact).max().item():.2e}")


def _median_times(
    fns: dict[str, Callable[[], None]], repeats: int, device: str
) -> dict[str, float]:
    """Median seconds per function, timed round-robin so load from other processes hits all alike."""
    for fn in fns.values():
        for _ in range(3):
            fn()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def bench_monitoring(device: str, repeats: int, k: int = 20) -> None:
    torch.manual_seed(0)
    cfg = BertConfig(
        hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536
    )
    model = BertModel(cfg).eval().to(device)
    tuned = copy.deepcopy(model)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(1e-3 * torch.randn_like(p))

    def writers(m: BertModel) -> dict[tuple[int, str], torch.Tensor]:
        return {
            (i, w): (
                layer.attention.output.dense if w == "attn_out" else layer.output.dense
            ).weight.detach()
            for i, layer in enumerate(m.encoder.layer)
            for w in ("attn_out", "mlp_out")
        }

    directions = weight_directions(writers(model), writers(tuned), k=k)
    ids = torch.randint(0, cfg.vocab_size, (16, 64), device=device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    @torch.no_grad()
    def plain() -> None:
        model(**batch)

    @torch.no_grad()
    def states_only() -> None:
        model(**batch, output_hidden_states=True)

    @torch.no_grad()
    def monitored() -> None:
        out = model(**batch, output_hidden_states=True)
        direction_cosines(out.hidden_states, directions, batch["attention_mask"])

    with torch.no_grad():
        states = model(**batch, output_hidden_states=True).hidden_states

    def scoring_only() -> None:
        direction_cosines(states, directions, batch["attention_mask"])

    t = _median_times(
        {"plain": plain, "states": states_only, "monitored": monitored, "scoring": scoring_only},
        repeats,
        device,
    )
    t_plain, t_states, t_mon = t["plain"], t["states"], t["monitored"]
    print(
        f"Monitoring overhead, BERT hidden 384 x 6 layers, batch 16 x seq 64, {len(directions)} directions, {device}"
    )
    print(f"  plain forward                      {1e3 * t_plain:8.2f} ms")
    print(
        f"  + output_hidden_states             {1e3 * t_states:8.2f} ms  ({t_states / t_plain:.3f}x)"
    )
    print(f"  + hidden states + cosine scoring   {1e3 * t_mon:8.2f} ms  ({t_mon / t_plain:.3f}x)")
    print(
        f"  cosine scoring alone               {1e3 * t['scoring']:8.2f} ms  "
        f"({t['scoring'] / t_plain:.3f} of a plain forward)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--skip-svd", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if not args.skip_svd:
        bench_svd(args.device)
    bench_monitoring(args.device, args.repeats)


if __name__ == "__main__":
    main()
