"""mergesec's streamed merges against mergekit's, on the same HF-format llama-style experts.

    python benchmarks/merge_vs_mergekit.py                 # 4 experts of ~134M parameters
    python benchmarks/merge_vs_mergekit.py --large         # 4 experts of ~1.1B parameters
    python benchmarks/merge_vs_mergekit.py --mergekit-venv DIR   # reuse an environment

Writes a base model and ``--experts`` experts (base + a small random update) from a
``LlamaConfig``, as ``config.json`` plus one safetensors file each, tensor by tensor. Installs
mergekit with pip into its own virtual environment in the temporary directory (reusing this
interpreter's packages where they fit) unless ``--mergekit-venv`` names one; if it cannot be
installed, the mergekit rows are skipped with one message. Then, for task arithmetic (weights 1,
no normalisation) and TIES (density ``--density``, weights 1, disjoint mean), each tool merges
in a fresh process with the inputs evicted from the page cache first; the table gives wall time
(interpreter start-up included) and peak RSS (``wait4``), and compares the outputs tensor by
tensor. The I/O limit is the bytes read (base + experts) and written (the merge) at the read and
write bandwidth of the same disk, measured in the same run on a file of one model's size; for
TIES the limit is the larger of that and its compute limit (``ties_compute_limit``). mergesec's
child also prints its merge time without interpreter start-up and imports, the figure the limit
bounds.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SIZES = {
    "small": {"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 12,
              "num_attention_heads": 12, "num_key_value_heads": 12},
    "large": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
              "num_attention_heads": 32, "num_key_value_heads": 4},
}  # fmt: skip
GB = 1e9


def evict(path: Path) -> None:
    """Drop a file's clean pages from the page cache, so the next read comes from the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def build_models(root: Path, size: str, n: int) -> tuple[Path, list[Path], int]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from mergesec.merging.stream import TensorSpec, write_stream

    cfg = LlamaConfig(vocab_size=32000, max_position_embeddings=2048, **SIZES[size])
    cfg.architectures = ["LlamaForCausalLM"]
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in LlamaForCausalLM(cfg).state_dict().items()}
    specs = {k: TensorSpec(torch.float32, s) for k, s in shapes.items()}

    def tensors(expert: int):
        for i, (k, s) in enumerate(shapes.items()):
            g = torch.Generator().manual_seed(i)
            t = torch.ones(s) if k.endswith("norm.weight") else 0.02 * torch.randn(s, generator=g)
            if expert:
                g.manual_seed(1000 * expert + i)
                t += 0.002 * torch.randn(s, generator=g)
            yield k, t

    dirs = []
    for e in range(n + 1):
        d = root / f"{size}-{'base' if e == 0 else f'expert{e}'}"
        dirs.append(d)
        if (d / "model.safetensors").exists():
            continue  # kept from an earlier run with --dir
        d.mkdir(exist_ok=True)
        cfg.save_pretrained(d)
        write_stream(specs, tensors(e), d / "model.safetensors", metadata={"format": "pt"})
    return dirs[0], dirs[1:], sum(_numel(s) for s in shapes.values())


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def disk_bandwidth(root: Path, nbytes: int) -> tuple[float, float]:
    """(read, write) bytes per second of ``root``'s disk: a buffered write of ``nbytes`` with its
    fsync, then an uncached read of it."""
    path = root / "bandwidth.bin"
    block = os.urandom(1 << 24)
    start = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(max(1, nbytes // len(block))):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    write = path.stat().st_size / (time.perf_counter() - start)
    evict(path)
    start = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.read(1 << 24):
            pass
    read = path.stat().st_size / (time.perf_counter() - start)
    path.unlink()
    return read, write


def ties_compute_limit(n_params: int, n_experts: int, density: float) -> float:
    """Seconds TIES needs for its own work at the per-element cost measured here: a top-k
    selection of each expert's task vector and the sign election with the disjoint mean over the
    experts, timed on one thread (best of 3) and spread over every core."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    n = 1 << 22
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, generator=g)
    xs = torch.randn(n_experts, n, generator=g)
    trim = elect = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        torch.topk(x.abs(), max(1, int(density * n)), sorted=False)
        trim = min(trim, (time.perf_counter() - start) / n)
        start = time.perf_counter()
        sign = xs.sum(0).sign()
        agree = xs.sign() == sign
        (xs * agree).sum(0) / agree.sum(0).clamp(min=1)
        elect = min(elect, (time.perf_counter() - start) / xs.numel())
    torch.set_num_threads(threads)
    return n_experts * n_params * (trim + elect) / (os.cpu_count() or 1)


def run_timed(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float, str]:
    """Wall seconds, peak RSS (bytes) and output of a child process."""
    start = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert p.stdout is not None
    out = p.stdout.read()
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if p.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({p.returncode}):\n{out.decode()[-2000:]}")
    return wall, usage.ru_maxrss * 1024, out.decode(errors="replace")


def child_mergesec(method: str, base: str, experts: list[str], out: str, density: float) -> None:
    from mergesec.core.registry import get_op
    from mergesec.merging.stream import stream_merge
    from mergesec.models.state_dict import LazyStateDict

    op = get_op("merge", method)
    params = {"coefficient": 1.0} | ({"k": density} if method == "ties" else {})
    Path(out).mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    stream_merge(op.fn, LazyStateDict(Path(base) / "model.safetensors"),
                 [LazyStateDict(Path(e) / "model.safetensors") for e in experts], params,
                 Path(out) / "model.safetensors")  # fmt: skip
    # the merge alone, after the interpreter and its imports started (what the I/O limit bounds)
    print(f"merge_s={time.perf_counter() - start:.3f}")


def mergekit_config(method: str, base: Path, experts: list[Path], density: float) -> dict:
    per_model = {"weight": 1.0} | ({"density": density} if method == "ties" else {})
    return {
        "merge_method": method,
        "base_model": str(base),
        "models": [{"model": str(e), "parameters": per_model} for e in experts],
        "parameters": {"normalize": method == "ties"},
        "dtype": "float32",
    }


def install_mergekit(root: Path) -> Path | None:
    venv = root / "mergekit-venv"
    try:
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)],
                       check=True, capture_output=True)  # fmt: skip
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "mergekit"],
                       check=True, capture_output=True, timeout=1800)  # fmt: skip
    except (subprocess.SubprocessError, OSError) as e:
        print(f"mergekit skipped: it could not be installed with pip ({type(e).__name__})")
        return None
    return venv


def merged_files(d: Path) -> list[Path]:
    return sorted(d.glob("*.safetensors"))


def compare(a_dir: Path, b_dir: Path) -> dict[str, float]:
    """Per-tensor comparison of two merges: differing elements, max |a−b|, max relative error."""

    from mergesec.models.state_dict import LazyStateDict

    a, b = LazyStateDict(merged_files(a_dir)), LazyStateDict(merged_files(b_dir))
    keys = set(a) & set(b)
    out = {"keys": len(keys), "only_one": len(set(a) ^ set(b)), "elements": 0, "differ": 0,
           "max_abs": 0.0, "max_rel": 0.0}  # fmt: skip
    for k in sorted(keys):
        x, y = a[k].float(), b[k].float()
        out["elements"] += x.numel()
        out["differ"] += int((x != y).sum())
        out["max_abs"] = max(out["max_abs"], float((x - y).abs().max()))
        out["max_rel"] = max(out["max_rel"], float((x - y).norm() / y.norm().clamp(min=1e-30)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--large", action="store_true", help="experts of ~1.1B instead of ~134M")
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--density", type=float, default=0.2, help="TIES density (mergesec k)")
    ap.add_argument("--methods", default="task_arithmetic,ties")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--mergekit-venv", type=Path)
    ap.add_argument(
        "--dir",
        type=Path,
        help="keep the models here and reuse them (default: a temporary directory)",
    )
    ap.add_argument("--no-mergekit", action="store_true", help="time mergesec alone")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        method, base, out, density, *experts = args.child
        child_mergesec(method, base, experts, out, float(density))
        return

    import yaml

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        models = args.dir or root
        models.mkdir(parents=True, exist_ok=True)
        size = "large" if args.large else "small"
        start = time.perf_counter()
        base, experts, n_params = build_models(models, size, args.experts)
        print(f"{args.experts} experts + base of {n_params / 1e6:.0f}M float32 parameters "
              f"written in {time.perf_counter() - start:.0f} s; {os.cpu_count()} CPUs")  # fmt: skip
        inputs = [base / "model.safetensors", *(e / "model.safetensors" for e in experts)]
        model_bytes = inputs[0].stat().st_size
        read_bw, write_bw = disk_bandwidth(models, model_bytes)
        print(f"disk: uncached read {read_bw / GB:.2f} GB/s, buffered write + fsync "
              f"{write_bw / GB:.2f} GB/s")  # fmt: skip
        venv = None if args.no_mergekit else (args.mergekit_venv or install_mergekit(root))
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        rows = []
        compute = ties_compute_limit(n_params, args.experts, args.density)
        print(f"TIES compute limit (top-k + sign election, per-element cost measured here, over "
              f"{os.cpu_count()} cores): {compute:.1f} s")  # fmt: skip
        for method in args.methods.split(","):
            bytes_read = sum(p.stat().st_size for p in inputs)
            io_limit = bytes_read / read_bw + model_bytes / write_bw
            if method == "ties":
                io_limit = max(io_limit, compute)
            for run in range(args.runs):
                tools = [("mergesec", None)] + ([("mergekit", venv)] if venv else [])
                for tool, vdir in tools:
                    out = root / f"{tool}-{method}"
                    shutil.rmtree(out, ignore_errors=True)
                    for p in inputs:
                        evict(p)
                    if tool == "mergesec":
                        cmd = [sys.executable, __file__, "--child", method, str(base), str(out),
                               str(args.density), *map(str, experts)]  # fmt: skip
                    else:
                        cfg = root / f"{method}.yml"
                        conf = mergekit_config(method, base, experts, args.density)
                        cfg.write_text(yaml.safe_dump(conf))
                        cmd = [str(vdir / "bin" / "mergekit-yaml"), str(cfg), str(out),
                               "--no-copy-tokenizer"]  # fmt: skip
                    try:
                        wall, rss, output = run_timed(cmd, env)
                    except RuntimeError as e:
                        print(f"{method} {tool}: failed, skipped: {str(e).splitlines()[-1]}")
                        continue
                    rows.append((method, tool, run, wall, rss, io_limit))
                    inner = re.search(r"merge_s=([0-9.]+)", output)
                    merge_only = (f", merge alone {float(inner[1]):.1f} s = "
                                  f"{float(inner[1]) / io_limit:.2f}x the limit") if inner else ""  # fmt: skip
                    print(f"{method:16s} {tool:9s} run {run}: {wall:7.1f} s  peak RSS "
                          f"{rss / GB:5.2f} GB  (limit {io_limit:.1f} s{merge_only})",
                          flush=True)  # fmt: skip
            if venv and (root / f"mergekit-{method}").exists():
                diff = compare(root / f"mergesec-{method}", root / f"mergekit-{method}")
                print(f"{method}: outputs compared: {json.dumps(diff)}", flush=True)


if __name__ == "__main__":
    main()
