"""Task kinds: what an expert does with its dataset, chosen by the dataset (never by the model).

Four kinds are built in: ``text`` (sequence classification), ``image`` (CLIP against zero-shot
heads), ``qa`` (causal-LM question answering scored by exact match) and ``chat`` (chat LLMs on
``chat:`` conversations, scored by their generated replies). Each is registered here
as a ``KindEntry``: its name, a cheap test of whether a dataset reference belongs to it, and the
import path of its ``TaskKind`` implementation, imported on first use (the implementations import
torch and transformers; study validation only needs the entry). Kinds are tried in registration
order; ``text`` is the fallback. A new kind is one module implementing ``TaskKind``/``TaskModel``
(``mergesec.core.protocols``) plus one ``register_kind`` call.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mergesec.core.protocols import TaskKind
from mergesec.data.chat import is_chat_uri
from mergesec.data.images import is_image_uri
from mergesec.data.qa import is_qa_uri

DatasetRef = str | Mapping[str, Any]


@dataclass(frozen=True)
class KindEntry:
    name: str
    # (uri, columns) -> whether the dataset belongs to this kind; must not download anything.
    claims: Callable[[str, Mapping[str, str]], bool]
    # "package.module:Class" of the TaskKind implementation.
    target: str
    column_roles: frozenset[str]
    supports_poison: bool = False
    supports_monitor: bool = False
    # Whether its inputs have a length, so training batches can group by it (finetune length_pool).
    supports_length_pool: bool = True

    def load(self) -> TaskKind:
        module, _, attr = self.target.partition(":")
        return getattr(importlib.import_module(module), attr)()


_KINDS: dict[str, KindEntry] = {}
_FALLBACK = "text"


def register_kind(entry: KindEntry) -> None:
    """Add a kind; kinds registered later are tried before the text fallback, in order."""
    if entry.name in _KINDS:
        raise ValueError(f"task kind {entry.name!r} is registered already")
    _KINDS[entry.name] = entry


def kind_names() -> list[str]:
    return list(_KINDS)


def entry(name: str) -> KindEntry:
    if name not in _KINDS:
        raise ValueError(f"unknown task kind {name!r}; known: {', '.join(_KINDS)}")
    return _KINDS[name]


def get_kind(name: str) -> TaskKind:
    """The ``TaskKind`` implementation named ``name``."""
    return entry(name).load()


def _ref(d: DatasetRef) -> tuple[str, dict[str, str]]:
    if isinstance(d, str):
        return d.strip(), {}
    return str(d["uri"]).strip(), dict(d.get("columns") or {})


def dataset_kind(d: DatasetRef) -> str:
    """The name of the kind a dataset URI or ``{uri, columns}`` reference belongs to."""
    uri, columns = _ref(d)
    for e in _KINDS.values():
        if e.name != _FALLBACK and e.claims(uri, columns):
            return e.name
    return _FALLBACK


def kind_for_datasets(datasets: Sequence[DatasetRef]) -> str:
    """The one kind shared by ``datasets``; ``ValueError`` when they mix kinds."""
    kinds = {dataset_kind(d) for d in datasets}
    if len(kinds) > 1:
        raise ValueError(f"datasets of different kinds cannot be combined: {sorted(kinds)}")
    return kinds.pop() if kinds else _FALLBACK


def kind_of(datasets: Sequence[DatasetRef]) -> TaskKind:
    """The ``TaskKind`` of ``datasets`` (all of one kind)."""
    return get_kind(kind_for_datasets(datasets))


def build_options(kind: TaskKind, params: Mapping[str, Any]) -> dict[str, Any]:
    """The op parameters that ``kind`` consumes itself (e.g. text's ``max_length``)."""
    return {k: params[k] for k in kind.build_options if k in params}


def _claims_image(uri: str, columns: Mapping[str, str]) -> bool:

    return "image" in columns or is_image_uri(uri)


def _claims_qa(uri: str, columns: Mapping[str, str]) -> bool:

    return is_qa_uri(uri, columns)


register_kind(
    KindEntry(
        "text",
        lambda uri, columns: True,
        "mergesec.kinds.text:TextKind",
        frozenset({"text", "label"}),
        supports_poison=True,
        supports_monitor=True,
    )
)
register_kind(
    KindEntry(
        "image",
        _claims_image,
        "mergesec.kinds.image.task:ImageKind",
        frozenset({"image", "label"}),
        supports_length_pool=False,
    )
)
register_kind(
    KindEntry("qa", _claims_qa, "mergesec.kinds.qa.task:QAKind", frozenset({"question", "answer"}))
)
register_kind(
    KindEntry(
        "chat",
        lambda uri, columns: is_chat_uri(uri),
        "mergesec.kinds.chat:ChatKind",
        frozenset({"text", "label"}),
        supports_poison=True,
        supports_monitor=True,
    )
)
