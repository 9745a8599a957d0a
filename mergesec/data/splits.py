"""The common dataset types (examples and their three splits) and deterministic split carving."""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

SPLIT_NAMES = ("train", "validation", "test")

# How a dataset that has only a train split is divided.
DEFAULT_FRACTIONS = (0.7, 0.1, 0.2)
# Share of train carved off as validation when only the validation split is missing.
VALIDATION_FRACTION = 0.1

_FINGERPRINT_FORMAT = 1

D = TypeVar("D")


@dataclass(frozen=True)
class Example:
    """One labelled text; ``label`` indexes ``DatasetSplits.label_names``."""

    text: str
    label: int


@dataclass(frozen=True)
class DatasetSplits:
    """A classification dataset: label names plus train, validation and test examples."""

    name: str
    label_names: tuple[str, ...]
    train: tuple[Example, ...]
    validation: tuple[Example, ...]
    test: tuple[Example, ...]
    _fingerprint: list[str] = field(default_factory=list, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for attr in ("label_names", *SPLIT_NAMES):
            value = getattr(self, attr)
            if not isinstance(value, tuple):
                object.__setattr__(self, attr, tuple(value))
        if not self.label_names:
            raise ValueError(f"{self.name}: a dataset needs at least one label name")
        n = len(self.label_names)
        for split in SPLIT_NAMES:
            for ex in getattr(self, split):
                if not 0 <= ex.label < n:
                    raise ValueError(
                        f"{self.name}: {split} label {ex.label} is outside 0..{n - 1} "
                        f"({', '.join(self.label_names)})"
                    )

    @property
    def num_labels(self) -> int:
        """Number of classes."""
        return len(self.label_names)

    def split(self, name: str) -> tuple[Example, ...]:
        """The examples of split ``name`` (train, validation or test)."""
        if name not in SPLIT_NAMES:
            raise KeyError(f"unknown split {name!r}; known: {', '.join(SPLIT_NAMES)}")
        return getattr(self, name)

    def label_counts(self, split: str) -> list[int]:
        """How many examples of each label a split holds, indexed like ``label_names``."""
        counts = [0] * self.num_labels
        for ex in self.split(split):
            counts[ex.label] += 1
        return counts

    def fingerprint(self) -> str:
        """SHA-256 hex digest of the label names and every example of every split, in order.

        It depends only on the content (not on ``name``), so the same data read from another
        path or machine has the same fingerprint.
        """
        if not self._fingerprint:
            h = hashlib.sha256()
            header = {"format": _FINGERPRINT_FORMAT, "label_names": list(self.label_names)}
            h.update(_canonical(header))
            for split in SPLIT_NAMES:
                examples = getattr(self, split)
                h.update(_canonical({"split": split, "size": len(examples)}))
                for ex in examples:
                    h.update(_canonical([ex.text, ex.label]))
            self._fingerprint.append(h.hexdigest())
        return self._fingerprint[0]

    def summary(self) -> dict[str, object]:
        """Sizes, label names and fingerprint, for logging next to a trained model."""
        return {
            "name": self.name,
            "label_names": list(self.label_names),
            **{f"{s}_size": len(getattr(self, s)) for s in SPLIT_NAMES},
            "fingerprint": self.fingerprint(),
        }


def _canonical(obj: object) -> bytes:
    return (json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")


def carve(
    examples: Sequence[Example], fraction: float, seed: int, *, salt: str = ""
) -> tuple[tuple[Example, ...], tuple[Example, ...]]:
    """Split off about ``fraction`` of each label's examples, deterministically from ``seed``.

    Returns ``(rest, carved)``, both in their original order. ``round(fraction * len)``
    examples are carved, spread over labels in proportion to their counts; at least one when
    ``fraction > 0`` and there are two or more examples, and never all of them.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    rng = random.Random(f"{seed}/{salt}")
    total = math.floor(fraction * len(examples) + 0.5)
    chosen = _stratified_pick([ex.label for ex in examples], fraction, total, rng)
    if fraction > 0 and not chosen and len(examples) >= 2:
        chosen.add(rng.randrange(len(examples)))
    if len(chosen) == len(examples) and examples:
        chosen.discard(max(chosen))
    rest = tuple(ex for i, ex in enumerate(examples) if i not in chosen)
    carved = tuple(ex for i, ex in enumerate(examples) if i in chosen)
    return rest, carved


def _stratified_pick(
    labels: Sequence[int], fraction: float, total: int, rng: random.Random
) -> set[int]:
    """``total`` indices of ``labels``, each label's share ``fraction`` of its count (largest
    remainder, so the shares add up to ``total``), drawn per label with ``rng``."""
    by_label: dict[int, list[int]] = {}
    for i, lab in enumerate(labels):
        by_label.setdefault(lab, []).append(i)
    ordered = sorted(by_label)
    exact = {lab: fraction * len(by_label[lab]) for lab in ordered}
    quota = {lab: math.floor(exact[lab]) for lab in ordered}
    by_remainder = sorted(ordered, key=lambda lab: (quota[lab] - exact[lab], lab))
    for lab in by_remainder[: max(0, total - sum(quota.values()))]:
        quota[lab] += 1
    chosen: set[int] = set()
    for lab in ordered:
        idx = by_label[lab]
        rng.shuffle(idx)
        chosen.update(idx[: quota[lab]])
    return chosen


def cap_indices(labels: Sequence[int], n: int, *, salt: str) -> list[int]:
    """Indices of at most ``n`` of ``len(labels)`` examples, in order: a stratified subset (each
    label keeps its share) drawn from a fixed seed and ``salt``, so the same cap always keeps
    the same examples. All indices when ``n`` is not smaller than the split."""
    if n < 1:
        raise ValueError(f"an example cap must be >= 1, got {n}")
    if n >= len(labels):
        return list(range(len(labels)))
    rng = random.Random(f"cap/{salt}")
    return sorted(_stratified_pick(labels, n / len(labels), n, rng))


def cap_split(split: Any, n: int, *, salt: str) -> Any:
    """At most ``n`` examples of ``split`` (``cap_indices``): a split with ``labels`` and
    ``subset(idx)`` (image sets) gives its subset; a tuple of examples gives a tuple, stratified
    by ``label`` when its examples have one (QA examples have none: a seeded sample)."""
    if n >= len(split):
        return split
    labels = getattr(split, "labels", None)
    if labels is None:
        labels = [getattr(ex, "label", 0) for ex in split]
    keep = cap_indices(labels, n, salt=salt)
    return split.subset(keep) if hasattr(split, "subset") else tuple(split[i] for i in keep)


def cap_splits(data: D, examples: Mapping[str, int] | None) -> D:
    """``data`` (a dataclass with train/validation/test splits) with each split named in
    ``examples`` cut to at most that many examples (a study dataset's ``examples`` key)."""
    if not examples:
        return data
    cut = {
        name: cap_split(getattr(data, name), n, salt=name)
        for name, n in examples.items()
        if n is not None
    }
    return replace(data, **cut)  # type: ignore[type-var]


def complete_splits(
    train: Sequence[Example],
    validation: Sequence[Example] | None,
    test: Sequence[Example] | None,
    seed: int,
) -> tuple[tuple[Example, ...], tuple[Example, ...], tuple[Example, ...]]:
    """Fill in missing splits deterministically.

    - train only: stratified 70/10/20 train/validation/test;
    - no validation: 10% of train becomes validation;
    - no test (but a validation split): the given validation split becomes test and 10% of train
      becomes validation, the usual protocol for benchmarks whose test labels are hidden.
    """
    train = tuple(train)
    if not train:
        raise ValueError("the train split is empty")
    if validation and test:
        return train, tuple(validation), tuple(test)
    if not validation and not test:
        f_train, f_val, f_test = DEFAULT_FRACTIONS
        rest, test_out = carve(train, f_test, seed, salt="test")
        train_out, val_out = carve(rest, f_val / (f_train + f_val), seed, salt="validation")
        return train_out, val_out, test_out
    test_out = tuple(test) if test else tuple(validation or ())
    train_out, val_out = carve(train, VALIDATION_FRACTION, seed, salt="validation")
    return train_out, val_out, test_out
