"""Screenshots of a finished study in the MLflow UI, taken with headless Chromium.

    python scripts/mlflow_screenshots.py --tracking-uri sqlite:///mlflow.db [--study quickstart]
        [--out mlflow-screenshots] [--width 1600] [--height 1000]

Starts ``mlflow ui`` on 127.0.0.1 over the tracking store (a free port), drives Chromium
(``chromium``, Debian package ``chromium``) through its DevTools protocol and writes, into
``--out``:

- ``01_runs_table.png``: the merged evaluations, one row per scenario, with the scenario factors
  and headline metrics as columns;
- ``02_charts_by_scenario.png``: the chart view of the merged evaluations grouped by scenario;
- ``03_merged_eval_run.png``: one merged evaluation's page: its description with the links to
  the runs it read from, its headline numbers and its datasets;
- ``04_compare_merged_evals.png``: the compare view of the merged evaluations;
- ``05_study_run.png``: the study run: its results table with a link per row.

The UI's view settings (columns, grouping) are written to the browser's local storage before a
page loads, as the UI itself stores them. Run it from a machine with no other use of the port; it
stops the UI and the browser when done.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import aiohttp

HEADLINE = [
    "victim/accuracy_clean",
    "victim/accuracy_release",
    "victim/accuracy_merged",
    "others/accuracy_mean",
    "merge/coefficient",
]
FACTORS = ["scenario", "merge_op", "victim", "protect_op", "attack_op"]
MERGED_EVALS = "tags.`mergesec.role` = 'merged eval'"
TABLE_ROWS = "document.querySelectorAll('.ag-center-cols-container .ag-row').length > 0"


def text_shown(text: str) -> str:
    return f"document.body.innerText.includes({json.dumps(text)})"


# The UI's model-training layout (its default is the GenAI one).
LAYOUT = "workflowType=machine_learning"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout_s: float = 120) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"{url} did not answer within {timeout_s:.0f}s")


def column(kind: str, key: str) -> str:
    """A run-table column as the UI names it (``metrics.`victim/accuracy_merged```)."""
    return f"{kind}.`{key}`"


def ui_state(group_by: str | None = None) -> dict:
    """The experiment page's stored view: factor and headline columns, every run shown in charts
    (only the ``victim/...`` ones), optionally grouped by a param."""
    factors = [column("params", f) for f in FACTORS]
    metrics = [column("metrics", m) for m in HEADLINE]
    name = column("attributes", "Run Name")
    state = {
        "selectedColumns": factors + metrics,
        # the name first and wide enough for ``params+aga · sentiment · task_arithmetic · merged
        # eval``, then the headline metrics, wide enough for their names, then the factors
        "columnOrder": [name, *metrics, *factors],
        "columnWidths": {name: 400} | {m: 175 for m in metrics} | {f: 120 for f in factors},
        "runsHiddenMode": "SHOW_ALL",
        "hideEmptyCharts": True,
        "useGroupedValuesInCharts": True,
        "groupBy": None,
        "chartsSearchFilter": "victim/",
    }
    if group_by:
        state["groupBy"] = {
            "aggregateFunction": "average",
            "groupByKeys": [{"mode": "param", "groupByData": group_by}],
        }
    return state


class Browser:
    """Headless Chromium driven through the DevTools protocol (one page)."""

    def __init__(self, exe: str, width: int, height: int):
        self.port = free_port()
        self.width, self.height = width, height
        self.profile = tempfile.mkdtemp(prefix="mlflow-shots-")
        self.proc = subprocess.Popen(
            [
                exe,
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--hide-scrollbars",
                f"--remote-debugging-port={self.port}",
                f"--user-data-dir={self.profile}",
                f"--window-size={width},{height}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self._id = 0

    async def __aenter__(self) -> Browser:
        wait_http(f"http://127.0.0.1:{self.port}/json/version", 60)
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json") as r:
            page = next(t for t in json.load(r) if t["type"] == "page")
        self.session = aiohttp.ClientSession()
        self.ws = await self.session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)
        await self.call(
            "Emulation.setDeviceMetricsOverride",
            width=self.width,
            height=self.height,
            deviceScaleFactor=1,
            mobile=False,
        )
        return self

    async def __aexit__(self, *exc) -> None:
        await self.ws.close()
        await self.session.close()
        self.proc.terminate()
        self.proc.wait(timeout=30)
        shutil.rmtree(self.profile, ignore_errors=True)

    async def call(self, method: str, **params) -> dict:
        self._id += 1
        await self.ws.send_json({"id": self._id, "method": method, "params": params})
        while True:
            msg = await self.ws.receive_json()
            if msg.get("id") == self._id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    async def js(self, expression: str):
        r = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return r.get("result", {}).get("value")

    async def goto(self, url: str, ready: str, settle_s: float = 3.0, timeout_s: float = 120):
        """Load ``url`` and wait until the JavaScript expression ``ready`` is true."""
        # a fresh document, so that the UI reads the view settings stored for it
        await self.call("Page.navigate", url="about:blank")
        await asyncio.sleep(0.5)
        await self.call("Page.navigate", url=url)
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if await self.js(
                f"(() => {{ try {{ return Boolean({ready}); }} catch (e) {{ return false; }} }})()"
            ):
                break
            await asyncio.sleep(0.5)
        else:
            print(f"warning: {url} was not ready ({ready}) after {timeout_s:.0f}s", file=sys.stderr)
        await asyncio.sleep(settle_s)

    async def click_text(self, text: str) -> bool:
        """Click the first button or link whose whole text is ``text``, if there is one."""
        return bool(
            await self.js(
                "(() => { const el = [...document.querySelectorAll('button, a, [role=button]')]"
                f".find(e => e.innerText.trim() === {json.dumps(text)});"
                " if (el) { el.click(); return true; } return false; })()"
            )
        )

    async def click(self, selector: str) -> bool:
        """Click the first element matching a CSS selector, if there is one."""
        return bool(
            await self.js(
                f"(() => {{ const el = document.querySelector({json.dumps(selector)});"
                " if (el) { el.click(); return true; } return false; })()"
            )
        )

    async def set_ui_state(self, base: str, experiment_id: str, state: dict) -> None:
        await self.call("Page.navigate", url=base + "/")
        await asyncio.sleep(1.0)
        scope = json.dumps([experiment_id], separators=(",", ":"))
        key = f"MLflowLocalStorage-1.1-ExperimentPage-{scope}-ReactComponentState"
        await self.js(f"localStorage.setItem({json.dumps(key)}, {json.dumps(json.dumps(state))})")

    async def screenshot(self, path: Path, full_height: int | None = None) -> None:
        if full_height:
            await self.call(
                "Emulation.setDeviceMetricsOverride",
                width=self.width,
                height=full_height,
                deviceScaleFactor=1,
                mobile=False,
            )
            await asyncio.sleep(1.5)
        shot = await self.call("Page.captureScreenshot", format="png")
        path.write_bytes(base64.b64decode(shot["data"]))
        if full_height:
            await self.call(
                "Emulation.setDeviceMetricsOverride",
                width=self.width,
                height=self.height,
                deviceScaleFactor=1,
                mobile=False,
            )
        print(path)


def pick_runs(uri: str, study: str | None):
    """The study's experiment, its merged evaluations (ordered by scenario) and its study run."""
    from mlflow.tracking import MlflowClient

    c = MlflowClient(uri)
    exps = [e for e in c.search_experiments() if e.name.startswith("mergesec/")]
    if study:
        exps = [e for e in exps if e.name == f"mergesec/{study}"]
    if not exps:
        raise SystemExit(
            f"{uri}: no mergesec experiment" + (f" for study {study}" if study else "")
        )
    exp = exps[0]
    merged = c.search_runs([exp.experiment_id], filter_string=MERGED_EVALS, max_results=500)
    if not merged:
        raise SystemExit(f"{exp.name}: no merged evaluation runs (is the study finished?)")
    merged.sort(
        key=lambda r: (r.data.params.get("merge_op", ""), r.data.params.get("scenario", ""))
    )
    parents = [
        r
        for r in c.search_runs([exp.experiment_id], max_results=1000)
        if "mergesec.node_id" not in r.data.tags and "mergesec.study" in r.data.tags
    ]
    return exp, merged, parents[0] if parents else None


