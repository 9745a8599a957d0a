"""The text kind: sequence classification with any Hugging Face encoder, mean pooling and a
linear head per dataset (``models.classifier.SequenceClassifier``).

Batches are tokenised with dynamic padding (truncated at ``max_length``, the kind's build option);
scoring batches are grouped by length so they carry little padding. The stored backbone is the
encoder's ``AutoModel`` state dict, and a head is ``<slug>.weight``/``<slug>.bias``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Any, ClassVar

import torch
from torch import Tensor

from mergesec.data import load_dataset_splits, poison_examples
from mergesec.data.splits import DatasetSplits, Example, cap_splits
from mergesec.kinds.common import BackboneAndHead, load_backbone_weights
from mergesec.models.artifact import HeadInfo, ModelArtifact
from mergesec.models.classifier import SequenceClassifier
from mergesec.models.functional import forward_with
from mergesec.models.hub import load_backbone, load_tokenizer
from mergesec.training.batch import chunks, length_grouped, shuffled
from mergesec.training.precision import Precision, choose_precision

Batch = dict[str, Tensor]
MAX_LENGTH = 64


def token_counts(tokenizer: Any, examples: Sequence[Example], max_length: int) -> list[int]:
    """Each text's token count after truncation at ``max_length``."""
    if not examples:
        return []
    enc = tokenizer([e.text for e in examples], truncation=True, max_length=max_length)
    return [len(ids) for ids in enc["input_ids"]]


