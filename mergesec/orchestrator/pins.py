"""Hub references without a revision: found offline, resolved to a commit when the hub answers.

``hf:org/model`` and ``hf:name/config`` are identified in node ids by name alone, so a repository
that changes upstream changes results under the same ids. ``mergesec plan`` lists every such
reference, with the commit to pin it to when the hub can be reached.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Literal

from mergesec.data import split_uri
from mergesec.data.sources import is_path_like
from mergesec.orchestrator.spec import StudySpec

HUB_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Unpinned:
    path: str  # key path in the study: "base", "datasets.1"
    uri: str
    kind: Literal["model", "dataset"]


def hub_repo(uri: str) -> str | None:
    """The repository part of an ``hf:`` hub URI (no revision), or None for anything else."""
    scheme, rest = split_uri(uri.strip())
    if scheme != "hf" or is_path_like(rest):
        return None
    return rest.split("@", 1)[0]


def is_unpinned(uri: str) -> bool:
    """Whether ``uri`` names a hub repository without ``@revision``."""
    repo = hub_repo(uri)
    return repo is not None and "@" not in uri


def unpinned_refs(spec: StudySpec) -> list[Unpinned]:
    """Every hub model and dataset of ``spec`` that carries no ``@revision`` (no network)."""
    out = [Unpinned("base", spec.base, "model")] if is_unpinned(spec.base) else []
    for i, uri in enumerate(spec.dataset_uris()):
        if is_unpinned(uri):
            out.append(Unpinned(f"datasets.{i}", uri, "dataset"))
    return out


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() not in {"0", "", "false", "no"}


@functools.lru_cache(maxsize=256)
def resolve_commit(ref: Unpinned) -> str | None:
    """The commit the hub serves for ``ref`` now, or None when the hub cannot be reached (or
    ``HF_HUB_OFFLINE`` is set) or does not know the repository."""
    repo = hub_repo(ref.uri)
    if repo is None or hub_offline():
        return None
    from huggingface_hub import HfApi

    api = HfApi()
    parts = repo.split("/")
    # A dataset's "a/b" is either repository a/b or dataset a with config b; "a/b/c" is a/b + c.
    candidates = [repo] if ref.kind == "model" else ["/".join(parts[:2]), parts[0]]
    for candidate in dict.fromkeys(candidates):
        try:
            info = (
                api.model_info(candidate, timeout=HUB_TIMEOUT_S)
                if ref.kind == "model"
                else api.dataset_info(candidate, timeout=HUB_TIMEOUT_S)
            )
        except Exception:  # unreachable, unknown or gated: nothing to pin to
            continue
        if info.sha:
            return info.sha
    return None


def pin_uri(uri: str, commit: str) -> str:
    """``uri`` pinned to ``commit`` (``hf:org/name`` -> ``hf:org/name@<commit>``)."""
    return f"{uri.strip()}@{commit}"


def unpinned_lines(spec: StudySpec, resolve: bool = True) -> list[str]:
    """One line per unpinned hub reference, naming the commit to pin to when the hub answers."""
    lines = []
    for ref in unpinned_refs(spec):
        commit = resolve_commit(ref) if resolve else None
        # One unanswered question is enough: an unreachable hub would time out on every ref.
        resolve = resolve and commit is not None
        fix = (
            f"pin it as {pin_uri(ref.uri, commit)}"
            if commit
            else "pin it with @<commit> (the hub could not be asked)"
        )
        lines.append(
            f"unpinned {ref.kind} {ref.path}: {ref.uri} has no @revision, so its results change "
            f"when the repository does; {fix}"
        )
    return lines