async def take(args, base: str, exp, merged, parent) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    eid = exp.experiment_id
    filt = urllib.parse.quote(MERGED_EVALS)
    order = urllib.parse.quote(column("params", "scenario"))
    runs_url = (
        f"{base}/#/experiments/{eid}/runs?{LAYOUT}&searchFilter={filt}"
        f"&orderByKey={order}&orderByAsc=true"
    )
    # a run whose scenario has an attack shows the longest lineage
    shown = next((r for r in merged if r.data.params.get("attack_op", "none") != "none"), merged[0])
    async with Browser(args.chromium, args.width, args.height) as b:
        await b.set_ui_state(base, eid, ui_state())
        await b.goto(runs_url, TABLE_ROWS)
        # the assistant panel opens by default and hides a third of the page
        if await b.click('[data-component-id="mlflow.assistant.chat_panel.close"]'):
            await asyncio.sleep(1.0)
        await b.screenshot(out / "01_runs_table.png")

        await b.set_ui_state(base, eid, ui_state(group_by="scenario"))
        await b.goto(runs_url + "&compareRunsMode=CHART", text_shown("Group: "), settle_s=6)
        await b.screenshot(out / "02_charts_by_scenario.png", full_height=args.height * 2)

        run_page = f"{base}/#/experiments/{eid}/runs/{shown.info.run_id}?{LAYOUT}"
        await b.goto(run_page, text_shown("Inputs:"))
        await b.click_text("Show more")  # the whole description
        await asyncio.sleep(1.0)
        await b.screenshot(out / "03_merged_eval_run.png", full_height=int(args.height * 1.6))

        ops = sorted({r.data.params.get("merge_op", "") for r in merged})
        compare = [r.info.run_id for r in merged if r.data.params.get("merge_op", "") == ops[0]]
        q = urllib.parse.urlencode(
            {"runs": json.dumps(compare[:8]), "experiments": json.dumps([eid])}
        )
        await b.goto(
            f"{base}/#/compare-runs?{q}&{LAYOUT}", text_shown("victim/accuracy_merged"), settle_s=5
        )
        await b.screenshot(out / "04_compare_merged_evals.png", full_height=args.height * 2)

        if parent is not None:
            study_page = f"{base}/#/experiments/{eid}/runs/{parent.info.run_id}?{LAYOUT}"
            await b.goto(study_page, text_shown("result row"))
            await b.click_text("Show more")
            await asyncio.sleep(1.0)
            await b.screenshot(out / "05_study_run.png", full_height=int(args.height * 1.4))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tracking-uri", required=True, help="the study's tracking store")
    ap.add_argument("--study", default=None, help="study name (default: the first found)")
    ap.add_argument("--out", default="mlflow-screenshots", help="folder for the PNG files")
    ap.add_argument("--width", type=int, default=1600)
    ap.add_argument("--height", type=int, default=1000)
    ap.add_argument("--chromium", default=shutil.which("chromium") or "chromium")
    args = ap.parse_args()
    if args.tracking_uri.startswith(("http://", "https://")):
        raise SystemExit(
            "--tracking-uri: give the store (sqlite:///... or a directory), not a server"
        )
    exp, merged, parent = pick_runs(args.tracking_uri, args.study)
    port = free_port()
    mlflow = shutil.which("mlflow")
    ui = subprocess.Popen(
        [*([mlflow] if mlflow else [sys.executable, "-m", "mlflow"]), "ui"]
        + ["--backend-store-uri", args.tracking_uri, "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{base}/health")
        asyncio.run(take(args, base, exp, merged, parent))
    finally:
        os.killpg(ui.pid, signal.SIGTERM)  # the UI and its server workers
        try:
            ui.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(ui.pid, signal.SIGKILL)
            ui.wait()


if __name__ == "__main__":
    main()
