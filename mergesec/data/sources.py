"""Datasets from Hugging Face (the hub or a ``save_to_disk`` directory) and local CSV/TSV/JSONL files.

Both end up as ``DatasetSplits``: texts and integer labels, label names from a ``ClassLabel``
feature when there is one, else from the label values (integers keep their numbering; strings
are sorted), and missing splits carved from train deterministically (see ``complete_splits``).
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar

from mergesec.data.splits import SPLIT_NAMES, DatasetSplits, Example, complete_splits

T = TypeVar("T")

FILE_SUFFIXES = (".csv", ".jsonl", ".tsv")
COLUMN_KEYS = ("text", "label", "split")
TEXT_COLUMNS = ("text", "sentence", "content", "review", "question", "document", "utterance")
LABEL_COLUMNS = ("label", "labels", "class", "target")
SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "validation": "validation",
    "valid": "validation",
    "val": "validation",
    "dev": "validation",
    "test": "test",
    "testing": "test",
}
HF_FORMS = (
    "hf:<name>[/<config>][@<revision>], hf:<org>/<name>/<config>, "
    "or hf:/path/to/a/save_to_disk/directory"
)
_HF_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]*$")
_INT = re.compile(r"^[+-]?\d+$")

Rows = dict[str, list[tuple[str, Any]]]  # split -> [(text, raw label)]


# ---------------------------------------------------------------------------------------------
# URI parsing and cheap checks
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HfRef:
    """A parsed ``hf:`` reference: a hub dataset (name, config, revision) or a local directory.

    ``name/config`` with one slash is ambiguous with an ``org/name`` hub repository; it is read
    as name and config first (``hf:glue/sst2``) and as a repository if no such dataset exists.
    """

    name: str = ""
    config: str | None = None
    revision: str | None = None
    path: Path | None = None
    ambiguous: bool = False


def is_path_like(rest: str) -> bool:
    """Whether the part after ``hf:`` names a local directory rather than a hub dataset."""
    return rest.startswith(("/", "./", "../", "~")) or rest in (".", "..")


def hf_parts(rest: str) -> tuple[str, str | None, str | None]:
    """``(repo, config, revision)`` of what follows ``hf:`` (``org/name[/config][@rev]``), without
    the checks of ``parse_hf``: for datasets found by name in a registry (images, QA)."""
    spec, _, rev = rest.partition("@")
    parts = spec.split("/")
    if len(parts) == 3:
        return f"{parts[0]}/{parts[1]}", parts[2], rev or None
    return spec, None, rev or None


def load_registered_hub(uri: str, info: Any) -> Any:
    """The hub dataset ``hf:<repo>[/<config>][@revision]`` as a ``datasets.DatasetDict``; a
    registered entry's ``config`` fills in when the URI names its repo without one."""
    import datasets

    repo, config, rev = hf_parts(uri[3:])
    if info is not None and repo.lower() == info.hub_id.lower() and config is None:
        config = info.config
    return as_dataset_dict(datasets.load_dataset(repo, config, revision=rev))


def as_dataset_dict(obj: Any) -> Any:
    """A lone ``datasets.Dataset`` becomes the ``train`` split of a ``DatasetDict``."""
    import datasets

    return datasets.DatasetDict({"train": obj}) if isinstance(obj, datasets.Dataset) else obj


def local_path(uri: str) -> Path | None:
    """The local path a dataset URI names (``hf:./dir``, ``hf:/abs``, or a bare path), else None
    (a hub dataset or another scheme)."""
    if uri.startswith("hf:"):
        rest = uri[3:]
        return Path(rest).expanduser() if is_path_like(rest) else None
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]+:", uri):
        return None
    return Path(uri).expanduser()


