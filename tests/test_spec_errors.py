"""Bad study files are refused before any work starts: one line per problem, key path, exit 2."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from typer.testing import CliRunner

from mergesec.cli import app

GOOD = """
study: s
base: builtin:minilm-l6
datasets: [builtin:sentiment, builtin:topic]
finetune: {mode: full, epochs: 1}
scenarios:
  unprotected: {}
victims: [builtin:sentiment]
merge: {op: task_arithmetic, coefficient: {search: [0.5, 1.0]}}
"""

# (name, text replacing GOOD (or a transform of it), expected key path, expected words in the message)
CASES = [
    ("unknown top-level key", GOOD + "studdy: x\n", "studdy", "unknown key"),
    ("missing base", GOOD.replace("base: builtin:minilm-l6\n", ""), "base", "required"),
    ("wrong type", GOOD.replace("epochs: 1", "epochs: two"), "finetune.epochs", "integer"),
    (
        "unknown merge op",
        GOOD.replace("op: task_arithmetic", "op: tiez"),
        "merge.op",
        "unknown op 'tiez'; known:",
    ),
    (
        "unknown merge param",
        GOOD.replace("coefficient:", "kk: 1, coefficient:"),
        "merge.kk",
        "unknown parameter 'kk'",
    ),
    (
        "search of a fixed param",
        GOOD.replace("op: task_arithmetic", "op: dare_linear, seed: {search: [1]}"),
        "merge.seed",
        "cannot search 'seed'; searchable: coefficient, drop_rate",
    ),
    (
        "unknown dataset",
        GOOD.replace("builtin:topic]", "builtin:topik]"),
        "datasets.1",
        "unknown builtin dataset",
    ),
    (
        "missing data file",
        GOOD.replace("builtin:topic]", "data/nope.csv]"),
        "datasets.1",
        "not found",
    ),
    (
        "missing model dir",
        GOOD.replace("builtin:minilm-l6", "./no/such/model"),
        "base",
        "not found",
    ),
    (
        "unknown builtin model",
        GOOD.replace("builtin:minilm-l6", "builtin:bert-huge"),
        "base",
        "unknown builtin model",
    ),
    (
        "datasets of two kinds",
        GOOD.replace("builtin:topic]", "builtin:shapes]"),
        "datasets",
        "datasets of different kinds cannot be combined",
    ),
    (
        "monitor on image experts",
        GOOD.replace("builtin:sentiment, builtin:topic]", "builtin:shapes, builtin:colors]")
        .replace("victims: [builtin:sentiment]", "victims: all")
        .replace("unprotected: {}", "watched: {monitor: {op: weightwatch}}"),
        "scenarios.watched.monitor",
        "monitors watch text classifiers only; this study's datasets are image",
    ),
    (
        "victim not a dataset",
        GOOD.replace("victims: [builtin:sentiment]", "victims: [builtin:question]"),
        "victims.0",
        "not one of the study's datasets",
    ),
    (
        "scenario typo",
        GOOD.replace("unprotected: {}", "unprotected: {protec: {op: x}}"),
        "scenarios.unprotected.protec",
        "unknown key",
    ),
    (
        "unknown finetune mode",
        GOOD.replace("mode: full", "mode: qlora"),
        "finetune.mode",
        "unknown op 'qlora'",
    ),
    (
        "unknown resource step",
        GOOD + "resources: {train: {cpu: 1}}\n",
        "resources.train",
        "'finetune', 'protect'",
    ),
    (
        "negative resources",
        GOOD + "resources: {finetune: {cpu: -1}}\n",
        "resources.finetune.cpu",
        "greater than",
    ),
    (
        "study name as a path",
        GOOD.replace("study: s", "study: ../../etc"),
        "study",
        "letters, digits",
    ),
    (
        "empty grid",
        GOOD.replace("op: task_arithmetic", "op: {grid: []}"),
        "merge.op.grid",
        "non-empty",
    ),
    ("bad split", GOOD + "evaluate: {split: train}\n", "evaluate.split", "'test' or 'validation'"),
    ("empty search", GOOD.replace("[0.5, 1.0]", "[]"), "merge.coefficient.search", "non-empty"),
    (
        "no datasets",
        GOOD.replace("datasets: [builtin:sentiment, builtin:topic]", "datasets: []"),
        "datasets",
        "at least 1",
    ),
]


@pytest.mark.parametrize("name,text,path,words", CASES, ids=[c[0] for c in CASES])
def test_bad_study_gives_one_line_and_exit_2(tmp_path, name, text, path, words):
    f = tmp_path / "study.yaml"
    f.write_text(text)
    r = CliRunner().invoke(app, ["plan", str(f), "--store", str(tmp_path / "store")])
    assert r.exit_code == 2, r.output
    lines = [x for x in r.output.splitlines() if x.strip()]
    assert "Traceback" not in r.output
    hit = [x for x in lines if x.startswith(f"{f}: {path}:")]
    assert hit, f"no line for {path!r} in:\n{r.output}"
    assert words.lower() in hit[0].lower(), hit[0]
    assert not (tmp_path / "store").exists(), "nothing may run or be written for a bad study"


def test_not_yaml_and_not_a_mapping_and_missing_file(tmp_path):
    runner = CliRunner()
    f = tmp_path / "a.yaml"
    f.write_text("study: [unclosed\n")
    r = runner.invoke(app, ["plan", str(f)])
    assert r.exit_code == 2 and "not valid YAML: line" in r.output
    f.write_text("- just\n- a list\n")
    r = runner.invoke(app, ["plan", str(f)])
    assert r.exit_code == 2 and "must be a YAML mapping" in r.output
    r = runner.invoke(app, ["plan", str(tmp_path / "missing.yaml")])
    assert r.exit_code == 2 and "study file not found" in r.output


def test_bad_override_and_several_problems_at_once(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text(GOOD)
    r = CliRunner().invoke(app, ["plan", str(f), "--set", "noequals"])
    assert r.exit_code == 2 and "--set: --set 'noequals': expected key.path=value" in r.output
    f.write_text(
        GOOD.replace("op: task_arithmetic", "op: tiez").replace("builtin:topic]", "builtin:topik]")
    )
    r = CliRunner().invoke(app, ["plan", str(f)])
    assert r.exit_code == 2
    assert sum(1 for x in r.output.splitlines() if x.startswith(str(f))) == 2


def test_real_process_exit_status_and_no_traceback(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text(textwrap.dedent(GOOD).replace("op: task_arithmetic", "op: tiez"))
    p = subprocess.run(
        [sys.executable, "-m", "mergesec.cli", "run", str(f)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert p.returncode == 2
    assert p.stdout == ""
    assert p.stderr.strip().splitlines() == [
        f"{f}: merge.op: unknown op 'tiez'; known: " + p.stderr.split("known: ", 1)[1].strip()
    ]
    assert "Traceback" not in p.stderr
