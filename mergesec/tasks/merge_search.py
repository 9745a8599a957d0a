"""The merge step's validation scorer: one model of the datasets' kind on the base architecture,
overwritten with each candidate's backbone, scoring each dataset's validation split (prepared
once) with that dataset's head. It also collects RegMean's Gram matrices."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mergesec.data import dataset_slug
from mergesec.kinds import kind_of
from mergesec.merging.grams import collect_linear_grams, grams_by_weight_key
from mergesec.models.state_dict import LazyStateDict, copy_into, save_state_dict
from mergesec.training.sampling import fixed_subset

# Unlabelled validation examples per expert for RegMean's Gram matrices (the RegMean paper uses
# ~1,000 training examples; the builtin text datasets have 200 validation sentences, all used).
GRAM_EXAMPLES = 256
EVAL_BATCH = 64


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
        self.data = {dataset_slug(d["uri"]): self.kind.load(d) for d in datasets}
        first = next(iter(self.data.values()))
        self.task = self.kind.build(
            base_uri, first, device=device, allow_remote_code=allow_remote_code, seed=0
        )
        self.task.model.eval()
        self.prepared: dict[str, list] = {}
        for slug, data in self.data.items():
            val = data.validation
            if subsets and slug in subsets:
                val = fixed_subset(val, subsets[slug], seed=0)
            self.prepared[slug] = self.task.prepare(val, EVAL_BATCH)

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

    def grams(self, slug: str, out_file: Path) -> LazyStateDict:
        """Input Gram matrices of the loaded backbone's Linear layers on ``slug``'s validation
        inputs, keyed by weight name, written to ``out_file`` and read back lazily."""

        batches = self.task.gram_batches(self.data[slug].validation, GRAM_EXAMPLES, EVAL_BATCH)
        inputs = [self.task.model_inputs(b) for b in batches]
        with self.task.precision.autocast():
            grams = collect_linear_grams(self.backbone, inputs)
        save_state_dict(grams_by_weight_key(grams), out_file)
        return LazyStateDict(out_file)
