"""The protocols at the seams: what a task kind and a model bound to a dataset must offer.

Every step executor (finetune, protect, attack, merge, evaluate) drives a model through
``TaskModel`` and builds it through ``TaskKind``; none of them knows which kind it runs. A new
kind implements both (see ``mergesec.kinds`` for the registry and the three built-in kinds).
Types from torch are named only for type checkers, so this module imports nothing heavy.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

if TYPE_CHECKING:
    from torch import Tensor, nn

    from mergesec.models.artifact import HeadInfo, ModelArtifact

Batch = dict[str, "Tensor"]
Overrides = Mapping[str, "Tensor"]


class Splits(Protocol):
    """A loaded dataset: its name, label names (empty for generation tasks) and three splits."""

    name: str
    label_names: Sequence[str]

    def split(self, name: str) -> Sequence[Any]: ...


@runtime_checkable
class TaskModel(Protocol):
    """A model bound to one dataset's head: what training, scoring, merging and diagnostics drive.

    ``model`` is the whole module (backbone + head) that the training loop optimises and that
    ``functional_call`` overrides address; parameter names under ``backbone_prefix`` are the
    backbone's, which is what merges, protections and attacks see (in the base's key names).
    """

    model: nn.Module
    precision: Any
    backbone_prefix: str
    # Batch size of validation scoring during training (None: the training batch size).
    eval_batch_size: int | None

    def backbone(self) -> nn.Module:
        """The backbone module (the base architecture's ``AutoModel`` or vision tower)."""

    def batches(
        self,
        split: Sequence[Any],
        batch_size: int,
        *,
        shuffle_seed: int | None = None,
        length_pool: int | None = None,
    ) -> Iterable[Batch]:
        """Training batches of ``split`` on the CPU; shuffled with ``shuffle_seed`` when given;
        with ``length_pool``, examples of similar length batched together within each run of that
        many batches (``training.batch.length_grouped``; kinds without lengths refuse it)."""

    def prepare(self, split: Sequence[Any], batch_size: int) -> list[Any]:
        """Every scoring batch of ``split``, preprocessed once for repeated scoring."""

    def loss(self, batch: Batch, overrides: Overrides | None = None) -> Tensor:
        """The mean training loss of a batch (optionally with parameter overrides)."""

    def score_batches(
        self, batches: Iterable[Any], overrides: Overrides | None = None
    ) -> tuple[float, float]:
        """``(mean loss, metric)`` over prepared batches; the metric is the kind's ``metric``."""

    def score(self, split: Sequence[Any], *, batch_size: int) -> tuple[float, float]:
        """``(mean loss, metric)`` over a split."""

    def use(self, data: Splits, heads: Mapping[str, Tensor] | None, slug: str) -> None:
        """Serve ``data``: with ``heads``, classify with the stored head ``slug``; None keeps it."""

    def head_tensors(self, slug: str) -> dict[str, Tensor]:
        """The current head's tensors under ``<slug>.…`` names (empty when the kind has none)."""

    def head_info(self, data: Splits) -> HeadInfo:
        """What a stored head means: its dataset and label names."""

    def attach_lora(self, *, r: int, alpha: int, dropout: float, target_modules: Any) -> nn.Module:
        """Wrap the backbone in a peft LoRA adapter; returns the peft model."""

    def release_state(self) -> dict[str, Tensor]:
        """The backbone's weights in base key names (a LoRA adapter materialised)."""

    def model_inputs(self, batch: Any) -> dict[str, Tensor]:
        """What the backbone alone takes from a prepared batch (for Gram statistics)."""

    def gram_batches(self, split: Sequence[Any], n: int, batch_size: int) -> list[Any]:
        """Prepared batches of up to ``n`` examples of ``split`` whose inputs feed Gram matrices."""


class TaskKind(Protocol):
    """What an expert does with its dataset: loads data and builds ``TaskModel``s.

    ``column_roles`` are the column names a study may map for a dataset of this kind; ``metric``
    names what ``score`` returns (``accuracy``, ``exact_match``); ``build_options`` are the op
    parameters the kind itself consumes (text: ``max_length``), passed to ``build`` and
    ``from_artifact``.
    """

    name: ClassVar[str]
    column_roles: ClassVar[frozenset[str]]
    metric: ClassVar[str]
    supports_poison: ClassVar[bool]
    supports_monitor: ClassVar[bool]
    build_options: ClassVar[frozenset[str]]

    def load(self, ref: Mapping[str, Any], *, poison: Mapping[str, Any] | None = None) -> Splits:
        """The dataset ``ref`` (``{uri, columns}``); with ``poison``, backdoored train/validation."""

    def build(
        self,
        base: str,
        data: Splits,
        *,
        device: str,
        allow_remote_code: bool,
        seed: int,
        **options: Any,
    ) -> TaskModel:
        """A fresh model from the base with ``data``'s head (a trained head starts from ``seed``)."""

    def from_artifact(
        self, art: ModelArtifact, *, device: str, allow_remote_code: bool, **options: Any
    ) -> TaskModel:
        """A stored model on the base architecture (heads are chosen with ``TaskModel.use``)."""
