"""``DagSearcher``: a Ray Tune ``Searcher`` that hands out plan nodes once their inputs are done.

The DAG state is kept with in-degree counts and one ready queue per resource shape, so every event
(a suggestion, a start, a completion) costs O(log n) plus the node's own edges, whatever the plan
size. With a ``cost`` estimate, each queue hands out the node with the longest estimated path to
the end of the DAG first (critical-path list scheduling), so a long training node starts before the
short nodes that could run beside it; without one, nodes leave in the order they became ready.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable, Hashable, Iterable
from typing import Any

from ray.tune import Callback
from ray.tune.search import Searcher

PENDING, RUNNING, DONE, FAILED, SKIPPED = "pending", "running", "done", "failed", "skipped"
STATES = (PENDING, RUNNING, DONE, FAILED, SKIPPED)


class DagSearcher(Searcher):
    """Releases each node of a DAG as one trial, never before all of its inputs are done.

    ``suggest`` returns a config ``{"node": node_dict, **extra}`` for a ready node, ``None`` while
    nodes wait on running inputs (or every shape's queue window is full), and ``Searcher.FINISHED``
    when nothing is left to start. A failed node blocks exactly its descendants (marked skipped);
    everything else still runs.

    ``shape`` maps a node to its resource shape. Nodes handed to Tune but not yet started are
    "waiting"; at most ``window`` of each shape wait at once, and the next suggestion comes from the
    shape with the fewest waiting nodes, so nodes that wait for a GPU never hold back CPU nodes.
    ``max_running`` bounds the nodes handed out and not finished (running or waiting).

    ``cost`` estimates a node's run time in any unit; a node's priority is its cost plus the
    largest priority among its children, and ready nodes of one shape leave highest priority first
    (ties, and every node without ``cost``, first ready first out).

    With several drivers on one store, ``claim(node_id)`` is asked before a node is handed out
    (True: this driver may run it, holding its lease) and ``release(node_id)`` when it ended. A node
    another driver holds waits aside; every ``poll_s`` seconds ``elsewhere(node_id)`` says whether
    it is ``"done"`` (the other driver committed it: done here too, never run twice), ``"free"``
    (that driver is gone: claimed again) or still ``"held"``.
    """

    def __init__(
        self,
        nodes: Iterable[dict[str, Any]],
        done: Iterable[str] = (),
        extra: dict[str, Any] | None = None,
        *,
        shape: Callable[[dict[str, Any]], Hashable] | None = None,
        window: int = 1 << 30,
        max_running: int | None = None,
        claim: Callable[[str], bool] | None = None,
        release: Callable[[str], None] | None = None,
        elsewhere: Callable[[str], str] | None = None,
        poll_s: float = 2.0,
        cost: Callable[[dict[str, Any]], float] | None = None,
    ):
        super().__init__(metric=None, mode=None)
        self.extra = dict(extra or {})
        self.claim, self.release, self.elsewhere = claim, release, elsewhere
        self.poll_s = poll_s
        self.held_elsewhere: dict[str, None] = {}  # ready nodes another driver is computing
        self.done_elsewhere: set[str] = set()
        self._polled = 0.0
        self.shape = shape
        self.window = window
        self.max_running = max_running
        self.cost = cost
        self._build(list(nodes), set(done))

    # ---- state
    def _build(self, nodes: list[dict[str, Any]], done: set[str], running_to_pending=False) -> None:
        self.order: list[str] = [n["id"] for n in nodes]
        self.nodes: dict[str, dict[str, Any]] = {n["id"]: n for n in nodes}
        self.state: dict[str, str] = {}
        self.trials: dict[str, str] = {}
        self.waiting: set[str] = set()  # trial ids handed out, not started yet
        self.children: dict[str, list[str]] = {}
        self.missing: dict[str, int] = {}  # inputs of a pending node that are not done yet
        # per shape, a heap of (-priority, push number, node id)
        self.ready: dict[Hashable, list[tuple[float, int, str]]] = {}
        self.pushed = 0
        self.waiting_by_shape: dict[Hashable, int] = {}
        self.by_step: dict[str, dict[str, int]] = {}
        self.totals = dict.fromkeys(STATES, 0)
        for i, n in self.nodes.items():
            self._count(n["step"], None, DONE if i in done else PENDING)
            self.state[i] = DONE if i in done else PENDING
            for up in n["inputs"].values():
                self.children.setdefault(up, []).append(i)
        self.priority = self._priorities()
        for i in self.order:
            if self.state[i] != PENDING:
                continue
            m = sum(
                1 for up in self.nodes[i]["inputs"].values() if self.state.get(up, DONE) != DONE
            )
            self.missing[i] = m
            if m == 0:
                self._push(i)

    def _priorities(self) -> dict[str, float]:
        """Cost of each node plus the largest priority among its children (0 without ``cost``)."""
        if self.cost is None:
            return {}
        out: dict[str, float] = {}
        for root in self.order:  # iterative post-order: plans are deeper than the recursion limit
            stack = [(root, False)]
            while stack:
                i, expanded = stack.pop()
                if i in out:
                    continue
                kids = self.children.get(i, ())
                if expanded:
                    below = max((out[c] for c in kids), default=0.0)
                    out[i] = float(self.cost(self.nodes[i])) + below
                else:
                    stack.append((i, True))
                    stack.extend((c, False) for c in kids if c not in out)
        return out

    def _shape(self, node_id: str) -> Hashable:
        return self.shape(self.nodes[node_id]) if self.shape is not None else ""

    def _push(self, node_id: str) -> None:
        s = self._shape(node_id)
        self.pushed += 1
        entry = (-self.priority.get(node_id, 0.0), self.pushed, node_id)
        heapq.heappush(self.ready.setdefault(s, []), entry)
        self.waiting_by_shape.setdefault(s, 0)

    def _count(self, step: str, old: str | None, new: str) -> None:
        row = self.by_step.setdefault(step, dict.fromkeys(STATES, 0))
        if old is not None:
            row[old] -= 1
            self.totals[old] -= 1
        row[new] += 1
        self.totals[new] += 1

    def _set(self, node_id: str, new: str) -> None:
        self._count(self.nodes[node_id]["step"], self.state[node_id], new)
        self.state[node_id] = new

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its config (this searcher included) into the experiment directory; the
        # lease hooks hold live threads and locks and are not needed by that copy.
        state = self.__dict__.copy()
        state.update(claim=None, release=None, elsewhere=None)
        return state

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True

    # ---- Tune's hooks
    def _best_shape(self) -> Hashable | None:
        best = None
        for s, q in self.ready.items():  # one entry per resource shape: a handful
            w = self.waiting_by_shape[s]
            if q and w < self.window and (best is None or w < self.waiting_by_shape[best]):
                best = s
        return best

    def _poll_elsewhere(self) -> None:
        """Nodes another driver held: take the done ones as done, claim the abandoned ones."""
        if not self.held_elsewhere or self.elsewhere is None:
            return
        now = time.monotonic()
        if now - self._polled < self.poll_s:
            return
        self._polled = now
        for node_id in list(self.held_elsewhere):
            state = self.elsewhere(node_id)
            if state == "held":
                continue
            del self.held_elsewhere[node_id]
            if state == "done":
                self.done_elsewhere.add(node_id)
                self._set(node_id, DONE)
                self._release_children(node_id)
            else:
                self._push(node_id)

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        self._poll_elsewhere()
        if self.max_running is not None and len(self.trials) >= self.max_running:
            return None
        node_id = None
        while (best := self._best_shape()) is not None:
            node_id = heapq.heappop(self.ready[best])[2]
            if self.claim is None or self.claim(node_id):
                break
            self.held_elsewhere[node_id] = None
            node_id = None
        if node_id is not None:
            self._set(node_id, RUNNING)
            self.trials[trial_id] = node_id
            self.waiting.add(trial_id)
            self.waiting_by_shape[best] += 1
            # Tune copies the config into the trial; the node dict itself is never mutated.
            return {"node": self.nodes[node_id], **self.extra}
        if not self.trials and not any(self.ready.values()) and not self.held_elsewhere:
            return Searcher.FINISHED
        return None

    def on_trial_start(self, trial_id: str) -> None:
        """The trial got its resources and started (called by ``DagCallback``)."""
        if trial_id in self.waiting:
            self.waiting.discard(trial_id)
            self.waiting_by_shape[self._shape(self.trials[trial_id])] -= 1

    def on_trial_complete(
        self, trial_id: str, result: dict | None = None, error: bool = False
    ) -> None:
        node_id = self.trials.pop(trial_id, None)
        if node_id is None:
            return
        if self.release is not None:
            self.release(node_id)
        if trial_id in self.waiting:
            self.waiting.discard(trial_id)
            self.waiting_by_shape[self._shape(node_id)] -= 1
        if error:
            self._set(node_id, FAILED)
            self._skip_descendants(node_id)
            return
        self._set(node_id, DONE)
        self._release_children(node_id)

    def _release_children(self, node_id: str) -> None:
        for c in self.children.get(node_id, ()):
            if self.state[c] == PENDING:
                self.missing[c] -= 1
                if self.missing[c] == 0:
                    self._push(c)

    def _skip_descendants(self, node_id: str) -> None:
        stack = list(self.children.get(node_id, []))
        while stack:
            c = stack.pop()
            if self.state.get(c) == PENDING:
                self._set(c, SKIPPED)
                stack.extend(self.children.get(c, []))

    def counts(self) -> dict[str, int]:
        return dict(self.totals)

    def get_state(self) -> dict[str, Any]:
        return {
            "order": self.order,
            "nodes": self.nodes,
            "state": self.state,
            "extra": self.extra,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        # A trial that was running when the state was saved has to run again after a restore.
        old = state["state"]
        self.extra = state["extra"]
        self._build(
            [state["nodes"][i] for i in state["order"]],
            {i for i, s in old.items() if s == DONE},
        )
        for i, s in old.items():
            if s in (FAILED, SKIPPED):
                self._set(i, s)
        for q in self.ready.values():
            q[:] = [e for e in q if self.state[e[2]] == PENDING]
            heapq.heapify(q)

    def save(self, checkpoint_path: str) -> None:
        import pickle

        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.get_state(), f)

    def restore(self, checkpoint_path: str) -> None:
        import pickle

        with open(checkpoint_path, "rb") as f:
            self.set_state(pickle.load(f))


class DagCallback(Callback):
    """Tells the searcher when a trial has actually started (left Ray's resource queue)."""

    def __init__(self, searcher: DagSearcher):
        self.searcher = searcher

    def __getstate__(self) -> dict:
        return {"searcher": None}

    def on_trial_start(self, iteration, trials, trial, **info):
        if self.searcher is not None:
            self.searcher.on_trial_start(trial.trial_id)
