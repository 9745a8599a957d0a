"""The trainable: executes one node on a Ray worker, reading inputs from and writing outputs to the store."""

from __future__ import annotations

import gc
import importlib
import json
import os
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from mergesec.core.context import NodeContext, pick_device
from mergesec.core.registry import get_op
from mergesec.core.uris import trial_store_uri
from mergesec.orchestrator.manifest import CorruptNode
from mergesec.orchestrator.node import Node
from mergesec.orchestrator.provenance import code_versions
from mergesec.orchestrator.store import Store

STEP_KEY = "mergesec_step"

# Module-level caches that hold one node's data (decoded datasets, heads on the device). A reused
# worker clears them between nodes so the next node, maybe a GPU co-tenant, gets the memory back.
NODE_CACHES = (
    ("mergesec.data.images", "_load_cached"),
    ("mergesec.data.qa", "_load_cached"),
    ("mergesec.kinds.image.clip", "_zero_shot_head"),
)


def executor_for(step: str, op: str):
    """The op's own executor when it registered one, else its step module's ``execute``."""

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
    owner: str = "",
) -> dict[str, float]:
    """Run ``node`` unless the store already has it; return its metrics. Raises if the op fails."""
    import torch

    if store.is_done(node.id):
        if not store.check(node.id):
            return store.read_metrics(node.id)
        store.invalidate(node.id)  # corrupt: computed again below
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(max(1, int(cpus)))
    record = node.to_dict() | {
        "host": os.uname().nodename,
        "worker": worker,
        "code": code_versions(),
    }
    started = time.time()
    try:
        inputs = read_inputs(node, store)
        with store.writing(node.id, record, owner=owner) as out_dir:
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


def read_inputs(node: Node, store: Store) -> dict[str, Path]:
    """Local directories of the node's inputs, each checked against its manifest.

    A corrupt input is invalidated (the next run computes it again) and this node fails.
    """
    inputs = {}
    for role, up in node.inputs.items():
        try:
            inputs[role] = store.local_dir(up)
        except CorruptNode as e:
            store.invalidate(up)
            raise RuntimeError(
                f"input {role} ({up}) is corrupt and was invalidated; the next run computes it "
                f"again ({'; '.join(e.problems[:3])})"
            ) from None
    return inputs


def release_node_memory(used_accelerator: bool) -> None:
    """Drop per-node caches and return the accelerator's cached memory (between reused nodes).

    A full garbage collection costs 0.1-0.2 s in a worker that imported torch and transformers,
    so it runs only when there is something to free: a cache held entries or a GPU was used.
    """
    held = False
    for module, name in NODE_CACHES:
        mod = sys.modules.get(module)  # never import a module just to clear it
        fn = getattr(mod, name, None) if mod is not None else None
        if fn is not None and hasattr(fn, "cache_clear"):
            held = held or fn.cache_info().currsize > 0
            fn.cache_clear()
    if not (held or used_accelerator):
        return
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def start_watchdog(node: Node, store: Store, seconds: float) -> threading.Timer:
    """Fail ``node`` and end this worker process when it runs longer than ``seconds``.

    A hung node (a deadlocked data loader, a stuck collective) cannot be interrupted from Python,
    so the worker records the failure in the store and exits; Tune sees the trial fail.
    """

    def fire() -> None:
        msg = f"TimeoutError: {node.step} node ran longer than its timeout of {seconds:g} s"
        try:
            store.mark_failed(node.id, node.to_dict() | {"host": os.uname().nodename}, msg)
        finally:
            os._exit(1)

    t = threading.Timer(seconds, fire)
    t.daemon = True
    t.start()
    return t


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

    timeout = (config.get("timeouts") or {}).get(node.step)
    watchdog = start_watchdog(node, store, float(timeout)) if timeout else None
    try:
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
            owner=str(config.get("owner", "")),
        )
    finally:
        if watchdog is not None:
            watchdog.cancel()
        release_node_memory(used_accelerator=gpus > 0)
    tune.report(
        {
            **{k: v for k, v in metrics.items() if isinstance(v, (int, float))},
            "node_done": 1,
            "worker": worker,
        }
    )
