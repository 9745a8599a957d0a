"""Peak memory and time of streaming merges against whole-model merges.

Writes a synthetic base model and N experts (``--tensors`` float32 matrices of ``--dim`` x
``--dim`` each, ~100 MB per model by default) as safetensors in a temporary directory, then runs
each merge method in a fresh subprocess, once with ``stream_merge`` over ``LazyStateDict``s and
once (``--in-memory``, on by default) loading every model whole and calling ``merge_in_memory``.
A child's memory is its peak resident set size during the merge minus its resident set size after
imports and a warm-up merge of a tiny model, so interpreter, torch and allocator start-up are not
counted. On Linux the peak is the kernel's high-water mark (``VmHWM``, the value ``ru_maxrss``
reports for a live process), reset to the current size just before the merge through
``/proc/self/clear_refs``: a plain ``ru_maxrss`` would also include import-time transients and,
after ``vfork``/``exec``, the parent's own peak. Elsewhere it falls back to ``ru_maxrss``.

    python benchmarks/merge_memory.py                      # 4 experts x 24 x 1024^2 float32
    python benchmarks/merge_memory.py --tensors 48 --methods ties
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MB = 1024 * 1024


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _start_measuring() -> int:
    """Reset the peak-RSS mark to the current RSS where possible; return the baseline in KiB."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        rss = _status_kb("VmRSS")
        if rss is not None:
            return rss
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _peak_kb() -> int:
    hwm = _status_kb("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _child(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import torch

    from mergesec.core.registry import get_op
    from mergesec.merging.stream import merge_in_memory, stream_merge
    from mergesec.models.state_dict import LazyStateDict, load_state_dict, save_state_dict

    torch.set_num_threads(args.threads)
    op = get_op("merge", args.method).fn
    tiny = {"w": torch.randn(8, 8)}
    op(tiny, [{"w": tiny["w"] + 1}, {"w": tiny["w"] - 1}])  # warm up kernels and the allocator
    gc.collect()
    baseline_kb = _start_measuring()

    d = Path(args.dir)
    expert_paths = [d / f"expert{i}.safetensors" for i in range(args.experts)]
    out = d / f"merged-{args.method}-{args.mode}.safetensors"
    started = time.perf_counter()
    result = {}
    if args.mode == "stream":
        stats = stream_merge(
            op,
            LazyStateDict(d / "base.safetensors"),
            [LazyStateDict(p) for p in expert_paths],
            {},
            out,
        )
        result["peak_tensor_bytes"] = stats.peak_tensor_bytes
    else:
        base = load_state_dict(d / "base.safetensors")
        experts = [load_state_dict(p) for p in expert_paths]
        save_state_dict(merge_in_memory(op, base, experts, {}), out)
    result["seconds"] = time.perf_counter() - started
    peak_kb = _peak_kb()
    result.update(baseline_bytes=baseline_kb * 1024, peak_bytes=(peak_kb - baseline_kb) * 1024)
    print(json.dumps(result))


def _make_models(d: Path, n_experts: int, n_tensors: int, dim: int) -> None:
    import torch

    from mergesec.models.state_dict import save_state_dict

    gen = torch.Generator().manual_seed(0)
    base = {f"layers.{i}.weight": torch.randn(dim, dim, generator=gen) for i in range(n_tensors)}
    save_state_dict(base, d / "base.safetensors")
    for e in range(n_experts):
        expert = {k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in base.items()}
        save_state_dict(expert, d / f"expert{e}.safetensors")
        del expert


def _same_outputs(a: Path, b: Path) -> bool:
    import torch

    from mergesec.models.state_dict import LazyStateDict

    la, lb = LazyStateDict(a), LazyStateDict(b)
    return sorted(la) == sorted(lb) and all(torch.equal(la[k], lb[k]) for k in la)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--tensors", type=int, default=24)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--methods", nargs="+", default=["task_arithmetic", "ties"])
    p.add_argument("--threads", type=int, default=1, help="torch threads in each child")
    p.add_argument("--in-memory", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=["stream", "memory"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        _child(args)
        return

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    modes = ["stream", "memory"] if args.in_memory else ["stream"]
    with tempfile.TemporaryDirectory(prefix="merge-memory-") as tmp:
        d = Path(tmp)
        _make_models(d, args.experts, args.tensors, args.dim)
        sum_experts = sum(
            (d / f"expert{i}.safetensors").stat().st_size for i in range(args.experts)
        )
        largest = args.dim * args.dim * 4
        print(
            f"{args.experts} experts x {args.tensors} tensors of {args.dim}x{args.dim} float32: "
            f"{sum_experts / MB:.0f} MB of experts (+ {(d / 'base.safetensors').stat().st_size / MB:.0f}"
            f" MB base), largest tensor {largest / MB:.1f} MB, {args.threads} torch thread(s)\n"
        )
        header = f"{'method':<16}{'mode':<8}{'peak MB':>9}{'peak/experts':>14}{'peak/largest':>14}{'held MB':>9}{'seconds':>9}"
        print(header)
        print("-" * len(header))
        for method in args.methods:
            for mode in modes:
                cmd = [sys.executable, __file__, "--child", "--dir", tmp, "--method", method]
                cmd += [
                    "--mode",
                    mode,
                    "--experts",
                    str(args.experts),
                    "--threads",
                    str(args.threads),
                ]
                run = subprocess.run(cmd, capture_output=True, text=True, check=False)
                if run.returncode != 0:
                    print(run.stderr, file=sys.stderr)
                    raise SystemExit(f"{method}/{mode} failed")
                r = json.loads(run.stdout.strip().splitlines()[-1])
                held = r.get("peak_tensor_bytes")
                print(
                    f"{method:<16}{mode:<8}{r['peak_bytes'] / MB:>9.1f}"
                    f"{r['peak_bytes'] / sum_experts:>14.3f}{r['peak_bytes'] / largest:>14.2f}"
                    f"{(f'{held / MB:.1f}' if held else '-'):>9}{r['seconds']:>9.2f}"
                )
            if "memory" in modes:
                same = _same_outputs(
                    d / f"merged-{method}-stream.safetensors",
                    d / f"merged-{method}-memory.safetensors",
                )
                print(f"{'':<16}stream output == in-memory output: {same}")
        print(
            "\npeak MB: child's peak RSS during the merge minus its RSS after imports and warm-up; held MB: tensor "
            "bytes the streaming loop holds at once (inputs of one key + result)."
        )


if __name__ == "__main__":
    main()
