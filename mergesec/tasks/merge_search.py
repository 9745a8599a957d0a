"""The merge step's validation scorer: one model of the datasets' kind on the base architecture,
overwritten with each candidate's backbone, scoring each dataset's validation split (prepared
once) with that dataset's head. It also collects RegMean's Gram matrices."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mergesec.data import dataset_slug
from mergesec.kinds import kind_of
from mergesec.merging.grams import collect_linear_grams, grams_by_weight_key
from mergesec.models.state_dict import LazyStateDict, copy_into, save_state_dict
from mergesec.training.sampling import class_balanced_indices, fixed_subset, split_labels

# Unlabelled validation examples per expert for RegMean's Gram matrices (the RegMean paper uses
# ~1,000 training examples; the builtin text datasets have 200 validation sentences, all used).
GRAM_EXAMPLES = 256
# Scoring batches: small, of texts of similar length, so that little of a batch is padding
# (batches of 16 scored the quickstart's validation texts 28% faster than batches of 64).
EVAL_BATCH = 16
# RegMean's Gram inputs keep their batches of 64 (padding positions enter the statistics).
GRAM_BATCH = 64

# Scoring batches already tokenised in this worker process (CPU tensors of a few hundred
# validation texts each), reused by every merge node that scores the same datasets on the same
# base: (kind, base, dataset spec, subset size, batch size) -> batches.
_PREPARED: dict[tuple[Any, ...], list] = {}
_PREPARED_MAX = 32


class ValidationScorer:
    """Scores backbones on the validation splits of ``datasets`` (a fixed subset of ``subsets[slug]``
    examples where given)."""

    def __init__(
        self,
        base_uri: str,
        datasets: Sequence[Mapping[str, Any]],
        *,
        device: str = "cpu",
        allow_remote_code: bool = False,
        subsets: Mapping[str, int] | None = None,
    ):

        self.kind = kind_of(datasets)
        self.device = device
        self.base_uri = base_uri
        self.specs = {dataset_slug(d["uri"]): dict(d) for d in datasets}
        self.subsets = dict(subsets or {})
        self.data = {dataset_slug(d["uri"]): self.kind.load(d) for d in datasets}
        first = next(iter(self.data.values()))
        self.task = self.kind.build(
            base_uri, first, device=device, allow_remote_code=allow_remote_code, seed=0
        )
        self.task.model.eval()
        self.prepared: dict[str, list] = {}
        for slug, data in self.data.items():
            key = (self.kind.name, *self.setup_key(slug)[:3], EVAL_BATCH)
            if key not in _PREPARED:
                val = data.validation
                if subsets and slug in subsets:
                    val = fixed_subset(val, subsets[slug], seed=0)
                if len(_PREPARED) >= _PREPARED_MAX:
                    _PREPARED.clear()
                _PREPARED[key] = self.task.prepare(val, EVAL_BATCH)
            self.prepared[slug] = _PREPARED[key]

    def setup_key(self, slug: str) -> tuple[Any, ...]:
        """What, besides the weights and heads, decides ``slug``'s score."""
        spec = json.dumps(self.specs[slug], sort_keys=True, default=str)
        return (self.base_uri, spec, self.subsets.get(slug), self.device)

    @property
    def backbone(self) -> nn.Module:
        """The module candidate weights are copied into."""
        return self.task.backbone()

    def load(self, weights: Mapping[str, Tensor]) -> None:
        """Copy ``weights`` (backbone keys) into the model, one tensor at a time."""
        copy_into(self.backbone, weights)

    @torch.no_grad()
    def accuracies(self, heads: Mapping[str, Tensor], slugs: Sequence[str]) -> dict[str, float]:
        """The validation metric of the loaded backbone on each dataset, with its stored head."""
        out = {}
        for slug in slugs:
            self.task.use(self.data[slug], heads, slug)
            out[slug] = self.task.score_batches(self.prepared[slug])[1]
        return out

    def grams(
        self, slug: str, out_file: Path, *, n: int = GRAM_EXAMPLES, sample: str | None = None
    ) -> LazyStateDict:
        """Input Gram matrices of the loaded backbone's Linear layers on ``n`` of ``slug``'s
        validation inputs, keyed by weight name, written to ``out_file`` and read back lazily.

        ``sample``: None takes the kind's own choice of ``n`` examples (``gram_batches``);
        ``random`` a seeded draw of ``n``; ``class_balanced`` ``n`` drawn evenly over the classes
        (``class_balanced_indices``; a split without labels is refused)."""

        batches = self.task.gram_batches(gram_sample(self.data[slug].validation, n, sample),
                                         n, GRAM_BATCH)  # fmt: skip
        inputs = [self.task.model_inputs(b) for b in batches]
        with self.task.precision.autocast():
            grams = collect_linear_grams(self.backbone, inputs)
        save_state_dict(grams_by_weight_key(grams), out_file)
        return LazyStateDict(out_file)


def gram_sample(split: Any, n: int, sample: str | None) -> Any:
    """The validation examples RegMean's Gram matrices are computed on (see ``grams``)."""
    if sample is None:
        return split
    if sample == "random":
        return fixed_subset(split, n, seed=0)
    if sample == "class_balanced":
        labels = split_labels(split)
        if labels is None:
            raise ValueError("gram_sample class_balanced needs a labelled split; use random")
        idx = class_balanced_indices(labels, n, seed=0)
        return split.subset(idx) if hasattr(split, "subset") else [split[i] for i in idx]
    raise ValueError(f"unknown gram_sample {sample!r}; known: class_balanced, random")
