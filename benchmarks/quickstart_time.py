"""Cold and warm wall time of the quickstart study, and the accuracies it reports.

    python benchmarks/quickstart_time.py [--study conf/quickstart.yaml] [--keep DIR]
                                         [--scenarios unprotected,params,...]

Runs `mergesec run` twice in a fresh directory (its own store, MLflow database and base-model
cache): the first run computes everything, the second must find everything in the store. Then
prints where the cold run's time went: node seconds (each node's ``wall_time_s``) per step and
op, with the merge nodes' candidate counts.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(study: Path, cwd: Path) -> tuple[float, str]:
    env = {**os.environ, "MERGESEC_CACHE": str(cwd / "cache")}
    t = time.perf_counter()
    p = subprocess.run(
        [sys.executable, "-m", "mergesec.cli", "run", str(study)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
    )
    elapsed = time.perf_counter() - t
    if p.returncode != 0:
        sys.exit(f"mergesec run failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return elapsed, p.stdout


def subset(study: Path, names: list[str], cwd: Path) -> Path:
    """A copy of ``study`` keeping only the named scenarios (same name, so the same node ids)."""
    import yaml

    spec = yaml.safe_load(study.read_text())
    missing = set(names) - set(spec["scenarios"])
    if missing:
        sys.exit(f"{study}: scenarios: no {sorted(missing)}; has {sorted(spec['scenarios'])}")
    spec["scenarios"] = {k: v for k, v in spec["scenarios"].items() if k in names}
    out = cwd / study.name
    out.write_text(yaml.safe_dump(spec, sort_keys=False))
    return out


def time_per_step(store: Path) -> list[tuple[str, int, float, int]]:
    """(step/op, nodes, node seconds, merge candidates scored) from the store's node records,
    most expensive first."""
    rows: dict[str, list[float]] = {}
    for d in (store / "nodes").iterdir():
        if not (d / "node.json").exists():
            continue
        node = json.loads((d / "node.json").read_text())
        metrics = json.loads((d / "metrics.json").read_text())
        key = f"{node['step']}/{node['op']}"
        row = rows.setdefault(key, [0, 0.0, 0])
        row[0] += 1
        row[1] += float(metrics.get("wall_time_s", 0.0))
        op = node.get("params", {}).get("op")
        if node["step"] == "merge" and isinstance(op, dict):
            n = 1
            for v in op.values():
                if isinstance(v, dict) and "search" in v:
                    n *= len(v["search"])
            attack = node["params"].get("attack") or {}
            n *= len(attack.get("params", {}).get("scales", [None]))
            row[2] += n
    out = [(k, int(n), t, int(c)) for k, (n, t, c) in rows.items()]
    return sorted(out, key=lambda r: -r[2])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--study", type=Path, default=REPO / "conf" / "quickstart.yaml")
    ap.add_argument("--keep", type=Path, help="run in this directory and keep it")
    ap.add_argument(
        "--scenarios",
        help="comma-separated subset of the study's scenarios (e.g. the earlier budgets)",
    )
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cwd = args.keep or Path(tmp)
        cwd.mkdir(parents=True, exist_ok=True)
        study = args.study.resolve()
        if args.scenarios:
            study = subset(study, args.scenarios.split(","), cwd)
        cold, _ = run(study, cwd)
        warm, out = run(study, cwd)
        print(
            f"cpus: {os.cpu_count()}  cold: {cold:.1f} s  warm: {warm:.1f} s  (warm/cold {warm / cold:.3f})"
        )
        print(out.split("nodes:")[-1].splitlines()[0].strip())
        steps = time_per_step(cwd / "mergesec-store")
        total = sum(t for _, _, t, _ in steps)
        print(f"node time of the cold run: {total:.0f} s (summed over parallel trials)")
        for key, n, t, cands in steps:
            extra = f"  {cands} candidates" if cands else ""
            print(f"  {key:28s} {n:3d} nodes {t:7.1f} s  {100 * t / max(total, 1e-9):4.1f}%{extra}")
        results = json.loads(
            next((cwd / "mergesec-store" / "studies").glob("*/results.json")).read_text()
        )
        for r in results:
            print(
                f"{r['scenario']:16s} {r['merge']:16s} clean {r['victim_clean']}  release {r['victim_release']}  "
                f"merged {r['victim_merged']}  others {r['others_merged']}  per dataset {r.get('per_dataset')}"
            )


if __name__ == "__main__":
    main()
