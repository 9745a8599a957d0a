"""The image task kind: a CLIP image classifier bound to a dataset, trained and scored in batches.

``ImageTask`` is the image kind's ``TaskModel`` (``mergesec.core.protocols``): batches of
preprocessed pixels (CLIP image processor; DataLoader workers on CUDA), the cross-entropy of
scale × cosine logits (optionally through ``functional_call`` overrides), and top-1 accuracy.
The backbone is the ``CLIPVisionModel`` whose state dict is the base's canonical backbone
(``models.hub.load_backbone``), so merges, protections and attacks use the ``clip_vision`` layout.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

from mergesec.data.images import ImageSet, ImageSplits, load_image_splits
from mergesec.data.splits import cap_splits
from mergesec.kinds.common import BackboneAndHead, load_backbone_weights
from mergesec.kinds.image.clip import (
    ImageClassifier,
    ZeroShotHead,
    load_image_processor,
    zero_shot_head,
)
from mergesec.models.artifact import HeadInfo, ModelArtifact
from mergesec.models.functional import forward_with
from mergesec.models.hub import load_backbone
from mergesec.training.batch import Batch, chunks, shuffled
from mergesec.training.precision import Precision, choose_precision, data_workers
from mergesec.training.sampling import fixed_subset


class _Collate:
    """Reads a chunk of indices of an ``ImageSet`` and turns it into a pixel batch (picklable, so
    DataLoader workers can run it)."""

    def __init__(self, split: ImageSet, processor: Any):
        self.split, self.processor = split, processor

    def __call__(self, indices: list[list[int]]) -> Batch:
        idx = indices[0]
        pix = self.processor(images=self.split.images(idx), return_tensors="pt")["pixel_values"]
        labels = torch.tensor([self.split.labels[i] for i in idx], dtype=torch.long)
        return {"pixel_values": pix.float(), "labels": labels}


class ImageTask(BackboneAndHead):
    """A CLIP image classifier with its processor, device and precision (a ``loop.Trainable``)."""

    eval_batch_size: int | None = None  # validation during training: the training batch size

    def __init__(
        self,
        model: ImageClassifier,
        processor: Any,
        *,
        device: str = "cpu",
        precision: Precision | None = None,
    ):
        self.model = model.to(device)
        self.processor = processor
        self.device = device
        self.precision = precision or choose_precision(device)

    # ---- data ---------------------------------------------------------------------------------
    def batches(
        self,
        split: ImageSet,
        batch_size: int,
        *,
        shuffle_seed: int | None = None,
        length_pool: int | None = None,
    ) -> Iterator[Batch]:
        """Preprocessed batches of ``split`` on the CPU (``pixel_values``, ``labels``). Images
        have one size, so ``length_pool`` (grouping by length) is refused."""
        if length_pool is not None:
            raise ValueError("length_pool groups texts by token count; images have no length")
        order = list(chunks(shuffled(len(split), shuffle_seed), batch_size))
        workers = data_workers(self.device)
        collate = _Collate(split, self.processor)
        if workers == 0:
            for idx in order:
                yield collate([idx])
            return
        loader = torch.utils.data.DataLoader(
            order, batch_size=1, collate_fn=collate, num_workers=workers,
            pin_memory=self.device.startswith("cuda"), persistent_workers=False,
        )  # fmt: skip
        yield from loader

    def prepare(self, split: ImageSet, batch_size: int) -> list[Batch]:
        """Every batch of ``split``, preprocessed once (kept on the CPU) for repeated scoring."""
        return list(self.batches(split, batch_size))

    def gram_batches(self, split: ImageSet, n: int, batch_size: int) -> list[Batch]:
        """``n`` seeded examples of ``split`` (RegMean's unlabelled inputs)."""
        return self.prepare(fixed_subset(split, n), batch_size)

    def model_inputs(self, batch: Batch) -> dict[str, Tensor]:
        """What the backbone alone takes from a batch (RegMean's Gram matrices)."""
        return {"pixel_values": batch["pixel_values"].to(self.device)}

    # ---- model --------------------------------------------------------------------------------
    def logits(self, batch: Batch, overrides: dict[str, Tensor] | None = None) -> Tensor:
        pix = batch["pixel_values"].to(self.device, non_blocking=True)
        with self.precision.autocast():
            out = forward_with(self.model, overrides, pixel_values=pix)
        return out.float()

    # ---- heads and weights -------------------------------------------------------------------
    def use(self, data: ImageSplits, heads: Mapping[str, Tensor] | None, slug: str) -> None:
        """Classify into ``slug``'s classes with its stored zero-shot head (None: keep the head)."""
        if heads is not None:
            self.model.set_head(ZeroShotHead.from_tensors(heads, slug))

    def head_tensors(self, slug: str) -> dict[str, Tensor]:
        return ZeroShotHead(
            self.model.class_embeddings, self.model.projection, self.model.logit_scale
        ).tensors(slug)

    @staticmethod
    def head_info(data: ImageSplits) -> HeadInfo:
        return HeadInfo(dataset=data.name, labels=list(data.label_names))


class ImageKind:
    """Image classification with CLIP: datasets from ``data.images``, zero-shot heads."""

    name: ClassVar[str] = "image"
    column_roles: ClassVar[frozenset[str]] = frozenset({"image", "label"})
    metric: ClassVar[str] = "accuracy"
    supports_poison: ClassVar[bool] = False
    supports_monitor: ClassVar[bool] = False
    build_options: ClassVar[frozenset[str]] = frozenset()

    def load(
        self, ref: Mapping[str, Any], *, poison: Mapping[str, Any] | None = None
    ) -> ImageSplits:
        if poison:
            raise ValueError("poisoned (backdoored) training is defined for text datasets only")
        data = load_image_splits(ref["uri"], columns=ref.get("columns"))
        return cap_splits(data, ref.get("examples"))

    def build(
        self, base: str, data: ImageSplits, *, device: str = "cpu", allow_remote_code: bool = False,
        seed: int = 0,
    ) -> ImageTask:  # fmt: skip
        """The base's vision tower with ``data``'s zero-shot head (frozen: ``seed`` draws nothing
        here but is set, as for every kind, before the model is built)."""

        torch.manual_seed(seed)
        head = zero_shot_head(
            base, data.label_names, data.templates, device=device,
            allow_remote_code=allow_remote_code,
        )  # fmt: skip
        backbone = load_backbone(base, allow_remote_code)
        return ImageTask(ImageClassifier(backbone, head), load_image_processor(base), device=device)

    def from_artifact(
        self, art: ModelArtifact, *, device: str = "cpu", allow_remote_code: bool = False
    ) -> ImageTask:
        """The artifact's vision tower on the base architecture (heads are set with ``use``)."""

        backbone = load_backbone(art.base, allow_remote_code)
        load_backbone_weights(backbone, art)
        heads = art.all_heads()
        slug = next((s for s in art.heads if f"{s}.visual_projection" in heads), None)
        if slug is None:
            raise ValueError(f"{art.path} holds no zero-shot image head")
        head = ZeroShotHead.from_tensors(heads, slug)
        return ImageTask(
            ImageClassifier(backbone, head), load_image_processor(art.base), device=device
        )