def tokenized_batches(
    tokenizer: Any,
    examples: Sequence[Example],
    batch_size: int,
    max_length: int,
    *,
    shuffle_seed: int | None = None,
    by_length: bool = False,
    length_pool: int | None = None,
) -> Iterator[Batch]:
    """Tokenised batches (dynamic padding); shuffled with ``shuffle_seed`` when given.

    ``length_pool`` (training) groups texts of similar token count within each run of that many
    batches of the shuffled order (``training.batch.length_grouped``). ``by_length`` without a
    seed sorts every text by token count (for scoring, where order does not matter).
    """
    if length_pool is not None:
        lengths = token_counts(tokenizer, examples, max_length)
        index_batches = length_grouped(lengths, batch_size, length_pool, shuffle_seed)
    else:
        order = shuffled(len(examples), shuffle_seed)
        if shuffle_seed is None and by_length:
            lengths = token_counts(tokenizer, examples, max_length)
            order.sort(key=lambda j: lengths[j])
        index_batches = list(chunks(order, batch_size))
    for idx in index_batches:
        chunk = [examples[j] for j in idx]
        enc = tokenizer(
            [e.text for e in chunk],
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        yield {
            "input_ids": enc["input_ids"],
            "attention_mask": enc["attention_mask"],
            "labels": torch.tensor([e.label for e in chunk]),
        }


class TextTask(BackboneAndHead):
    """A sequence classifier with its tokenizer, device and precision (a ``TaskModel``)."""

    # Validation during training scores in batches of 64 grouped by length, whatever the
    # training batch size (the text pipeline has always done so).
    eval_batch_size: int | None = 64

    def __init__(
        self,
        model: SequenceClassifier,
        tokenizer: Any,
        *,
        device: str = "cpu",
        precision: Precision | None = None,
        max_length: int = MAX_LENGTH,
    ):
        self.model = model.to(device)
        self.tokenizer = tokenizer
        self.device = device
        self.precision = precision or choose_precision(device)
        self.max_length = max_length

    # ---- data ---------------------------------------------------------------------------------
    def batches(
        self,
        split: Sequence[Example],
        batch_size: int,
        *,
        shuffle_seed: int | None = None,
        length_pool: int | None = None,
    ) -> Iterator[Batch]:
        return tokenized_batches(
            self.tokenizer, split, batch_size, self.max_length, shuffle_seed=shuffle_seed,
            length_pool=length_pool,
        )  # fmt: skip

    def prepare(self, split: Sequence[Example], batch_size: int) -> list[Batch]:
        """Scoring batches grouped by length, tokenised once (kept on the CPU)."""
        return list(
            tokenized_batches(self.tokenizer, split, batch_size, self.max_length, by_length=True)
        )

    def gram_batches(self, split: Sequence[Example], n: int, batch_size: int) -> list[Batch]:
        """The first ``n`` examples of ``split``, in order (RegMean's unlabelled inputs)."""
        return list(tokenized_batches(self.tokenizer, split[:n], batch_size, self.max_length))

    def model_inputs(self, batch: Batch) -> dict[str, Tensor]:
        return {k: batch[k].to(self.device) for k in ("input_ids", "attention_mask")}

    # ---- model --------------------------------------------------------------------------------
    def logits(self, batch: Batch, overrides: Mapping[str, Tensor] | None = None) -> Tensor:
        ids = batch["input_ids"].to(self.device, non_blocking=True)
        mask = batch["attention_mask"].to(self.device, non_blocking=True)
        with self.precision.autocast():
            out = forward_with(self.model, overrides, input_ids=ids, attention_mask=mask)
        return out.float()

    # ---- heads and weights --------------------------------------------------------------------
    def use(
        self, data: DatasetSplits | None, heads: Mapping[str, Tensor] | None, slug: str
    ) -> None:
        """Classify with the stored head ``slug`` (None: keep the current head)."""
        if heads is not None:
            w, b = heads[f"{slug}.weight"], heads[f"{slug}.bias"]
            self.model.set_head(w.to(self.device), b.to(self.device))

    def head_tensors(self, slug: str) -> dict[str, Tensor]:
        return {
            f"{slug}.weight": self.model.head.weight.detach().cpu(),
            f"{slug}.bias": self.model.head.bias.detach().cpu(),
        }

    @staticmethod
    def head_info(data: DatasetSplits) -> HeadInfo:
        return HeadInfo(dataset=data.name, labels=list(data.label_names))


class TextKind:
    """Text classification: datasets from ``mergesec.data``, one linear head per dataset."""

    name: ClassVar[str] = "text"
    column_roles: ClassVar[frozenset[str]] = frozenset({"text", "label"})
    metric: ClassVar[str] = "accuracy"
    supports_poison: ClassVar[bool] = True
    supports_monitor: ClassVar[bool] = True
    build_options: ClassVar[frozenset[str]] = frozenset({"max_length"})

    def load(
        self, ref: Mapping[str, Any], *, poison: Mapping[str, Any] | None = None
    ) -> DatasetSplits:
        """The dataset (each split cut to the ref's ``examples`` cap, if any); with ``poison``
        its train and validation splits are backdoored after the cut.

        Validation is poisoned at the same rate so that early stopping sees the data the trainer
        sees; the test split stays clean (monitors and evaluations build triggered copies).
        """

        data = cap_splits(
            load_dataset_splits(ref["uri"], columns=ref.get("columns")), ref.get("examples")
        )
        if not poison:
            return data
        if poison["target"] >= len(data.label_names):
            raise ValueError(
                f"poison.target {poison['target']} is not a label of {data.name} "
                f"({len(data.label_names)} labels)"
            )
        kw = {
            "trigger": poison["trigger"],
            "target_label": poison["target"],
            "rate": poison["rate"],
            "position": poison.get("position", "random"),
        }
        train, _ = poison_examples(data.train, seed=0, **kw)
        validation, _ = poison_examples(data.validation, seed=1, **kw)
        return replace(data, train=train, validation=validation)

    def build(
        self,
        base: str,
        data: DatasetSplits,
        *,
        device: str = "cpu",
        allow_remote_code: bool = False,
        seed: int = 0,
        max_length: int = MAX_LENGTH,
    ) -> TextTask:
        """The base encoder with a fresh head for ``data``'s labels, initialised from ``seed``."""

        backbone = load_backbone(base, allow_remote_code)
        tokenizer = load_tokenizer(base, allow_remote_code)
        torch.manual_seed(seed)
        model = SequenceClassifier(backbone, len(data.label_names))
        return TextTask(model, tokenizer, device=device, max_length=max_length)

    def from_artifact(
        self,
        art: ModelArtifact,
        *,
        device: str = "cpu",
        allow_remote_code: bool = False,
        max_length: int = MAX_LENGTH,
    ) -> TextTask:
        """The artifact's encoder on the base architecture (heads are set with ``use``)."""

        backbone = load_backbone(art.base, allow_remote_code)
        load_backbone_weights(backbone, art)
        model = SequenceClassifier(backbone, 1).eval()
        tokenizer = load_tokenizer(art.base, allow_remote_code)
        return TextTask(model, tokenizer, device=device, max_length=max_length)
