"""The trainable: executes one node on a Ray worker, reading inputs from and writing outputs to the store."""

from __future__ import annotations

import importlib
import json
import os
import time
import traceback
from typing import Any

from mergesec.core.uris import trial_store_uri
from mergesec.orchestrator.node import Node
from mergesec.orchestrator.provenance import code_versions
from mergesec.orchestrator.store import Store

STEP_KEY = "mergesec_step"


def executor_for(step: str, op: str):
    """The op's own executor when it registered one, else its step module's ``execute``."""
    from mergesec.core.registry import get_op

    registered = get_op(step, op)
    if registered.executor is not None:
        return registered.executor
    return importlib.import_module(f"mergesec.tasks.{step}").execute


def execute_node(
    node: Node,
    store: Store,
    *,
    cpus: float = 1.0,
    gpus: float = 0.0,
    allow_remote_code: bool = False,
    report=None,
    worker: str = "",
) -> dict[str, float]:
    """Run ``node`` unless the store already has it; return its metrics. Raises if the op fails."""
    import torch

    from mergesec.core.context import NodeContext, pick_device

    if store.is_done(node.id):
        return store.read_metrics(node.id)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(max(1, int(cpus)))
    record = node.to_dict() | {
        "host": os.uname().nodename,
        "worker": worker,
        "code": code_versions(),
    }
    inputs = {role: store.local_dir(up) for role, up in node.inputs.items()}
    started = time.time()
    try:
        with store.writing(node.id, record) as out_dir:
            ctx = NodeContext(
                node_id=node.id,
                step=node.step,
                op=node.op,
                params=node.params,
                inputs=inputs,
                out_dir=out_dir,
                device=pick_device(gpus),
                allow_remote_code=allow_remote_code,
                report=report or (lambda m, s: None),
            )
            metrics = dict(executor_for(node.step, node.op)(ctx))
            metrics["wall_time_s"] = time.time() - started
            (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    except BaseException:
        store.mark_failed(node.id, record, traceback.format_exc())
        raise
    return metrics


def run_trial(config: dict[str, Any]) -> None:
    """Ray Tune function trainable: one node per trial."""
    import ray
    from ray import tune

    node = Node.from_dict(config["node"])
    store = Store(trial_store_uri(config["store"]))
    gpus = float(len(ray.get_gpu_ids())) if ray.is_initialized() else 0.0
    worker = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""

    def report(metrics: dict[str, float], step: int) -> None:
        tune.report({**metrics, STEP_KEY: step})

    metrics = execute_node(
        node,
        store,
        cpus=float(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))
        if ray.is_initialized()
        else 1.0,
        gpus=gpus,
        allow_remote_code=bool(config.get("allow_remote_code", False)),
        report=report,
        worker=worker,
    )
    tune.report(
        {
            **{k: v for k, v in metrics.items() if isinstance(v, (int, float))},
            "node_done": 1,
            "worker": worker,
        }
    )
