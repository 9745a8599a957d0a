"""Live progress: nodes done / running / pending / failed / skipped per step."""

from __future__ import annotations

import time

from ray.tune import Callback
from rich.console import Console
from rich.live import Live
from rich.table import Table

from mergesec.orchestrator.searcher import DONE, FAILED, PENDING, RUNNING, SKIPPED, DagSearcher

STATES = (DONE, RUNNING, PENDING, FAILED, SKIPPED)


def progress_table(searcher: DagSearcher, cached: dict[str, int], elapsed: float) -> Table:
    steps: dict[str, dict[str, int]] = {}
    for node_id, state in searcher.state.items():
        step = searcher.nodes[node_id]["step"]
        steps.setdefault(step, {s: 0 for s in STATES})[state] += 1
    t = Table(title=f"mergesec  {elapsed:5.0f}s", title_justify="left")
    t.add_column("step")
    t.add_column("cached", justify="right")
    for s in STATES:
        t.add_column(s, justify="right")
    for step in sorted(set(steps) | set(cached)):
        row = steps.get(step, {s: 0 for s in STATES})
        t.add_row(step, str(cached.get(step, 0)), *(str(row[s]) for s in STATES))
    return t


class ProgressCallback(Callback):
    """Draws the table live on a terminal; prints one line per finished node otherwise."""

    def __init__(self, searcher: DagSearcher, cached: dict[str, int], console: Console):
        self.searcher = searcher
        self.cached = cached
        self.console = console
        self.start = time.time()
        self.live: Live | None = None
        if console.is_terminal:
            self.live = Live(self._table(), console=console, refresh_per_second=2, transient=False)
            self.live.start()

    def __getstate__(self) -> dict:
        # Tune pickles callbacks with its run config; a terminal display cannot travel.
        return {
            "searcher": None,
            "cached": self.cached,
            "console": None,
            "start": self.start,
            "live": None,
        }

    def _table(self) -> Table:
        return progress_table(self.searcher, self.cached, time.time() - self.start)

    def _event(self, trial, what: str) -> None:
        node = trial.config["node"]
        if self.live is not None:
            self.live.update(self._table())
        else:
            c = self.searcher.counts()
            what_ = ",".join(node.get("labels", {}).get("what", []))
            self.console.print(
                f"[{time.time() - self.start:6.1f}s] {what:8s} {node['step']}/{node['op']} {what_} ({node['id'][:8]})"
                f"  done {c[DONE]} running {c[RUNNING]} pending {c[PENDING]} failed {c[FAILED]}",
                highlight=False,
            )

    def on_trial_start(self, iteration, trials, trial, **info):
        self._event(trial, "start")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._event(trial, "done")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._event(trial, "FAILED")

    def on_step_end(self, iteration, trials, **info):
        if self.live is not None:
            self.live.update(self._table())

    def close(self) -> None:
        if self.live is not None:
            self.live.update(self._table())
            self.live.stop()
            self.live = None
