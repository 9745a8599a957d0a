"""Live progress: nodes done / running / pending / failed / skipped per step.

The counts come from the searcher's own counters, so drawing costs O(steps), never O(nodes); on a
terminal the table is redrawn by ``rich`` twice a second, not on every Tune step.
"""

from __future__ import annotations

import time

from ray.tune import Callback
from rich.console import Console
from rich.live import Live
from rich.table import Table

from mergesec.orchestrator.searcher import DONE, FAILED, PENDING, RUNNING, SKIPPED, DagSearcher

STATES = (DONE, RUNNING, PENDING, FAILED, SKIPPED)


def progress_table(searcher: DagSearcher, cached: dict[str, int], elapsed: float) -> Table:
    steps = searcher.by_step
    t = Table(title=f"mergesec  {elapsed:5.0f}s", title_justify="left")
    t.add_column("step")
    t.add_column("cached", justify="right")
    for s in STATES:
        t.add_column(s, justify="right")
    for step in sorted(set(steps) | set(cached)):
        row = steps.get(step) or dict.fromkeys(STATES, 0)
        t.add_row(step, str(cached.get(step, 0)), *(str(row[s]) for s in STATES))
    return t


def progress_line(searcher: DagSearcher, node: dict, what: str, elapsed: float) -> str:
    c = searcher.totals
    labels = ",".join(node.get("labels", {}).get("what", []))
    return (
        f"[{elapsed:6.1f}s] {what:8s} {node['step']}/{node['op']} {labels} ({node['id'][:8]})"
        f"  done {c[DONE]} running {c[RUNNING]} pending {c[PENDING]} failed {c[FAILED]}"
    )


class ProgressCallback(Callback):
    """Draws the table live on a terminal; prints one line per started or finished node otherwise."""

    def __init__(self, searcher: DagSearcher, cached: dict[str, int], console: Console):
        self.searcher = searcher
        self.cached = cached
        self.console = console
        self.start = time.time()
        self.live: Live | None = None
        if console.is_terminal:
            self.live = Live(
                get_renderable=self._table,
                console=console,
                refresh_per_second=2,
                transient=False,
            )
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
        if self.live is None and self.searcher is not None:
            line = progress_line(
                self.searcher, trial.config["node"], what, time.time() - self.start
            )
            self.console.print(line, highlight=False, markup=False)

    def on_trial_start(self, iteration, trials, trial, **info):
        self._event(trial, "start")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._event(trial, "done")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._event(trial, "FAILED")

    def close(self) -> None:
        if self.live is not None:
            self.live.refresh()
            self.live.stop()
            self.live = None
