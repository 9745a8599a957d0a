"""Question/answer datasets for causal language models (GSM8K style: the answer ends ``#### 42``).

A dataset URI names a QA dataset when

- it is ``builtin:synthetic_arithmetic``: GSM8K-like one- and two-step word problems on small numbers,
  generated offline and deterministically, each answer a short worked solution ending in
  ``#### <number>``;
- it is ``hf:<hub id>[/<config>]`` of a registered dataset (``QA_DATASETS``: GSM8K, ASDiv), or a
  mirror whose last path component is a registered name;
- it is a local ``save_to_disk`` directory or ``.jsonl`` file whose columns hold ``question`` and
  ``answer`` (names mappable with ``columns: {question: ..., answer: ...}``; ``text``/``label`` are
  accepted as aliases) and no ``label`` column.

An unregistered dataset decodes at most as many new tokens as its longest reference answer has
bytes, plus 8 (``answer_budget``; 256 at most), so short-answer sets score quickly.

Split conventions (Trap²'s LLM protocol): GSM8K holds out 10% of train as validation (seed 42) and
keeps its test split; ASDiv (one split) is divided 70/15/15 with seed 42. Answers that are a bare
value (ASDiv's ``9 (apples)``) are stored as ``#### 9`` so every dataset has one answer format.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from mergesec.data.sources import (
    as_dataset_dict,
    find_registered,
    is_saved_dataset_dir,
    load_registered_hub,
    local_path,
    saved_features,
)

FINAL_MARK = "####"
QA_SEED = 42
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


@dataclass(frozen=True)
class QAExample:
    """One problem: the question text and the reference answer (worked solution, ``#### value``)."""

    question: str
    answer: str


@dataclass(frozen=True)
class QADatasetInfo:
    """A registered QA dataset: where it lives, its columns and how long its answers run."""

    name: str
    hub_id: str
    config: str | None = None
    question_column: str = "question"
    answer_column: str = "answer"
    context_column: str | None = None
    answer_is_value: bool = False
    max_length: int = 512
    max_new_tokens: int = 256
    aliases: tuple[str, ...] = ()


QA_DATASETS: dict[str, QADatasetInfo] = {
    "gsm8k": QADatasetInfo("gsm8k", "openai/gsm8k", config="main"),
    "asdiv": QADatasetInfo(
        "asdiv",
        "EleutherAI/asdiv",
        context_column="body",
        answer_is_value=True,
        max_length=256,
        max_new_tokens=32,
    ),  # fmt: skip
}
ARITHMETIC = QADatasetInfo("synthetic_arithmetic", "", max_length=256, max_new_tokens=64)
ARITHMETIC_SIZES = (1000, 100, 200)


@dataclass(frozen=True)
class QASplits:
    """A QA dataset: train, validation and test examples plus its sequence-length settings."""

    name: str
    train: tuple[QAExample, ...]
    validation: tuple[QAExample, ...]
    test: tuple[QAExample, ...]
    max_length: int = 512
    max_new_tokens: int = 256
    info: QADatasetInfo | None = field(default=None, compare=False)

    kind = "qa"
    label_names: tuple[str, ...] = ()

    def split(self, name: str) -> tuple[QAExample, ...]:
        if name not in ("train", "validation", "test"):
            raise KeyError(f"unknown split {name!r}; known: train, validation, test")
        return getattr(self, name)


# ---------------------------------------------------------------------------------------------
# Builtin arithmetic
# ---------------------------------------------------------------------------------------------

_NAMES = ("Ada", "Ben", "Chen", "Dana", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jo", "Kai", "Lena")
_ITEMS = ("apples", "books", "coins", "marbles", "pens", "stamps", "shells", "cards")


def _problem(rng: random.Random) -> QAExample:
    name, items = rng.choice(_NAMES), rng.choice(_ITEMS)
    kind = rng.randrange(4)
    a, b = rng.randint(2, 20), rng.randint(2, 20)
    if kind == 0:
        c = a + b
        q = f"{name} has {a} {items}. {name} buys {b} more. How many {items} does {name} have now?"
        sol = f"{name} has {a} {items} and buys {b} more, so {a} + {b} = {c}."
    elif kind == 1:
        a, b = max(a, b) + 1, min(a, b)
        c = a - b
        q = f"{name} has {a} {items} and gives {b} away. How many {items} are left?"
        sol = f"{name} gives {b} of {a} {items} away, so {a} - {b} = {c}."
    elif kind == 2:
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        c = a * b
        q = f"{name} buys {a} boxes of {items} with {b} {items} in each box. How many {items} is that?"
        sol = f"{a} boxes of {b} {items} make {a} * {b} = {c}."
    else:
        d = rng.randint(1, a + b - 1)
        c = a + b - d
        q = (
            f"{name} has {a} {items}, finds {b} more and then loses {d}. "
            f"How many {items} does {name} have?"
        )
        sol = f"After finding {b}, {name} has {a} + {b} = {a + b}. After losing {d}: {a + b} - {d} = {c}."
    return QAExample(q, f"{sol}\n{FINAL_MARK} {c}")


def arithmetic_splits(sizes: tuple[int, int, int] = ARITHMETIC_SIZES) -> QASplits:
    """The ``builtin:synthetic_arithmetic`` dataset: deterministic word problems, train/validation/test."""
    out = []
    for split, n in zip(("train", "validation", "test"), sizes, strict=True):
        rng = random.Random(f"arithmetic/{split}")
        out.append(tuple(_problem(rng) for _ in range(n)))
    return QASplits(
        "builtin:synthetic_arithmetic", *out, max_length=ARITHMETIC.max_length,
        max_new_tokens=ARITHMETIC.max_new_tokens, info=ARITHMETIC,
    )  # fmt: skip


def qa_builtin_names() -> list[str]:
    """Names of the builtin QA datasets (``builtin:<name>``)."""
    return ["synthetic_arithmetic"]


# ---------------------------------------------------------------------------------------------
# Answers
# ---------------------------------------------------------------------------------------------


def as_final_answer(value: str) -> str:
    """``"9 (apples)"`` -> ``"#### 9"``: a bare answer value in the GSM8K answer format."""
    m = _NUMBER.search(value)
    return f"{FINAL_MARK} {m.group(0).replace(',', '') if m else value.strip()}"


def answer_budget(rows: Sequence[QAExample], cap: int = 256) -> int:
    """Greedy decoding length for an unregistered dataset: its longest reference answer in UTF-8
    bytes (a byte-level tokenizer never needs more tokens) plus a margin, at most ``cap``.

    Short-answer sets (``#### fresh``) then decode a few tokens instead of ``cap``."""
    longest = max((len(r.answer.encode("utf-8")) for r in rows), default=cap)
    return min(cap, longest + 8)


# ---------------------------------------------------------------------------------------------
# Resolving and loading
# ---------------------------------------------------------------------------------------------


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def qa_info_by_name(name: str) -> QADatasetInfo | None:
    """The registered QA dataset whose hub id, name or alias matches ``name``, else None."""
    for info in QA_DATASETS.values():
        if name.lower() == info.hub_id.lower():
            return info
    key = _norm(name)
    for info in QA_DATASETS.values():
        if key and key in {_norm(info.name), *map(_norm, info.aliases)}:
            return info
    return None


def register_qa_dataset(info: QADatasetInfo) -> None:
    """Add or replace a registered QA dataset."""
    QA_DATASETS[info.name] = info
    clear_qa_cache()


def _qa_columns(
    available: Sequence[str], columns: Mapping[str, str] | None
) -> tuple[str, str] | None:
    cols = dict(columns or {})
    q = cols.get("question") or cols.get("text") or "question"
    a = cols.get("answer") or cols.get("label") or "answer"
    return (q, a) if q in available and a in available else None


def _looks_qa(available: Sequence[str], columns: Mapping[str, str] | None) -> bool:
    """QA when the mapping names a question or answer column; a text/label mapping means text
    classification; unmapped, ``question`` and ``answer`` columns without a label column."""
    cols = dict(columns or {})
    if "question" in cols or "answer" in cols:
        return True
    if "text" in cols or "label" in cols:
        return False
    return {"question", "answer"} <= set(available) and not any(
        c in available for c in ("label", "labels")
    )


def _jsonl_fields(path: Path) -> list[str]:
    with path.open(encoding="utf-8-sig") as f:
        for line in f:
            if line.strip():
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    return []
                return list(obj) if isinstance(obj, dict) else []
    return []


@lru_cache(maxsize=256)
def _is_qa(uri: str, columns: tuple[tuple[str, str], ...]) -> bool:
    if uri.startswith("builtin:"):
        return uri.split(":", 1)[1] in qa_builtin_names()
    cols = dict(columns)
    path = local_path(uri)
    if path is not None:
        if path.is_file() and path.suffix.lower() == ".jsonl":
            return _looks_qa(_jsonl_fields(path), cols)
        if is_saved_dataset_dir(path):
            features = saved_features(path)
            return features is not None and _looks_qa(list(features), cols)
        return False
    if uri.startswith("hf:"):
        return (
            find_registered(uri, qa_info_by_name) is not None
            or "question" in cols
            or "answer" in cols
        )
    return False


def is_qa_uri(uri: str, columns: Mapping[str, str] | None = None) -> bool:
    """Whether ``uri`` (with its column mapping) names a QA dataset; never downloads."""
    return _is_qa(uri.strip(), tuple(sorted((columns or {}).items())))


def _split3(rows: list[QAExample], seed: int) -> tuple[list, list, list]:
    idx = list(range(len(rows)))
    random.Random(seed).shuffle(idx)
    n_train, n_val = round(0.7 * len(rows)), round(0.15 * len(rows))
    pick = [[rows[i] for i in idx[a:b]] for a, b in
            ((0, n_train), (n_train, n_train + n_val), (n_train + n_val, len(rows)))]  # fmt: skip
    return pick[0], pick[1], pick[2]


def _carve(rows: list[QAExample], fraction: float, seed: int) -> tuple[list, list]:
    idx = list(range(len(rows)))
    random.Random(seed).shuffle(idx)
    held = set(idx[: max(1, round(fraction * len(rows)))])
    return [r for i, r in enumerate(rows) if i not in held], [
        r for i, r in enumerate(rows) if i in held
    ]


def _rows(ds: Any, q: str, a: str, info: QADatasetInfo | None) -> list[QAExample]:
    ctx = info.context_column if info else None
    data = ds.to_dict() if hasattr(ds, "to_dict") else ds
    out = []
    for i in range(len(data[q])):
        question, answer = data[q][i], data[a][i]
        if question is None or answer is None:
            continue
        question = str(question).strip()
        if ctx and data.get(ctx) and data[ctx][i]:
            question = f"{str(data[ctx][i]).strip()} {question}"
        answer = str(answer).strip()
        if (info and info.answer_is_value) or FINAL_MARK not in answer:
            answer = as_final_answer(answer)
        out.append(QAExample(question, answer))
    return out


@lru_cache(maxsize=16)
def _load_cached(uri: str, columns: tuple[tuple[str, str], ...]) -> QASplits:
    if uri == "builtin:synthetic_arithmetic":
        return arithmetic_splits()
    import datasets

    info = find_registered(uri, qa_info_by_name)
    path = local_path(uri)
    if path is not None and path.is_file():
        records = [
            json.loads(x) for x in path.read_text(encoding="utf-8-sig").splitlines() if x.strip()
        ]
        obj = datasets.DatasetDict({"train": datasets.Dataset.from_list(records)})
    elif path is not None:
        obj = as_dataset_dict(datasets.load_from_disk(str(path)))
    else:
        obj = load_registered_hub(uri, info)
    splits = {}
    for name in obj:
        canon = {"valid": "validation", "val": "validation", "dev": "validation"}.get(
            str(name).lower(), str(name).lower()
        )
        if canon in ("train", "validation", "test") and canon not in splits:
            splits[canon] = obj[name]
    first = next(iter(splits.values()), None)
    if first is None:
        raise ValueError(f"{uri}: no train, validation or test split")
    cols = dict(columns)
    if info is not None and not cols:
        cols = {"question": info.question_column, "answer": info.answer_column}
    qa = _qa_columns(list(first.features), cols)
    if qa is None:
        raise ValueError(
            f"{uri}: no question/answer columns (columns: {', '.join(first.features)}); "
            "name them with columns: {question: <column>, answer: <column>}"
        )
    rows = {k: _rows(v, *qa, info) for k, v in splits.items()}
    if "train" in rows and "test" in rows:
        train, val = (
            (rows["train"], rows["validation"])
            if "validation" in rows
            else _carve(rows["train"], 0.1, QA_SEED)
        )
        test = rows["test"]
    else:
        train, val, test = _split3([r for v in rows.values() for r in v], QA_SEED)
    if not train:
        raise ValueError(f"{uri}: no training examples")
    return QASplits(
        uri, tuple(train), tuple(val), tuple(test),
        max_length=info.max_length if info else 512,
        max_new_tokens=info.max_new_tokens if info else answer_budget([*train, *val, *test]),
        info=info,
    )  # fmt: skip


def load_qa_splits(uri: str, *, columns: Mapping[str, str] | None = None) -> QASplits:
    """Load the QA dataset named by ``uri`` as train/validation/test ``QAExample``s (cached)."""
    unknown = sorted(set(columns or {}) - {"question", "answer", "text", "label"})
    if unknown:
        raise ValueError(
            f"{uri}: unknown columns key {unknown[0]!r} for a QA dataset; allowed: question, answer"
        )
    return _load_cached(uri.strip(), tuple(sorted((columns or {}).items())))


def clear_qa_cache() -> None:
    """Forget loaded QA datasets and URI classifications of this process."""
    _load_cached.cache_clear()
    _is_qa.cache_clear()
