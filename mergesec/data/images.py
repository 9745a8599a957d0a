"""Image classification datasets: the eight CLIP merging benchmarks by name, local copies, builtins.

A dataset URI names an image dataset when

- it is ``builtin:synthetic_shapes`` or ``builtin:synthetic_colors`` (coloured geometric shapes drawn with PIL,
  deterministic, offline; labelled by shape or by colour);
- it is ``hf:<hub id>[/<config>]`` and the hub id is one of ``IMAGE_DATASETS`` (or a mirror whose
  last path component is a known name, e.g. ``hf:myorg/eurosat``);
- it is a local directory (``hf:/path`` or a plain path) written by ``datasets``' ``save_to_disk``
  whose features hold an ``Image`` column, or an image folder (``<dir>/<split>/<class>/*.png`` or
  ``<dir>/<class>/*.png``). A directory named like a known dataset gets that dataset's label names
  and prompt templates.

Splits follow the task-vectors convention: the hub's ``train`` and ``test`` splits, and a
validation split of 10% of train (at most 5,000 images) drawn with a fixed seed when the source has
none. Label names come from ``ImageDatasetInfo.label_names`` when given (the names the CLIP prompt
templates were written for), else from the source's ``ClassLabel`` feature, cleaned of path
prefixes and underscores. Loaded datasets are cached per process; hub datasets go through the
Hugging Face datasets cache, so nothing is downloaded when ``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

from mergesec.core.paths import cache_root
from mergesec.data.real_images import REAL_IMAGE_DATASETS, real_image_dataset
from mergesec.data.sources import (
    as_dataset_dict,
    find_registered,
    is_saved_dataset_dir,
    load_registered_hub,
    local_path,
    saved_features,
)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
LABEL_COLUMNS = ("label", "labels", "fine_label", "class", "target", "variant")
IMAGE_COLUMNS = ("image", "img", "pixel_values")
VAL_FRACTION = 0.1
MAX_VAL = 5000
SPLIT_SEED = 0
_SPLITS = {"train": "train", "validation": "validation", "valid": "validation", "val": "validation"}
_SPLITS |= {"dev": "validation", "test": "test"}


@dataclass(frozen=True)
class ImageDatasetInfo:
    """What mergesec knows about a named image dataset.

    ``templates`` are prompt templates with ``{}`` for the class name (the CLIP zero-shot
    prompts); ``label_names`` None means "take the source's ClassLabel names" (checked to number
    ``num_classes``). Given label names are in the source's class-index order.
    """

    name: str
    hub_id: str
    num_classes: int
    templates: tuple[str, ...]
    config: str | None = None
    label_names: tuple[str, ...] | None = None
    label_column: str | None = None
    image_column: str | None = None
    aliases: tuple[str, ...] = ()


def _articles(*patterns: str) -> tuple[str, ...]:
    return tuple(p.replace("@", art) for art in ("", "a ", "the ") for p in patterns)


DIGITS = tuple(str(i) for i in range(10))
EUROSAT = (
    "annual crop land", "forest", "brushland or shrubland", "highway or road",
    "industrial buildings or commercial buildings", "pasture land", "permanent crop land",
    "residential buildings or homes or apartments", "river", "lake or sea",
)  # fmt: skip
RESISC45 = (
    "airplane", "airport", "baseball diamond", "basketball court", "beach", "bridge",
    "chaparral", "church", "circular farmland", "cloud", "commercial area", "dense residential",
    "desert", "forest", "freeway", "golf course", "ground track field", "harbor",
    "industrial area", "intersection", "island", "lake", "meadow", "medium residential",
    "mobile home park", "mountain", "overpass", "palace", "parking lot", "railway",
    "railway station", "rectangular farmland", "river", "roundabout", "runway", "sea ice",
    "ship", "snowberg", "sparse residential", "stadium", "storage tank", "tennis court",
    "terrace", "thermal power station", "wetland",
)  # fmt: skip
DTD = (
    "banded", "blotchy", "braided", "bubbly", "bumpy", "chequered", "cobwebbed", "cracked",
    "crosshatched", "crystalline", "dotted", "fibrous", "flecked", "freckled", "frilly",
    "gauzy", "grid", "grooved", "honeycombed", "interlaced", "knitted", "lacelike", "lined",
    "marbled", "matted", "meshed", "paisley", "perforated", "pitted", "pleated",
    "polka-dotted", "porous", "potholed", "scaly", "smeared", "spiralled", "sprinkled",
    "stained", "stratified", "striped", "studded", "swirly", "veined", "waffled", "woven",
    "wrinkled", "zigzagged",
)  # fmt: skip
GTSRB = (
    "speed limit 20 km/h", "speed limit 30 km/h", "speed limit 50 km/h", "speed limit 60 km/h",
    "speed limit 70 km/h", "speed limit 80 km/h", "end of speed limit 80 km/h",
    "speed limit 100 km/h", "speed limit 120 km/h", "no passing",
    "no passing for vehicles over 3.5 tons", "right-of-way at the next intersection",
    "priority road", "yield", "stop", "no vehicles", "vehicles over 3.5 tons prohibited",
    "no entry", "general caution", "dangerous curve to the left",
    "dangerous curve to the right", "double curve", "bumpy road", "slippery road",
    "road narrows on the right", "road work", "traffic signals", "pedestrians",
    "children crossing", "bicycles crossing", "beware of ice and snow",
    "wild animals crossing", "end of all speed and passing limits", "turn right ahead",
    "turn left ahead", "ahead only", "go straight or right", "go straight or left",
    "keep right", "keep left", "roundabout mandatory", "end of no passing",
    "end of no passing for vehicles over 3.5 tons",
)  # fmt: skip
NUMBER_TEMPLATES = ('a photo of the number: "{}".',)

IMAGE_DATASETS: dict[str, ImageDatasetInfo] = {
    info.name: info
    for info in (
        ImageDatasetInfo(
            "sun397", "tanganke/sun397", 397, ("a photo of a {}.", "a photo of the {}.")
        ),
        ImageDatasetInfo(
            "stanford_cars",
            "tanganke/stanford_cars",
            196,
            (
                "a photo of a {}.",
                "a photo of the {}.",
                "a photo of my {}.",
                "i love my {}!",
                "a photo of my dirty {}.",
                "a photo of my clean {}.",
                "a photo of my new {}.",
                "a photo of my old {}.",
            ),
            aliases=("cars", "stanfordcars"),
        ),  # fmt: skip
        ImageDatasetInfo(
            "resisc45",
            "tanganke/resisc45",
            45,
            _articles(
                *(
                    f"{src} {what} of @{{}}."
                    for what in ("imagery", "photo", "view")
                    for src in ("satellite", "aerial")
                )
            ),
            label_names=RESISC45,
        ),  # fmt: skip
        ImageDatasetInfo(
            "eurosat",
            "tanganke/eurosat",
            10,
            tuple(f"a centered satellite photo of {a}{{}}." for a in ("", "a ", "the ")),
            label_names=EUROSAT,
        ),  # fmt: skip
        ImageDatasetInfo(
            "svhn",
            "ufldl-stanford/svhn",
            10,
            NUMBER_TEMPLATES,
            config="cropped_digits",
            label_names=DIGITS,
        ),  # fmt: skip
        ImageDatasetInfo(
            "gtsrb",
            "tanganke/gtsrb",
            43,
            tuple(
                f'a {w} photo of a "{{}}" traffic sign.'
                for w in ("zoomed in", "centered", "close up")
            ),
            label_names=GTSRB,
        ),  # fmt: skip
        ImageDatasetInfo("mnist", "ylecun/mnist", 10, NUMBER_TEMPLATES, label_names=DIGITS),
        ImageDatasetInfo(
            "dtd",
            "tanganke/dtd",
            47,
            tuple(
                f"a photo of {a} {{}} {w}."
                for a in ("a", "the")
                for w in ("texture", "pattern", "thing", "object")
            ),
            label_names=DTD,
        ),  # fmt: skip
        ImageDatasetInfo(
            "fgvc_aircraft",
            "HuggingFaceM4/FGVC-Aircraft",
            100,
            ("a photo of a {}, a type of aircraft.", "a photo of the {}, a type of aircraft."),
            aliases=("fgvcaircraft", "aircraft"),
        ),  # fmt: skip
    )
}

# ---------------------------------------------------------------------------------------------
# Builtin synthetic images
# ---------------------------------------------------------------------------------------------

SHAPES = ("circle", "square", "triangle", "cross")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 210, 40),
}
BUILTIN_SIZES = (480, 96, 192)
BUILTIN_IMAGE_SIZE = 32
BUILTIN_TEMPLATES = {
    "synthetic_shapes": ("a photo of a {}.", "a drawing of a {} shape."),
    "synthetic_colors": ("a photo of something {}.", "a {} shape."),
}


def image_builtin_names() -> list[str]:
    """Names of the builtin image datasets (``builtin:<name>``), synthetic and real."""

    return sorted([*BUILTIN_TEMPLATES, *REAL_IMAGE_DATASETS])


def draw_shape(shape: str, color: tuple[int, int, int], rng: random.Random, size: int):
    """One ``size``×``size`` RGB image of ``shape`` in ``color`` on a jittered grey background."""
    from PIL import Image, ImageDraw

    grey = rng.randint(90, 170)
    bg = tuple(max(0, min(255, grey + rng.randint(-15, 15))) for _ in range(3))
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    r = size * rng.uniform(0.3, 0.4)
    cx = size / 2 + rng.uniform(-0.06, 0.06) * size
    cy = size / 2 + rng.uniform(-0.06, 0.06) * size
    fill = tuple(max(0, min(255, c + rng.randint(-25, 25))) for c in color)
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    elif shape == "cross":
        w = r / 3
        d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    return img


def synthetic_images(
    task: str = "shapes",
    sizes: tuple[int, int, int] = BUILTIN_SIZES,
    image_size: int = BUILTIN_IMAGE_SIZE,
    seed: int = 0,
):
    """A ``datasets.DatasetDict`` (train/validation/test; ``image``, ``label`` columns) of shapes.

    ``task="shapes"`` labels each image by its shape, ``"colors"`` by its colour; the other
    attribute is drawn at random. Labels are balanced; everything follows from ``seed``.
    """
    import datasets

    if f"synthetic_{task}" not in BUILTIN_TEMPLATES:
        raise ValueError(f"unknown synthetic task {task!r}; known: shapes, colors")
    names = SHAPES if task == "shapes" else tuple(COLORS)
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=list(names))}
    )
    out = {}
    for split, n in zip(("train", "validation", "test"), sizes, strict=True):
        rng = random.Random(f"{task}/{split}/{seed}")
        labels = [i % len(names) for i in range(n)]
        rng.shuffle(labels)
        images = []
        for lab in labels:
            shape = SHAPES[lab] if task == "shapes" else rng.choice(SHAPES)
            color = (
                list(COLORS.values())[lab]
                if task == "colors"
                else rng.choice(list(COLORS.values()))
            )
            images.append(draw_shape(shape, color, rng, image_size))
        out[split] = datasets.Dataset.from_dict(
            {"image": images, "label": labels}, features=features
        )
    return datasets.DatasetDict(out)


# ---------------------------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------------------------


class ImageSet(Sequence):
    """One split: ``(PIL RGB image, label)`` pairs read lazily from a Hugging Face ``Dataset``."""

    def __init__(self, dataset: Any, image_column: str, label_column: str):
        self.dataset = dataset
        self.image_column = image_column
        self.label_column = label_column
        self.labels: list[int] = [int(x) for x in dataset[label_column]]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return self.subset(range(len(self))[i])
        return _rgb(self.dataset[int(i)][self.image_column]), self.labels[i]

    def __iter__(self) -> Iterator[tuple[Any, int]]:
        for i in range(len(self)):
            yield self[i]

    def images(self, indices: Sequence[int]) -> list:
        """The images at ``indices`` in one batched read, as RGB PIL images."""
        rows = self.dataset[list(map(int, indices))][self.image_column]
        return [_rgb(im) for im in rows]

    def subset(self, indices: Sequence[int]) -> ImageSet:
        """The examples at ``indices`` (in that order)."""
        return ImageSet(
            self.dataset.select(list(map(int, indices))), self.image_column, self.label_column
        )


def _rgb(image: Any):
    return image if getattr(image, "mode", "RGB") == "RGB" else image.convert("RGB")


@dataclass(frozen=True)
class ImageSplits:
    """An image classification dataset: label names, prompt templates and three ``ImageSet``s."""

    name: str
    label_names: tuple[str, ...]
    templates: tuple[str, ...]
    train: ImageSet
    validation: ImageSet
    test: ImageSet
    info: ImageDatasetInfo | None = field(default=None, compare=False)

    kind = "image"

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def split(self, name: str) -> ImageSet:
        if name not in ("train", "validation", "test"):
            raise KeyError(f"unknown split {name!r}; known: train, validation, test")
        return getattr(self, name)


def clean_label_name(name: str) -> str:
    """``"/b/bakery/shop"`` -> ``"bakery shop"``, ``"Annual_Crop"`` -> ``"Annual Crop"``."""
    name = re.sub(r"^/[a-z]/", "", str(name).strip())
    return re.sub(r"\s+", " ", re.sub(r"[_/]+", " ", name)).strip()


def _carve(n: int, count: int, seed: int, salt: str) -> tuple[list[int], list[int]]:
    idx = list(range(n))
    random.Random(f"{seed}/{salt}").shuffle(idx)
    carved = sorted(idx[:count])
    chosen = set(carved)
    return [i for i in range(n) if i not in chosen], carved


def complete_image_splits(
    splits: Mapping[str, ImageSet], seed: int = SPLIT_SEED
) -> tuple[ImageSet, ImageSet, ImageSet]:
    """(train, validation, test) following the task-vectors convention.

    A missing validation split is 10% of train (at most 5,000 images) drawn with ``seed``; a
    missing test split is the source's validation split (and validation is then carved from
    train); a train-only source gives 20% to test and then 10% of the rest to validation
    (72/8/20).
    """
    train = splits.get("train")
    if train is None or not len(train):
        raise ValueError("the train split is empty")
    val, test = splits.get("validation"), splits.get("test")
    if val is not None and test is not None:
        return train, val, test
    if val is None and test is None:
        rest, test_idx = _carve(len(train), round(0.2 * len(train)), seed, "test")
        test = train.subset(test_idx)
        train = train.subset(rest)
    elif test is None:
        test = val
    n_val = max(1, min(MAX_VAL, round(VAL_FRACTION * len(train))))
    keep, val_idx = _carve(len(train), n_val, seed, "validation")
    return train.subset(keep), train.subset(val_idx), test


# ---------------------------------------------------------------------------------------------
# Resolving URIs
# ---------------------------------------------------------------------------------------------


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def info_by_name(name: str) -> ImageDatasetInfo | None:
    """The registered dataset whose hub id, name or alias matches ``name`` (a hub id or a path
    component), else None."""
    for info in IMAGE_DATASETS.values():
        if name.lower() == info.hub_id.lower():
            return info
    key = _norm(name)
    if not key:
        return None
    for info in IMAGE_DATASETS.values():
        if key in {_norm(info.name), *map(_norm, info.aliases)}:
            return info
    return None


def image_dataset_uri(name: str) -> str:
    """The ``hf:`` URI of a registered image dataset by name (``eurosat`` -> ``hf:tanganke/eurosat``)."""
    info = IMAGE_DATASETS.get(name) or info_by_name(name)
    if info is None:
        raise KeyError(
            f"unknown image dataset {name!r}; known: {', '.join(sorted(IMAGE_DATASETS))}"
        )
    return f"hf:{info.hub_id}" + (f"/{info.config}" if info.config else "")


def register_image_dataset(info: ImageDatasetInfo) -> None:
    """Add or replace a named image dataset (e.g. to point a name at another hub id)."""
    IMAGE_DATASETS[info.name] = info
    clear_image_cache()


def is_image_folder(path: Path) -> bool:
    """A directory of ``<class>/<image>`` or ``<split>/<class>/<image>`` files (no saved dataset)."""

    if not path.is_dir() or is_saved_dataset_dir(path):
        return False
    for depth in ("*/*", "*/*/*"):
        for f in path.glob(depth):
            if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file():
                return True
    return False


def has_image_feature(features: Any) -> bool:
    import datasets

    return any(isinstance(f, datasets.Image) for f in (features or {}).values())


@lru_cache(maxsize=256)
def is_image_uri(uri: str) -> bool:
    """Whether ``uri`` names an image dataset (see the module docstring); never downloads."""
    uri = uri.strip()
    if uri.startswith("builtin:"):
        return uri.split(":", 1)[1] in image_builtin_names()
    path = local_path(uri)
    if path is not None:
        if is_image_folder(path):
            return True

        return is_saved_dataset_dir(path) and has_image_feature(saved_features(path))
    return find_registered(uri, info_by_name) is not None


def check_image_uri(uri: str) -> str | None:
    """None if the image dataset ``uri`` can be loaded, else a one-line problem."""
    path = local_path(uri.strip())
    if path is not None and not path.exists():
        return f"directory not found: {uri}"
    return None


def _open(uri: str, info: ImageDatasetInfo | None) -> Any:
    import datasets

    if uri.startswith("builtin:"):
        name = uri.split(":", 1)[1]
        if name in REAL_IMAGE_DATASETS:
            return real_image_dataset(name)
        return synthetic_images(name.removeprefix("synthetic_"))
    path = local_path(uri)
    if path is not None:
        if is_image_folder(path):
            return datasets.load_dataset(
                "imagefolder", data_dir=str(path), cache_dir=str(cache_root() / "datasets")
            )
        return as_dataset_dict(datasets.load_from_disk(str(path)))
    return load_registered_hub(uri, info)


def _columns(features: Any, info: ImageDatasetInfo | None, columns: Mapping[str, str], uri: str):
    import datasets

    avail = list(features)
    image = columns.get("image") or (info.image_column if info else None)
    if image is None:
        image = next((c for c, f in features.items() if isinstance(f, datasets.Image)), None)
        image = image or next((c for c in IMAGE_COLUMNS if c in avail), None)
    label = columns.get("label") or (info.label_column if info else None)
    label = label or next((c for c in LABEL_COLUMNS if c in avail), None)
    for key, col in (("image", image), ("label", label)):
        if col is None or col not in avail:
            raise ValueError(
                f"{uri}: no {key} column (columns: {', '.join(avail)}); "
                f"name it with columns: {{{key}: <column>}}"
            )
    return image, label


@lru_cache(maxsize=16)
def _load_cached(uri: str, columns: tuple[tuple[str, str], ...], seed: int) -> ImageSplits:
    import datasets

    info = find_registered(uri, info_by_name)
    if uri.startswith("builtin:"):
        info = None
    dsdict = _open(uri, info)
    chosen: dict[str, Any] = {}
    for name in dsdict:
        canon = _SPLITS.get(str(name).lower())
        if canon and canon not in chosen:
            chosen[canon] = dsdict[name]
    if "train" not in chosen:
        raise ValueError(f"{uri}: no train split (splits: {', '.join(map(str, dsdict))})")
    features = chosen["train"].features
    image_col, label_col = _columns(features, info, dict(columns), uri)
    sets = {}
    for split, ds in chosen.items():
        labels = list(ds[label_col])
        keep = [i for i, y in enumerate(labels) if y is not None and int(y) >= 0]
        if len(keep) < len(labels):
            ds = ds.select(keep)
        if len(ds):
            sets[split] = ImageSet(ds.select_columns([image_col, label_col]), image_col, label_col)
    feature = features[label_col]
    source_names = (
        [clean_label_name(n) for n in feature.names]
        if isinstance(feature, datasets.ClassLabel)
        else None
    )
    if info is not None and info.label_names is not None:
        names = info.label_names
    elif source_names is not None:
        names = tuple(source_names)
    else:
        top = max(max(s.labels) for s in sets.values())
        names = tuple(str(i) for i in range(top + 1))
    found = len(source_names) if source_names is not None else len(names)
    if info is not None and found != info.num_classes:
        raise ValueError(
            f"{uri}: the source has {found} classes, expected {info.num_classes} for {info.name}"
        )
    if source_names is not None and len(source_names) != len(names):
        raise ValueError(f"{uri}: the source has {len(source_names)} classes, not {len(names)}")
    train, val, test = complete_image_splits(sets, seed)
    if uri.startswith("builtin:"):
        name = uri.split(":", 1)[1]
        real = REAL_IMAGE_DATASETS.get(name)
        templates = real.templates if real else BUILTIN_TEMPLATES[name]
    else:
        templates = info.templates if info is not None else ("a photo of a {}.",)
    return ImageSplits(uri, tuple(names), tuple(templates), train, val, test, info)


def load_image_splits(
    uri: str, *, columns: Mapping[str, str] | None = None, seed: int = SPLIT_SEED
) -> ImageSplits:
    """Load the image dataset named by ``uri`` as train/validation/test ``ImageSet``s (cached).

    ``columns`` may name the ``image`` and ``label`` columns; by default the first ``Image``
    feature and the first of ``LABEL_COLUMNS`` present are used. Rows with a negative or missing
    label (hidden test labels) are dropped.
    """
    problem = check_image_uri(uri)
    if problem:
        raise ValueError(problem)
    cols = tuple(sorted((k, v) for k, v in (columns or {}).items() if k in ("image", "label")))
    unknown = sorted(set(columns or {}) - {"image", "label"})
    if unknown:
        raise ValueError(
            f"{uri}: unknown columns key {unknown[0]!r} for an image dataset; allowed: image, label"
        )
    return _load_cached(uri.strip(), cols, seed)


def clear_image_cache() -> None:
    """Forget loaded image datasets (and URI classifications) of this process."""
    _load_cached.cache_clear()
    is_image_uri.cache_clear()


def with_names(splits: ImageSplits, label_names: Sequence[str]) -> ImageSplits:
    """``splits`` with other label names (same count), e.g. to prompt with other class names."""
    if len(label_names) != splits.num_labels:
        raise ValueError(f"need {splits.num_labels} label names, got {len(label_names)}")
    return replace(splits, label_names=tuple(label_names))