def find_registered(uri: str, lookup: Callable[[str], T | None]) -> T | None:
    """The registry entry ``lookup`` finds for a dataset URI: by a local path's name (or its stem,
    for files), else by the hub repo id, its config, or either part of the repo id."""
    path = local_path(uri)
    if path is not None:
        return lookup(path.name) or lookup(path.stem)
    if uri.startswith("hf:"):
        repo, config, _ = hf_parts(uri[3:])
        for name in (repo, config or "", *reversed(repo.split("/"))):
            info = lookup(name)
            if info is not None:
                return info
    return None


def parse_hf(rest: str) -> HfRef:
    """Parse what follows ``hf:``; raises ``ValueError`` naming the accepted forms."""
    if is_path_like(rest):
        return HfRef(path=Path(rest).expanduser())
    spec, revision = rest, None
    if "@" in rest:
        spec, revision = rest.split("@", 1)
        if not _REVISION.match(revision):
            raise ValueError(f"malformed Hugging Face dataset 'hf:{rest}'; use {HF_FORMS}")
    parts = spec.split("/")
    if not 1 <= len(parts) <= 3 or not all(_HF_PART.match(p) for p in parts):
        raise ValueError(f"malformed Hugging Face dataset 'hf:{rest}'; use {HF_FORMS}")
    if len(parts) == 1:
        return HfRef(name=parts[0], revision=revision)
    if len(parts) == 2:
        return HfRef(name=parts[0], config=parts[1], revision=revision, ambiguous=True)
    return HfRef(name=f"{parts[0]}/{parts[1]}", config=parts[2], revision=revision)


@lru_cache(maxsize=64)
def saved_features(path: Path) -> Any | None:
    """The features of a ``save_to_disk`` directory's first split (None when it does not open as
    a dataset: the loaders report that); read once per directory per process, for the checks
    that decide a dataset's kind."""
    import datasets

    try:
        obj = datasets.load_from_disk(str(path))
    except Exception:
        return None
    first = obj[next(iter(obj))] if isinstance(obj, datasets.DatasetDict) else obj
    return first.features


def is_saved_dataset_dir(path: Path) -> bool:
    """Whether ``path`` looks like a directory written by ``save_to_disk``."""
    return path.is_dir() and any(
        (path / marker).is_file() for marker in ("dataset_dict.json", "state.json")
    )


def check_saved_dir(path: Path, shown: str) -> str | None:
    """None if ``path`` is a ``save_to_disk`` directory, else a one-line problem."""
    if not path.exists():
        return f"directory not found: {shown}"
    if not is_saved_dataset_dir(path):
        return (
            f"not a saved dataset directory (no dataset_dict.json or state.json): {shown}; "
            "write one with datasets' save_to_disk"
        )
    return None


def check_path(shown: str) -> str | None:
    """None if ``shown`` is a readable dataset file or saved directory, else a one-line problem."""
    path = Path(shown).expanduser()
    if path.is_dir():
        return check_saved_dir(path, shown)
    suffix = path.suffix.lower()
    allowed = ", ".join(FILE_SUFFIXES)
    if suffix not in FILE_SUFFIXES:
        what = "file not found" if not path.exists() else "unsupported file type"
        return (
            f"{what}: {shown}; a dataset file must end in {allowed} "
            "(or use builtin:<name>, hf:<name>[/<config>], or a save_to_disk directory)"
        )
    if not path.is_file():
        return f"file not found: {shown}"
    return None


# ---------------------------------------------------------------------------------------------
# Columns and labels
# ---------------------------------------------------------------------------------------------


def _pick_column(
    key: str,
    available: Sequence[str],
    columns: Mapping[str, str],
    defaults: Sequence[str],
    where: str,
) -> str | None:
    if key in columns:
        name = columns[key]
        if name not in available:
            raise ValueError(
                f"{where}: no column {name!r} for {key} (columns: {', '.join(available)})"
            )
        return name
    return next((c for c in defaults if c in available), None)


