"""URIs without their credentials, for anything that is shown, logged, tagged or made a name.

A store or tracking URI may carry secrets: userinfo (``s3://KEY:SECRET@bucket/x``,
``http://user:pass@mlflow:5000``) or query parameters (pyarrow's ``?secret_key=``, presigned
``?X-Amz-Signature=``, Azure ``?sig=``). ``redact_uri`` replaces them with ``REDACTED`` and keeps
everything else, so two URIs that differ only in credentials redact to the same text (one cache
directory for one store, whoever's keys reach it).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from urllib.parse import parse_qsl, quote, urlsplit, urlunsplit

REDACTED = "REDACTED"
# Query parameters whose value is a secret (compared case-insensitively).
SECRET_PARAMS = frozenset(
    {
        "access_key",
        "secret_key",
        "session_token",
        "token",
        "access_token",
        "password",
        "passwd",
        "client_secret",
        "sig",
        "signature",
        "x-amz-signature",
        "x-amz-credential",
        "x-amz-security-token",
        "awsaccesskeyid",
        "x-goog-signature",
        "x-goog-credential",
        "api_key",
        "apikey",
        "key",
        "credential",
        "sas_token",
        "account_key",
    }
)
_SECRET_WORDS = ("secret", "password", "token", "signature", "credential")
# Characters left as they are in non-secret query values, so the redacted URI stays readable.
_SAFE = ":/,"
_URI_IN_TEXT = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>`]+")


def _is_secret(name: str) -> bool:
    n = name.lower()
    return n in SECRET_PARAMS or any(w in n for w in _SECRET_WORDS)


def redact_uri(uri: str) -> str:
    """``uri`` with userinfo and secret query values replaced by ``REDACTED``.

    Plain paths and URIs without credentials come back unchanged.
    """
    if "://" not in uri:
        return uri
    try:
        parts = urlsplit(uri)
    except ValueError:  # e.g. an unbalanced IPv6 bracket: hide everything after the scheme
        return uri.split("://", 1)[0] + "://" + REDACTED
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{REDACTED}@{netloc.rsplit('@', 1)[1]}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(_is_secret(k) for k, _ in pairs):
            query = "&".join(
                f"{quote(k, safe='')}={REDACTED if _is_secret(k) else quote(v, safe=_SAFE)}"
                for k, v in pairs
            )
    if netloc == parts.netloc and query == parts.query:
        return uri
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact_text(text: str) -> str:
    """``text`` (an error message, a log line) with every URI in it redacted."""
    return _URI_IN_TEXT.sub(lambda m: redact_uri(m.group(0)), text)


def has_credentials(uri: str) -> bool:
    """Whether ``uri`` carries userinfo or a secret query parameter."""
    return redact_uri(uri) != uri


# The full store URI, credentials included, for Ray workers: set in the job's runtime_env, which
# Tune does not write into trial files, while trial configs carry only the redacted URI.
STORE_URI_ENV = "MERGESEC_STORE_URI"


def trial_store_uri(shown: str, env: Mapping[str, str] | None = None) -> str:
    """The store URI a trial opens: ``shown`` (its config's), or the full URI in
    ``$MERGESEC_STORE_URI`` when ``shown`` is that URI redacted."""
    full = (os.environ if env is None else env).get(STORE_URI_ENV)
    if full and full != shown and redact_uri(full) == shown:
        return full
    return shown
