"""``DagSearcher``: a Ray Tune ``Searcher`` that hands out plan nodes once their inputs are done."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

from ray.tune.search import Searcher

PENDING, RUNNING, DONE, FAILED, SKIPPED = "pending", "running", "done", "failed", "skipped"


class DagSearcher(Searcher):
    """Releases each node of a DAG as one trial, never before all of its inputs are done.

    ``suggest`` returns a config ``{"node": node_dict, **extra}`` for a ready node, ``None`` while
    nodes wait on running inputs, and ``Searcher.FINISHED`` when nothing is left to start. A failed
    node blocks exactly its descendants (marked skipped); everything else still runs.
    """

    def __init__(
        self,
        nodes: Iterable[dict[str, Any]],
        done: Iterable[str] = (),
        extra: dict[str, Any] | None = None,
    ):
        super().__init__(metric=None, mode=None)
        self.order: list[str] = []
        self.nodes: dict[str, dict[str, Any]] = {}
        for n in nodes:
            self.order.append(n["id"])
            self.nodes[n["id"]] = n
        done = set(done)
        self.state: dict[str, str] = {i: DONE if i in done else PENDING for i in self.order}
        self.trials: dict[str, str] = {}
        self.extra = dict(extra or {})
        self.children: dict[str, list[str]] = {}
        for i, n in self.nodes.items():
            for up in n["inputs"].values():
                self.children.setdefault(up, []).append(i)

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True

    def _ready(self, node_id: str) -> bool:
        return all(
            self.state.get(up, DONE) == DONE for up in self.nodes[node_id]["inputs"].values()
        )

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        for i in self.order:
            if self.state[i] == PENDING and self._ready(i):
                self.state[i] = RUNNING
                self.trials[trial_id] = i
                return {"node": copy.deepcopy(self.nodes[i]), **self.extra}
        if RUNNING not in self.state.values():
            return Searcher.FINISHED
        return None

    def on_trial_complete(
        self, trial_id: str, result: dict | None = None, error: bool = False
    ) -> None:
        node_id = self.trials.pop(trial_id, None)
        if node_id is None:
            return
        if error:
            self.state[node_id] = FAILED
            self._skip_descendants(node_id)
        else:
            self.state[node_id] = DONE

    def _skip_descendants(self, node_id: str) -> None:
        stack = list(self.children.get(node_id, []))
        while stack:
            c = stack.pop()
            if self.state.get(c) == PENDING:
                self.state[c] = SKIPPED
                stack.extend(self.children.get(c, []))

    def counts(self) -> dict[str, int]:
        out = {s: 0 for s in (PENDING, RUNNING, DONE, FAILED, SKIPPED)}
        for s in self.state.values():
            out[s] += 1
        return out

    def node_of_trial(self, trial_id: str) -> str | None:
        return self.trials.get(trial_id)

    def get_state(self) -> dict[str, Any]:
        return {
            "order": self.order,
            "nodes": self.nodes,
            "state": self.state,
            "trials": self.trials,
            "extra": self.extra,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        self.order = state["order"]
        self.nodes = state["nodes"]
        # A trial that was running when the state was saved has to run again after a restore.
        self.state = {i: PENDING if s == RUNNING else s for i, s in state["state"].items()}
        self.trials = {}
        self.extra = state["extra"]
        self.children = {}
        for i, n in self.nodes.items():
            for up in n["inputs"].values():
                self.children.setdefault(up, []).append(i)

    def save(self, checkpoint_path: str) -> None:
        import pickle

        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.get_state(), f)

    def restore(self, checkpoint_path: str) -> None:
        import pickle

        with open(checkpoint_path, "rb") as f:
            self.set_state(pickle.load(f))