def resolve_columns(
    available: Sequence[str], columns: Mapping[str, str] | None, where: str, *, with_split: bool
) -> tuple[str, str, str | None]:
    """The text, label and (files only) split column names, from ``columns`` or by convention."""
    columns = dict(columns or {})
    unknown = sorted(set(columns) - set(COLUMN_KEYS if with_split else COLUMN_KEYS[:2]))
    if unknown:
        allowed = ", ".join(COLUMN_KEYS if with_split else COLUMN_KEYS[:2])
        raise ValueError(f"{where}: unknown columns key {unknown[0]!r}; allowed: {allowed}")
    text = _pick_column("text", available, columns, TEXT_COLUMNS, where)
    label = _pick_column("label", available, columns, LABEL_COLUMNS, where)
    split = _pick_column("split", available, columns, ("split",), where) if with_split else None
    for key, found in (("text", text), ("label", label)):
        if found is None:
            raise ValueError(
                f"{where}: no {key} column found (columns: {', '.join(available)}); "
                f"pass columns={{'{key}': '<column>'}}"
            )
    if text == label:
        raise ValueError(f"{where}: text and label cannot both be column {text!r}")
    return text, label, split  # type: ignore[return-value]


def _label_key(value: Any) -> int | str:
    if isinstance(value, (list, tuple, dict)):
        raise ValueError(f"unsupported label {value!r}: one integer or string label per example")
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    text = str(value).strip()
    return int(text) if _INT.match(text) else text


def _is_labelled(value: Any) -> bool:
    if value is None:
        return False
    key = _label_key(value)
    return key != "" and not (isinstance(key, int) and key < 0)


def encode_labels(
    rows: Rows, class_names: Sequence[str] | None, where: str
) -> tuple[tuple[str, ...], dict[str, list[Example]]]:
    """Turn raw labels into indices and label names.

    With ``class_names`` (a ClassLabel) integer labels index them and strings are looked up by
    name. Otherwise, if every label is an integer (or an integer string) the labels keep their
    numbers and are named ``"0".."max"``; else every label is treated as a string and the sorted
    distinct strings are the names.
    """
    keys = {split: [(t, _label_key(v)) for t, v in pairs] for split, pairs in rows.items()}
    values = [k for pairs in keys.values() for _, k in pairs]
    if class_names is not None:
        names = tuple(class_names)
        index = {n: i for i, n in enumerate(names)}

        def to_int(k: int | str) -> int:
            i = k if isinstance(k, int) else index.get(k, -1)
            if not 0 <= i < len(names):
                raise ValueError(f"{where}: label {k!r} is not one of {', '.join(names)}")
            return i

    elif all(isinstance(k, int) for k in values):
        names = tuple(str(i) for i in range(max(values, default=0) + 1))

        def to_int(k: int | str) -> int:
            return int(k)

    else:
        names = tuple(sorted({str(k) for k in values}))
        index = {n: i for i, n in enumerate(names)}

        def to_int(k: int | str) -> int:
            return index[str(k)]

    return names, {s: [Example(t, to_int(k)) for t, k in pairs] for s, pairs in keys.items()}


def assemble(name: str, rows: Rows, class_names: Sequence[str] | None, seed: int) -> DatasetSplits:
    """Encode labels, complete missing splits and build the ``DatasetSplits``."""
    if not rows.get("train"):
        present = ", ".join(s for s in SPLIT_NAMES if rows.get(s)) or "none"
        raise ValueError(f"{name}: no labelled train examples (labelled splits: {present})")
    label_names, examples = encode_labels(rows, class_names, name)
    train, validation, test = complete_splits(
        examples["train"], examples.get("validation"), examples.get("test"), seed
    )
    return DatasetSplits(name, label_names, train, validation, test)


# ---------------------------------------------------------------------------------------------
# Hugging Face
# ---------------------------------------------------------------------------------------------


def _open_hf(ref: HfRef) -> Any:
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    if ref.path is not None:
        obj = datasets.load_from_disk(str(ref.path))
    else:
        try:
            obj = datasets.load_dataset(ref.name, ref.config, revision=ref.revision)
        except DatasetNotFoundError:
            if not ref.ambiguous:
                raise
            obj = datasets.load_dataset(f"{ref.name}/{ref.config}", revision=ref.revision)
    if isinstance(obj, datasets.Dataset):
        obj = datasets.DatasetDict({"train": obj})
    return obj


