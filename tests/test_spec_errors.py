"""Bad study files are refused before any work starts: one line per problem, key path, exit 2."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from typer.testing import CliRunner

from mergesec.cli import app

GOOD = """
study: s
base: builtin:minilm-l6
datasets: [builtin:synthetic_sentiment, builtin:synthetic_topic]
finetune: {mode: full, epochs: 1}
scenarios:
  unprotected: {}
victims: [builtin:synthetic_sentiment]
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
        GOOD.replace("builtin:synthetic_topic]", "builtin:topik]"),
        "datasets.1",
        "unknown builtin dataset",
    ),
    (
        "a synthetic dataset by its old name",
        GOOD.replace("builtin:synthetic_topic]", "builtin:topic]"),
        "datasets.1",
        "builtin:topic was renamed builtin:synthetic_topic",
    ),
    (
        "missing data file",
        GOOD.replace("builtin:synthetic_topic]", "data/nope.csv]"),
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
        GOOD.replace("builtin:synthetic_topic]", "builtin:synthetic_shapes]"),
        "datasets",
        "datasets of different kinds cannot be combined",
    ),
    (
        "monitor on image experts",
        GOOD.replace(
            "builtin:synthetic_sentiment, builtin:synthetic_topic]",
            "builtin:synthetic_shapes, builtin:synthetic_colors]",
        )
        .replace("victims: [builtin:synthetic_sentiment]", "victims: all")
        .replace("unprotected: {}", "watched: {monitor: {op: weightwatch}}"),
        "scenarios.watched.monitor",
        "monitors watch text classifiers and chat models only; this study's datasets are image",
    ),
    (
        "length grouping on image experts",
        GOOD.replace(
            "builtin:synthetic_sentiment, builtin:synthetic_topic]",
            "builtin:synthetic_shapes, builtin:synthetic_colors]",
        )
        .replace("victims: [builtin:synthetic_sentiment]", "victims: all")
        .replace("epochs: 1", "epochs: 1, length_pool: 8"),
        "finetune.length_pool",
        "length_pool groups examples by token count; image inputs have no length",
    ),
    (
        "victim not a dataset",
        GOOD.replace(
            "victims: [builtin:synthetic_sentiment]", "victims: [builtin:synthetic_question]"
        ),
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
        GOOD.replace(
            "datasets: [builtin:synthetic_sentiment, builtin:synthetic_topic]", "datasets: []"
        ),
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
        GOOD.replace("op: task_arithmetic", "op: tiez").replace(
            "builtin:synthetic_topic]", "builtin:topik]"
        )
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


# ---- the table of bad studies -----------------------------------------------------------------
# Each entry: (name, the study file's content, expected key path, expected words). The content is
# text replacing GOOD, raw bytes, or a function writing the "file" under a directory and returning
# its path (for inputs that are not files at all). Every one must give exactly one line.


def _sub(old: str, new: str) -> str:
    assert old in GOOD, old
    return GOOD.replace(old, new)


def _scenario(body: str) -> str:
    return _sub("unprotected: {}", f"unprotected: {body}")


def _directory(tmp_path):
    d = tmp_path / "study.yaml"
    d.mkdir()
    return d


ROOT = "<root>"
BAD = [
    # not a study at all
    ("not UTF-8", "study: caf\xe9\n".encode("latin-1"), ROOT, "not UTF-8 text (byte 10: 0xe9)"),
    ("binary file", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", ROOT, "binary file"),
    ("a directory", _directory, ROOT, "is a directory"),
    ("empty file", "", ROOT, "is empty"),
    ("only comments", "# a study\n\n# to be written\n", ROOT, "is empty"),
    ("a YAML list", "- study: s\n- base: x\n", ROOT, "must be a YAML mapping"),
    ("a YAML scalar", "hello\n", ROOT, "not a str"),
    (
        "two YAML documents",
        GOOD + "---\n" + GOOD,
        ROOT,
        "one YAML document, and another starts here",
    ),
    ("tab indentation", GOOD + "evaluate:\n\tsplit: test\n", ROOT, "not valid YAML: line"),
    ("key given twice", GOOD + "merge: {op: ties}\n", ROOT, "key 'merge' is given twice"),
    (
        "alias bomb",
        "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
        + "".join(
            f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
            for p, c in zip("abcdef", "bcdefg", strict=True)
        )  # fmt: skip
        + GOOD,
        ROOT,
        "expands to more than",
    ),
    ("huge file", GOOD + "#" + "x" * (1 << 20) + "\n", ROOT, "a study file is at most"),
    ("number as top-level key", GOOD + "1: x\n", "1", "top-level keys must be names"),
    # types
    ("retries as text", GOOD + "retries: '1'\n", "retries", "valid integer"),
    ("switch as a number", GOOD + "allow_remote_code: 1\n", "allow_remote_code", "boolean"),
    ("study name as a number", _sub("study: s", "study: 5"), "study", "valid string"),
    (
        "datasets as one string",
        _sub(
            "datasets: [builtin:synthetic_sentiment, builtin:synthetic_topic]",
            "datasets: builtin:synthetic_sentiment",
        ),
        "datasets",
        "valid list",
    ),
    ("scenarios as a list", _sub("unprotected: {}", "[a, b]"), "scenarios", "dictionary"),
    ("fractional epochs", _sub("epochs: 1", "epochs: 2.5"), "finetune.epochs", "integer"),
    (
        "victims as a number",
        _sub("victims: [builtin:synthetic_sentiment]", "victims: 3"),
        "victims",
        "'all'",
    ),
    # ranges of op parameters
    ("zero learning rate", _sub("epochs: 1", "epochs: 1, lr: 0"), "finetune.lr", "greater than 0"),
    ("negative learning rate", _sub("epochs: 1", "epochs: 1, lr: -1.0e-5"), "finetune.lr", "> 0"),
    ("NaN learning rate", _sub("epochs: 1", "epochs: 1, lr: .nan"), "finetune.lr", "finite"),
    (
        "zero epochs",
        _sub("epochs: 1", "epochs: 0"),
        "finetune.epochs",
        "greater than or equal to 1",
    ),
    ("empty batches", _sub("epochs: 1", "epochs: 1, batch_size: 0"), "finetune.batch_size", ">= 1"),
    (
        "one-token inputs",
        _sub("epochs: 1", "epochs: 1, max_length: 1"),
        "finetune.max_length",
        ">= 2",
    ),
    ("negative seed", _sub("epochs: 1", "epochs: 1, seed: -1"), "finetune.seed", ">= 0"),
    (
        "seed too large",
        _sub("epochs: 1", "epochs: 1, seed: 4294967296"),
        "finetune.seed",
        "< 4294967296",
    ),
    (
        "warmup over 1",
        _sub("epochs: 1", "epochs: 1, warmup_ratio: 1.5"),
        "finetune.warmup_ratio",
        "<= 1",
    ),
    (
        "dropout of 1",
        _sub("mode: full", "mode: lora, dropout: 1.0"),
        "finetune.dropout",
        "less than 1",
    ),
    ("LoRA rank 0", _sub("mode: full", "mode: lora, r: 0"), "finetune.r", ">= 1"),
    (
        "TIES keeps nothing",
        _sub("op: task_arithmetic", "op: ties, k: 0"),
        "merge.k",
        "greater than 0",
    ),
    (
        "DARE drops everything",
        _sub("op: task_arithmetic", "op: dare_linear, drop_rate: 1.0"),
        "merge.drop_rate",
        "less than 1",
    ),
    (
        "rank fraction over 1",
        _sub("op: task_arithmetic", "op: cart, rank_fraction: 1.5"),
        "merge.rank_fraction",
        "<= 1",
    ),
    (
        "search candidate out of range",
        _sub(
            "op: task_arithmetic, coefficient: {search: [0.5, 1.0]}",
            "op: ties, k: {search: [0.2, 2]}",
        ),
        "merge.k.search",
        "less than or equal to 1",
    ),
    ("infinite coefficient", _sub("{search: [0.5, 1.0]}", ".inf"), "merge.coefficient", "finite"),
    (
        "unknown PaRaMS scaling",
        _scenario("{protect: {op: params, scaling: diag}}"),
        "scenarios.unprotected.protect.scaling",
        "'symmetric' or 'none'",
    ),
    (
        "scale range reversed",
        _scenario("{protect: {op: mergelock, scale_min: 5, scale_max: 1}}"),
        "scenarios.unprotected.protect.scale_min",
        "must not exceed scale_max",
    ),
    (
        "Trap2 scale of 0",
        _scenario("{protect: {op: trap2, s_min: 0}}"),
        "scenarios.unprotected.protect.s_min",
        "greater than 0",
    ),
    (
        "trimming every value",
        _scenario("{monitor: {op: weightwatch, trim_percentile: 60}}"),
        "scenarios.unprotected.monitor.trim_percentile",
        "less than 50",
    ),
    (
        "no rescale candidates",
        _scenario("{attack: {op: rescale, scales: []}}"),
        "scenarios.unprotected.attack.scales",
        "at least 1",
    ),
    (
        "attacker without examples",
        _scenario("{attack: {op: finetune_after_merge, n: 0}}"),
        "scenarios.unprotected.attack.n",
        ">= 1",
    ),
    (
        "boolean as a number",
        _scenario("{attack: {op: aga, match_mlp: 0}}"),
        "scenarios.unprotected.attack.match_mlp",
        "boolean",
    ),
    # ranges of study parameters
    (
        "poison rate 0",
        _scenario("{poison: {trigger: cf, rate: 0}}"),
        "scenarios.unprotected.poison.rate",
        "greater than 0",
    ),
    (
        "poison rate over 1",
        _scenario("{poison: {trigger: cf, rate: 1.5}}"),
        "scenarios.unprotected.poison.rate",
        "less than or equal to 1",
    ),
    (
        "blank trigger",
        _scenario("{poison: {trigger: '  '}}"),
        "scenarios.unprotected.poison.trigger",
        "besides spaces",
    ),
    (
        "negative target class",
        _scenario("{poison: {trigger: cf, target: -1}}"),
        "scenarios.unprotected.poison.target",
        "greater than or equal to 0",
    ),
    (
        "no cpu and no gpu",
        GOOD + "resources: {evaluate: {cpu: 0, gpu: 0}}\n",
        "resources.evaluate",
        "cpu > 0 or gpu > 0",
    ),
    (
        "more than one GPU for one op",
        GOOD + "resources: {finetune: {gpu: 1.5}}\n",
        "resources.finetune.gpu",
        "less than or equal to 1",
    ),
    ("infinite cpus", GOOD + "resources: {merge: {cpu: .inf}}\n", "resources.merge.cpu", "finite"),
    (
        "evaluation batch 0",
        GOOD + "evaluate: {batch_size: 0}\n",
        "evaluate.batch_size",
        "greater than or equal to 1",
    ),
    (
        "no search examples",
        GOOD + "evaluate: {search_examples: 0}\n",
        "evaluate.search_examples",
        ">= 1".replace(">= ", "greater than or equal to "),
    ),
    # merge search and LoRA merge spaces
    (
        "unknown merge search",
        GOOD.replace("{op: task_arithmetic,", "{op: task_arithmetic, search: grid,"),
        "merge.search",
        "'released'",
    ),
    (
        "released search of an op without a coefficient",
        GOOD.replace(
            "{op: task_arithmetic, coefficient: {search: [0.5, 1.0]}}",
            "{op: weight_average, search: released}",
        ),
        "merge.search",
        "needs an op with a coefficient; merge/weight_average has none",
    ),
    (
        "released search and a grid of the same op",
        GOOD.replace("{op: task_arithmetic,", "{op: task_arithmetic, search: released,"),
        "merge.coefficient",
        "search: released chooses the settings itself (it searches coefficient)",
    ),
    (
        "unknown merge space",
        GOOD.replace("{op: task_arithmetic,", "{op: task_arithmetic, space: svd,"),
        "merge.space",
        "'full', 'knots' or 'core'",
    ),
    (
        "a data-dependent op in a LoRA space",
        GOOD.replace(
            "{op: task_arithmetic, coefficient: {search: [0.5, 1.0]}}",
            "{op: regmean, space: knots}",
        ),
        "merge.space",
        "merge/regmean needs the layers' input Gram matrices",
    ),
    (
        "an attack inside a core-space merge",
        _scenario("{attack: {op: rescale}}").replace(
            "{op: task_arithmetic,", "{op: task_arithmetic, space: core,"
        ),
        "scenarios.unprotected.attack",
        "space: core merges the released LoRA factors",
    ),
    (
        "unknown reference row",
        GOOD + "references: [zero_shot]\n",
        "references.0",
        "'left_out'",
    ),
    (
        "left out with one dataset",
        GOOD.replace(
            "datasets: [builtin:synthetic_sentiment, builtin:synthetic_topic]",
            "datasets: [builtin:synthetic_sentiment]",
        )
        + "references: [left_out]\n",
        "references",
        "left_out merges the other experts; list two datasets or more",
    ),
    ("too many retries", GOOD + "retries: 11\n", "retries", "less than or equal to 10"),
    ("negative retries", GOOD + "retries: -1\n", "retries", "greater than or equal to 0"),
    (
        "no scales",
        GOOD + "diagnostics: {scale_curve: true, scales: []}\n",
        "diagnostics.scales",
        "at least 1",
    ),
    ("NaN scale", GOOD + "diagnostics: {scales: [0.5, .nan]}\n", "diagnostics.scales.1", "finite"),
    (
        "quote in experiment",
        GOOD + 'tracking: {experiment: "a\'b"}\n',
        "tracking.experiment",
        "without quotes",
    ),
    (
        "empty experiment",
        GOOD + "tracking: {experiment: ''}\n",
        "tracking.experiment",
        "1-200 characters",
    ),
    ("empty base", _sub("base: builtin:minilm-l6", "base: ''"), "base", "at least 1 character"),
    ("merge without op", _sub("op: task_arithmetic, ", ""), "merge.op", "required"),
    (
        "empty column name",
        _sub("builtin:synthetic_topic]", "{uri: data/t.csv, columns: {text: ' '}}]"),
        "datasets.1.columns",
        "non-empty name",
    ),
    (
        "example cap 0",
        _sub("builtin:synthetic_topic]", "{uri: builtin:synthetic_topic, examples: {train: 0}}]"),
        "datasets.1.examples.train",
        "greater than or equal to 1 (got 0)",
    ),
    (
        "negative example cap",
        _sub("builtin:synthetic_topic]", "{uri: builtin:synthetic_topic, examples: {test: -5}}]"),
        "datasets.1.examples.test",
        "greater than or equal to 1 (got -5)",
    ),
    (
        "fractional example cap",
        _sub(
            "builtin:synthetic_topic]",
            "{uri: builtin:synthetic_topic, examples: {validation: 0.5}}]",
        ),
        "datasets.1.examples.validation",
        "valid integer (got 0.5)",
    ),
    (
        "example cap as text",
        _sub(
            "builtin:synthetic_topic]", "{uri: builtin:synthetic_topic, examples: {train: '100'}}]"
        ),
        "datasets.1.examples.train",
        "valid integer (got '100')",
    ),
    (
        "example cap of an unknown split",
        _sub("builtin:synthetic_topic]", "{uri: builtin:synthetic_topic, examples: {dev: 100}}]"),
        "datasets.1.examples.dev",
        "unknown key 'dev'",
    ),
    (
        "example cap naming no split",
        _sub("builtin:synthetic_topic]", "{uri: builtin:synthetic_topic, examples: {}}]"),
        "datasets.1.examples",
        "name at least one split to cap: train, validation or test",
    ),
    (
        "example cap not a mapping",
        _sub("builtin:synthetic_topic]", "{uri: builtin:synthetic_topic, examples: 500}]"),
        "datasets.1.examples",
        "valid dictionary",
    ),
    (
        "empty dataset uri",
        _sub("builtin:synthetic_topic]", "{uri: ''}]"),
        "datasets.1.uri",
        "at least 1 character",
    ),
    # combinations
    (
        "slugs collide",
        _sub(
            "datasets: [builtin:synthetic_sentiment, builtin:synthetic_topic]",
            "datasets: [builtin:synthetic_sentiment, hf:glue/sst2, hf:glue_sst2]",
        ),
        "datasets.2",
        "same short name 'glue_sst2'",
    ),
    (
        "dataset twice",
        _sub("builtin:synthetic_topic]", "builtin:synthetic_topic, builtin:synthetic_topic]"),
        "datasets",
        "listed twice",
    ),
    (
        "victim twice",
        _sub(
            "victims: [builtin:synthetic_sentiment]",
            "victims: [builtin:synthetic_sentiment, builtin:synthetic_sentiment]",
        ),
        "victims.1",
        "listed twice",
    ),
    (
        "no victims",
        _sub("victims: [builtin:synthetic_sentiment]", "victims: []"),
        "victims",
        "at least 1",
    ),
    (
        "grid too large",
        _sub(
            "epochs: 1",
            "epochs: {grid: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]}, seed: {grid: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]}, batch_size: {grid: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]}, lr: {grid: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1]}",
        ),
        ROOT,
        "11000 variants; at most 10000",
    ),
]


def _write(tmp_path, content):
    if callable(content):
        return content(tmp_path)
    f = tmp_path / "study.yaml"
    if isinstance(content, bytes):
        f.write_bytes(content)
    else:
        f.write_text(content, encoding="utf-8")
    return f


def test_the_table_holds_at_least_40_bad_studies():
    assert len(BAD) + len(CASES) >= 40 + len(CASES)
    assert len({name for name, *_ in BAD + CASES}) == len(BAD) + len(CASES)


@pytest.mark.parametrize("name,content,path,words", BAD + CASES, ids=[c[0] for c in BAD + CASES])
def test_validator_refuses_with_one_line(tmp_path, name, content, path, words):
    from mergesec.orchestrator.errors import StudyError
    from mergesec.orchestrator.spec import load_study

    f = _write(tmp_path, content)
    with pytest.raises(StudyError) as e:
        load_study(f)
    lines = e.value.lines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"{f}: {path}: "), lines[0]
    assert words.lower() in lines[0].lower(), lines[0]
    assert "Traceback" not in lines[0]


# A sample of the table through the real command line, one process each, for every command that
# takes a study.
SAMPLE = {
    "not UTF-8": "plan",
    "a directory": "run",
    "empty file": "status",
    "binary file": "report",
    "slugs collide": "plan",
    "DARE drops everything": "run",
    "key given twice": "status",
    "example cap 0": "run",
}


@pytest.mark.parametrize("name", list(SAMPLE))
def test_real_command_line_sample(tmp_path, name):
    _, content, path, words = next(c for c in BAD if c[0] == name)
    f = _write(tmp_path, content)
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "mergesec.cli",
            SAMPLE[name],
            str(f),
            "--store",
            str(tmp_path / "st"),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert p.returncode == 2, p.stderr
    assert p.stdout == ""
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith(f"{f}: {path}: ") and words.lower() in lines[0].lower(), lines[0]
    assert not (tmp_path / "st").exists()


def test_yaml_12_floats_merge_keys_and_set_values(tmp_path):
    from mergesec.orchestrator.errors import StudyError
    from mergesec.orchestrator.spec import load_study

    f = tmp_path / "s.yaml"
    f.write_text(
        GOOD.replace("finetune: {mode: full, epochs: 1}", "finetune: {mode: full, lr: 1e-3}")
    )
    assert load_study(f).spec.finetune.params["lr"] == 0.001, "1e-3 is a number, as in YAML 1.2"
    assert load_study(f, ["finetune.lr=2e-4"]).spec.finetune.params["lr"] == 2e-4
    with pytest.raises(StudyError) as e:
        load_study(f, ["finetune.lr=[1, 2"])
    assert e.value.problems[0][0] == "--set" and "not valid YAML" in e.value.problems[0][1]
    with pytest.raises(StudyError) as e:
        load_study(f, ["finetune.lr='1e-3'"])
    assert e.value.lines() == [
        f"{f}: finetune.lr: input should be a valid number (expected float > 0, got '1e-3')"
    ]
