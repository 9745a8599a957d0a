"""TF-IDF + logistic-regression test accuracy on every real builtin dataset (a label sanity check).

Each text dataset is trained on its train split and scored on its test split (the same splits
every mergesec step sees); the validation split is not used. ``builtin:mnist`` gets a logistic
regression on raw pixels. The baseline in the same run is the majority-class accuracy. Needs
scikit-learn (``pip install -e .[dev]``).

    python benchmarks/real_data_baselines.py
    python benchmarks/real_data_baselines.py --datasets rotten_tomatoes bbc_news
"""

from __future__ import annotations

import argparse
import time
from collections import Counter

from mergesec.data import load_dataset_splits
from mergesec.data.real import REAL_DATASETS
from mergesec.data.real_images import REAL_IMAGE_DATASETS


def text_baseline(name: str) -> tuple[float, float]:
    """(test accuracy, majority-class test accuracy) of TF-IDF + logistic regression."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    d = load_dataset_splits(f"builtin:{name}")
    vec = TfidfVectorizer(sublinear_tf=True, ngram_range=(1, 2), min_df=2)
    x_train = vec.fit_transform([ex.text for ex in d.train])
    x_test = vec.transform([ex.text for ex in d.test])
    y_train = [ex.label for ex in d.train]
    y_test = [ex.label for ex in d.test]
    clf = LogisticRegression(C=10.0, max_iter=2000).fit(x_train, y_train)
    acc = float((clf.predict(x_test) == y_test).mean())
    majority = Counter(y_train).most_common(1)[0][0]
    return acc, sum(y == majority for y in y_test) / len(y_test)


def image_baseline(name: str) -> tuple[float, float]:
    """(test accuracy, majority-class accuracy) of logistic regression on raw pixels."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    d = load_dataset_splits(f"builtin:{name}")

    def arrays(split):
        xs = np.stack(
            [np.asarray(im.convert("L"), dtype=np.float32).ravel() / 255 for im, _ in split]
        )
        return xs, np.asarray(split.labels)

    (x_train, y_train), (x_test, y_test) = arrays(d.train), arrays(d.test)
    clf = LogisticRegression(C=0.1, max_iter=2000).fit(x_train, y_train)
    majority = Counter(y_train.tolist()).most_common(1)[0][0]
    return float((clf.predict(x_test) == y_test).mean()), float((y_test == majority).mean())


def main() -> None:
    names = sorted(REAL_DATASETS) + sorted(REAL_IMAGE_DATASETS)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="*", default=names, choices=names)
    args = ap.parse_args()
    print(f"{'dataset':<18}{'train':>7}{'val':>6}{'test':>6}{'classes':>8}{'accuracy':>10}"
          f"{'majority':>10}{'seconds':>9}")  # fmt: skip
    for name in args.datasets:
        start = time.perf_counter()
        image = name in REAL_IMAGE_DATASETS
        acc, majority = image_baseline(name) if image else text_baseline(name)
        spec = REAL_IMAGE_DATASETS[name] if image else REAL_DATASETS[name]
        train, val, test = spec.sizes
        print(f"{name:<18}{train:>7}{val:>6}{test:>6}{spec.num_classes:>8}{acc:>10.3f}"
              f"{majority:>10.3f}{time.perf_counter() - start:>9.1f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