def load_hf(
    ref: HfRef, *, name: str, columns: Mapping[str, str] | None, seed: int
) -> DatasetSplits:
    """Load a hub dataset or a ``save_to_disk`` directory as ``DatasetSplits``.

    Splits are matched by name (train; validation/valid/val/dev; test); other splits are ignored.
    Rows without text or with a missing or negative label (hidden test labels) are dropped,
    and a split left empty counts as missing.
    """
    import datasets

    dsdict = _open_hf(ref)
    chosen: dict[str, Any] = {}
    for split_name in dsdict:
        canon = SPLIT_ALIASES.get(str(split_name).lower())
        if canon and canon not in chosen:
            chosen[canon] = dsdict[split_name]
    if "train" not in chosen:
        raise ValueError(f"{name}: no train split (splits: {', '.join(map(str, dsdict))})")
    features = chosen["train"].features
    text_col, label_col, _ = resolve_columns(list(features), columns, name, with_split=False)
    feature = features[label_col]
    class_names = list(feature.names) if isinstance(feature, datasets.ClassLabel) else None
    rows: Rows = {}
    for split, ds in chosen.items():
        missing = [c for c in (text_col, label_col) if c not in ds.column_names]
        if missing:
            raise ValueError(f"{name}: split {split} has no column {missing[0]!r}")
        data = ds.select_columns([text_col, label_col]).to_dict()
        pairs = [
            (str(t), v)
            for t, v in zip(data[text_col], data[label_col], strict=True)
            if t is not None and _is_labelled(v)
        ]
        if pairs:
            rows[split] = pairs
    return assemble(name, rows, class_names, seed)


# ---------------------------------------------------------------------------------------------
# Local files
# ---------------------------------------------------------------------------------------------


def _read_records(path: Path) -> tuple[list[str], list[tuple[int, dict[str, Any]]]]:
    """Column names and ``(line number, record)`` pairs of a CSV, TSV or JSONL file."""
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
            records = [(reader.line_num, dict(row)) for row in reader]
            return list(reader.fieldnames or []), records
    records = []
    fields: dict[str, None] = {}
    with path.open(encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object per line")
            fields.update(dict.fromkeys(obj))
            records.append((lineno, obj))
    return list(fields), records


def load_file(
    path: Path, *, name: str, columns: Mapping[str, str] | None, seed: int
) -> DatasetSplits:
    """Load a ``.csv``, ``.tsv`` or ``.jsonl`` file of texts and labels as ``DatasetSplits``.

    A ``split`` column (train, validation/valid/val/dev, test) assigns rows to splits;
    without one the rows are divided 70/10/20 by a seeded, label-stratified draw.
    """
    fields, records = _read_records(path)
    if not records:
        raise ValueError(f"{name}: the file has no rows")
    text_col, label_col, split_col = resolve_columns(fields, columns, name, with_split=True)
    rows: Rows = {}
    for lineno, rec in records:
        text, label = rec.get(text_col), rec.get(label_col)
        if not isinstance(text, str):
            raise ValueError(f"{path}:{lineno}: missing or non-text value in column {text_col!r}")
        if label is None or (isinstance(label, str) and not label.strip()):
            raise ValueError(f"{path}:{lineno}: missing label in column {label_col!r}")
        split = "train"
        if split_col is not None:
            raw = str(rec.get(split_col) or "").strip().lower()
            if raw not in SPLIT_ALIASES:
                raise ValueError(
                    f"{path}:{lineno}: unknown split {raw!r} in column {split_col!r}; "
                    "allowed: train, validation (valid, val, dev), test"
                )
            split = SPLIT_ALIASES[raw]
        rows.setdefault(split, []).append((text, label))
    return assemble(name, rows, None, seed)
