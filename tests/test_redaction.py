"""Credentials in store and tracking URIs never reach what is shown, tagged or named."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from mergesec.cli import app
from mergesec.core.uris import REDACTED, has_credentials, redact_text, redact_uri

CASES = [
    ("s3://AKIAEXAMPLE:wJalrXUtnFEMI@bucket/store", "s3://REDACTED@bucket/store"),
    ("gs://user@bucket/x", "gs://REDACTED@bucket/x"),
    ("http://admin:hunter2@mlflow.internal:5000", "http://REDACTED@mlflow.internal:5000"),
    ("postgresql://mlflow:pw@db:5432/mlflow", "postgresql://REDACTED@db:5432/mlflow"),
    (
        "s3://bucket/x?endpoint_override=127.0.0.1:9000&access_key=AK&secret_key=SK&scheme=http",
        "s3://bucket/x?endpoint_override=127.0.0.1:9000&access_key=REDACTED"
        "&secret_key=REDACTED&scheme=http",
    ),
    (
        "https://b.s3.amazonaws.com/k?X-Amz-Credential=AK%2F2026&X-Amz-Signature=abc&X-Amz-Expires=60",
        "https://b.s3.amazonaws.com/k?X-Amz-Credential=REDACTED&X-Amz-Signature=REDACTED"
        "&X-Amz-Expires=60",
    ),
    ("https://acct.blob.core.windows.net/c?sv=2022&sig=s3cr3t", None),
    ("s3://bucket/x?session_token=tok&region=eu-west-1", None),
    ("abfs://c@acct.dfs.core.windows.net/x?client_secret=cs", None),
]
CLEAN = ["mergesec-store", "/abs/store", "file:///abs/store", "s3://bucket/prefix?region=us-east-1"]
SECRETS = ["wJalrXUtnFEMI", "hunter2", ":pw@", "SK&", "abc&", "s3cr3t", "tok&", "=cs"]


@pytest.mark.parametrize("uri,expected", CASES)
def test_redact_uri(uri, expected):
    out = redact_uri(uri)
    if expected is not None:
        assert out == expected
    assert REDACTED in out and has_credentials(uri)
    assert not any(s in out for s in SECRETS), out
    assert redact_uri(out) == out, "redacting twice changes nothing"


@pytest.mark.parametrize("uri", CLEAN)
def test_uris_without_credentials_are_unchanged(uri):
    assert redact_uri(uri) == uri and not has_credentials(uri)


def test_two_credentials_one_store_one_name():
    a = redact_uri("s3://AK1:SK1@bucket/store")
    assert a == redact_uri("s3://AK2:SK2@bucket/store")


def test_redact_text_finds_uris_in_messages():
    msg = "cannot open s3://AK:SECRET@bucket/x: denied; tracking http://u:p@h:5000 is down"
    assert redact_text(msg) == (
        "cannot open s3://REDACTED@bucket/x: denied; tracking http://REDACTED@h:5000 is down"
    )


def test_bad_store_uri_is_one_line_without_the_secret(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text(
        "study: s\nbase: builtin:minilm-l6\ndatasets: [builtin:synthetic_sentiment, builtin:synthetic_topic]\n"
        "scenarios: {unprotected: {}}\nmerge: {op: task_arithmetic}\n"
    )
    uri = "s3://AKIAEXAMPLE:TOPSECRET@bucket/x?bogus_option=1"
    for command in ("plan", "status", "report"):
        r = CliRunner().invoke(app, [command, str(f), "--store", uri])
        assert r.exit_code == 2, r.output
        assert "TOPSECRET" not in r.output and "Traceback" not in r.output
        lines = [x for x in r.output.splitlines() if x.strip()]
        assert len(lines) == 1 and lines[0].startswith("--store s3://REDACTED@bucket/x"), lines


def test_trials_open_the_full_uri_their_config_only_shows_redacted():
    from mergesec.core.uris import STORE_URI_ENV, trial_store_uri

    full = "s3://AK:SK@bucket/store?endpoint_override=127.0.0.1:9000"
    shown = redact_uri(full)
    assert "SK" not in shown
    assert trial_store_uri(shown, {STORE_URI_ENV: full}) == full
    assert trial_store_uri(shown, {}) == shown
    # a config naming another store is never swapped for the environment's
    assert trial_store_uri("/other/store", {STORE_URI_ENV: full}) == "/other/store"
    assert trial_store_uri("s3://REDACTED@elsewhere/x", {STORE_URI_ENV: full}) == (
        "s3://REDACTED@elsewhere/x"
    )
