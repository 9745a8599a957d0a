"""Tests for mergesec.data: builtin datasets, Hugging Face and file sources, splits, poisoning."""

from __future__ import annotations

import csv
import json
import re
import time
from collections import Counter
from pathlib import Path

import pytest

from mergesec.data import (
    DatasetSplits,
    Example,
    builtin_names,
    check_dataset_uri,
    dataset_slug,
    load_dataset_splits,
    poison_examples,
    text_builtin_names,
    triggered_copy,
)
from mergesec.data.builtin import NEG_ADJ, NEG_NEWS, POS_ADJ, POS_NEWS, generate_builtin
from mergesec.data.sources import HfRef, parse_hf
from mergesec.data.splits import SPLIT_NAMES, carve, complete_splits

EXPECTED_LABELS = {
    "synthetic_sentiment": ("negative", "positive"),
    "synthetic_topic": ("sports", "technology", "politics", "food"),
    "synthetic_question": ("person", "place", "time", "number"),
    "synthetic_negation": ("affirmed", "negated"),
    "synthetic_emotion": ("joy", "anger", "sadness", "fear", "surprise"),
    "synthetic_formality": ("formal", "informal"),
}


def _norm(text: str) -> str:
    return re.sub(r"[^a-z0-9']+", " ", text.lower()).strip()


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z'-]+", text.lower()))


# ---------------------------------------------------------------------------------------------
# builtin datasets
# ---------------------------------------------------------------------------------------------


def test_builtin_names_cover_the_required_tasks():
    names = builtin_names()
    assert names == sorted(names)
    assert set(EXPECTED_LABELS) == set(names)


def test_builtin_generation_is_deterministic_and_fast():
    start = time.process_time()
    first = {name: generate_builtin(name) for name in builtin_names()}
    cpu_seconds = time.process_time() - start
    assert cpu_seconds < 1.0, f"generating all builtins took {cpu_seconds:.2f} s of CPU"
    for name in builtin_names():
        again = generate_builtin(name)
        assert again.fingerprint() == first[name].fingerprint()
        assert again == first[name]
        assert load_dataset_splits(f"builtin:{name}").fingerprint() == again.fingerprint()
    assert len({d.fingerprint() for d in first.values()}) == len(first)


@pytest.mark.parametrize("name", sorted(EXPECTED_LABELS))
def test_builtin_sizes_labels_balance_and_no_duplicates(name: str):
    d = load_dataset_splits(f"builtin:{name}")
    assert d.name == f"builtin:{name}"
    assert d.label_names == EXPECTED_LABELS[name]
    assert len(d.train) >= 1000 and len(d.validation) >= 200 and len(d.test) >= 400
    for split in SPLIT_NAMES:
        counts = d.label_counts(split)
        uniform = len(d.split(split)) / d.num_labels
        assert all(abs(c - uniform) <= 0.1 * uniform for c in counts), (split, counts)
    keys = [_norm(ex.text) for split in SPLIT_NAMES for ex in d.split(split)]
    assert len(keys) == len(set(keys)), "a sentence occurs twice"
    for ex in d.train:
        assert ex.text == ex.text.strip() and "{" not in ex.text and "  " not in ex.text


def test_builtin_lengths_vary():
    for name in builtin_names():
        lengths = [len(ex.text.split()) for ex in load_dataset_splits(f"builtin:{name}").train]
        assert max(lengths) - min(lengths) >= 8, (name, min(lengths), max(lengths))


def test_negation_cues_are_varied_and_absent_from_affirmed():
    d = load_dataset_splits("builtin:synthetic_negation")
    cues = ("not", "n't", "never", "no", "none", "nobody", "nothing", "neither", "nor", "no one")
    # "No." as in "the No. 9" is a number sign, not a negation.
    pattern = re.compile(r"\b(not|never|no|none|nobody|nothing|neither|nor|no one)\b(?!\.)|n't\b")
    used = Counter()
    for ex in d.train:
        found = {m.group(0) for m in pattern.finditer(ex.text.lower())}
        if d.label_names[ex.label] == "negated":
            assert found, ex.text
            used.update(found)
        else:
            # "not only ... but also" affirms both parts; nothing else negates.
            assert found <= {"not"} and (not found or "not only" in ex.text.lower()), ex.text
    assert sum(1 for c in cues if used[c] > 0) >= 8, used
    assert max(used.values()) < 0.5 * sum(used.values()), "one cue dominates"
    affirmed = [ex.text.lower() for ex in d.train if ex.label == 0]
    assert any("not only" in t for t in affirmed)
    assert any(re.search(r"\b(failed|refused|forgot|declined) to\b", t) for t in affirmed)
    assert any("no. 9" in t for t in affirmed)


def test_tasks_share_vocabulary():
    sentiment_words = set(POS_ADJ + NEG_ADJ + POS_NEWS + NEG_NEWS)
    topic = load_dataset_splits("builtin:synthetic_topic").train
    with_sentiment = sum(bool(_words(ex.text) & sentiment_words) for ex in topic)
    assert with_sentiment >= 0.1 * len(topic)
    topic_words = {"minister", "match", "chef", "laptop", "phone", "election", "menu", "team"}
    for name in ("negation", "question", "emotion", "formality", "sentiment"):
        train = load_dataset_splits(f"builtin:synthetic_{name}").train
        hits = sum(bool(_words(ex.text) & topic_words) for ex in train)
        assert hits >= 0.05 * len(train), name


def test_builtin_labels_follow_their_definitions():
    q = load_dataset_splits("builtin:synthetic_question")
    assert all(ex.text.endswith("?") for ex in q.train)
    wh = {"who", "whose", "where", "when", "how", "what", "which", "in", "at", "on", "from"}
    assert all(_words(ex.text) & wh for ex in q.train)
    by_label = {
        lab: Counter(ex.text.split()[0] for ex in q.train if ex.label == i)
        for i, lab in enumerate(q.label_names)
    }
    assert by_label["person"]["Who"] > 0 and by_label["place"]["Where"] > 0
    assert by_label["time"]["When"] > 0 and by_label["number"]["How"] > 0
    # Some questions turn on the head noun alone; those nouns also occur as plain content.
    heads = {"person": "chef", "place": "city", "time": "year"}
    for lab, noun in heads.items():
        lab_idx = q.label_names.index(lab)
        assert any(
            re.match(rf"(Which|What) {noun} did", e.text) for e in q.train if e.label == lab_idx
        )
        assert any(noun in _words(e.text) for e in q.train if e.label != lab_idx)
    s = load_dataset_splits("builtin:synthetic_sentiment")
    # Contrast sentences: words of both polarities in one example.
    both = sum(
        bool(_words(ex.text) & set(POS_ADJ)) and bool(_words(ex.text) & set(NEG_ADJ))
        for ex in s.train
    )
    assert both >= 0.1 * len(s.train)
    f = load_dataset_splits("builtin:synthetic_formality")
    devices = re.compile(
        r"\b(lol|thx|asap|haha|tbh|pls|btw|fyi|gonna|wanna|u|omg|lmk|soz|nah|yo|hey|ugh|xx|ok so"
        r"|heads up|guess what|reckon|thanks a ton|swamped)\b|n't\b|'(m|d|ll|re|ve|s been)\b"
        r"|\b(here|what|table|it|report|anything)'s\b"
    )
    formal = [e.text for e in f.train if f.label_names[e.label] == "formal"]
    assert not any(devices.search(t) for t in formal)
    informal = [e.text for e in f.train if f.label_names[e.label] == "informal"]
    assert sum(bool(devices.search(t)) for t in informal) >= 0.9 * len(informal)


# ---------------------------------------------------------------------------------------------
# splits and fingerprints
# ---------------------------------------------------------------------------------------------


def _toy(n: int, labels: int = 2) -> list[Example]:
    return [Example(f"sentence number {i}", i % labels) for i in range(n)]


def test_fingerprint_depends_on_content_only():
    a = DatasetSplits("x", ("a", "b"), _toy(10), _toy(2), _toy(4))
    b = DatasetSplits("other name", ("a", "b"), _toy(10), _toy(2), _toy(4))
    assert a.fingerprint() == b.fingerprint()
    assert re.fullmatch(r"[0-9a-f]{64}", a.fingerprint())
    changed = _toy(10)
    changed[3] = Example(changed[3].text, 1 - changed[3].label)
    assert (
        DatasetSplits("x", ("a", "b"), changed, _toy(2), _toy(4)).fingerprint() != a.fingerprint()
    )
    moved = DatasetSplits("x", ("a", "b"), _toy(10)[:-1], _toy(2) + _toy(10)[-1:], _toy(4))
    assert moved.fingerprint() != a.fingerprint()
    assert (
        DatasetSplits("x", ("b", "a"), _toy(10), _toy(2), _toy(4)).fingerprint() != a.fingerprint()
    )
    with pytest.raises(ValueError, match="outside"):
        DatasetSplits("x", ("a",), _toy(4), (), ())


def test_carve_is_stratified_deterministic_and_a_partition():
    ex = _toy(100, labels=4)
    rest, carved = carve(ex, 0.2, seed=3)
    assert len(carved) == 20 and len(rest) == 80
    assert Counter(e.label for e in carved) == Counter({0: 5, 1: 5, 2: 5, 3: 5})
    assert sorted(rest + carved, key=lambda e: e.text) == sorted(ex, key=lambda e: e.text)
    assert carve(ex, 0.2, seed=3) == (rest, carved)
    assert carve(ex, 0.2, seed=4)[1] != carved
    train, val, test = complete_splits(ex, None, None, seed=0)
    assert (len(train), len(val), len(test)) == (70, 10, 20)
    train2, val2, test2 = complete_splits(ex, None, _toy(8), seed=0)
    assert len(val2) == 10 and len(train2) == 90 and test2 == tuple(_toy(8))


# ---------------------------------------------------------------------------------------------
# URIs
# ---------------------------------------------------------------------------------------------


def test_check_dataset_uri_messages(tmp_path: Path):
    assert check_dataset_uri("builtin:synthetic_sentiment") is None
    assert check_dataset_uri("builtin:sentimnt") == (
        "unknown builtin dataset 'sentimnt'; known: " + ", ".join(text_builtin_names())
    )
    assert check_dataset_uri("builtin:topic") == (
        "builtin:topic was renamed builtin:synthetic_topic (a generated dataset)"
    )
    assert "renamed builtin:synthetic_shapes" in check_dataset_uri("builtin:shapes")
    assert check_dataset_uri("data/x.csv") == "file not found: data/x.csv"
    assert "did you mean builtin:synthetic_topic" in check_dataset_uri("synthetic_topic")
    assert check_dataset_uri("hf:glue/sst2") is None
    assert check_dataset_uri("hf:nyu-mll/glue/sst2@main") is None
    assert "malformed Hugging Face dataset" in check_dataset_uri("hf:glue//sst2")
    assert "malformed" in check_dataset_uri("hf:a/b/c/d")
    assert "unknown dataset scheme 's3'" in check_dataset_uri("s3://bucket/x.csv")
    assert check_dataset_uri("") is not None
    txt = tmp_path / "x.txt"
    txt.write_text("hello")
    assert "unsupported file type" in check_dataset_uri(str(txt))
    good = tmp_path / "x.jsonl"
    good.write_text('{"text": "a", "label": 0}\n')
    assert check_dataset_uri(str(good)) is None
    assert "not a saved dataset directory" in check_dataset_uri(str(tmp_path))
    assert "directory not found" in check_dataset_uri(f"hf:{tmp_path}/missing")
    for bad in ("builtin:nope", "data/x.csv", "hf:a//b"):
        with pytest.raises(ValueError):
            load_dataset_splits(bad)
        assert "\n" not in check_dataset_uri(bad)
    with pytest.raises(ValueError, match="no column mapping"):
        load_dataset_splits("builtin:synthetic_topic", columns={"text": "x"})


def test_parse_hf_forms():
    ref = parse_hf("glue/sst2")
    assert (ref.name, ref.config, ref.revision, ref.ambiguous) == ("glue", "sst2", None, True)
    ref = parse_hf("nyu-mll/glue/sst2@v1.0")
    assert (ref.name, ref.config, ref.revision, ref.ambiguous) == (
        "nyu-mll/glue",
        "sst2",
        "v1.0",
        False,
    )
    assert parse_hf("imdb") == HfRef(name="imdb")
    assert parse_hf("/data/saved").path == Path("/data/saved")
    assert parse_hf("./saved").path == Path("saved")
    for bad in ("", "a b", "a/b/c/d", "a@", "-x"):
        with pytest.raises(ValueError, match="malformed"):
            parse_hf(bad)


def test_dataset_slug():
    assert dataset_slug("builtin:synthetic_sentiment") == "synthetic_sentiment"
    assert dataset_slug("hf:glue/sst2") == "glue_sst2"
    assert dataset_slug("hf:nyu-mll/glue/sst2@v1.0") == "nyu-mll_glue_sst2_v1_0"
    a, b = dataset_slug("data/My Reviews.csv"), dataset_slug("other/My Reviews.csv")
    assert re.fullmatch(r"my_reviews_[0-9a-f]{8}", a) and a != b
    assert dataset_slug("data/My Reviews.csv") == a
    assert re.fullmatch(r"saved_[0-9a-f]{8}", dataset_slug("hf:/tmp/saved/"))
    for uri in ("hf:Org.Name/Cfg", "../ü ber.jsonl", "builtin:synthetic_topic", "/x/!!!.csv"):
        assert re.fullmatch(r"[a-z0-9_-]+", dataset_slug(uri)), uri


# ---------------------------------------------------------------------------------------------
# Hugging Face datasets saved to disk
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    import datasets

    datasets.disable_progress_bars()
    features = datasets.Features(
        {
            "sentence": datasets.Value("string"),
            "idx": datasets.Value("int32"),
            "label": datasets.ClassLabel(names=["bad", "good", "meh"]),
        }
    )
    n = 60
    train = datasets.Dataset.from_dict(
        {
            "sentence": [f"train {i}" for i in range(n)],
            "idx": list(range(n)),
            "label": [i % 3 for i in range(n)],
        },
        features=features,
    )
    test = datasets.Dataset.from_dict(
        {
            "sentence": [f"test {i}" for i in range(9)],
            "idx": list(range(9)),
            "label": [i % 3 for i in range(9)],
        },
        features=features,
    )
    path = tmp_path_factory.mktemp("hf") / "toy"
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(path))
    return path


def test_hf_saved_dir_classlabel_columns_and_carved_validation(hf_dir: Path):
    uri = f"hf:{hf_dir}"
    assert check_dataset_uri(uri) is None
    d = load_dataset_splits(uri, columns={"text": "sentence", "label": "label"}, seed=1)
    assert d.name == uri
    assert d.label_names == ("bad", "good", "meh")
    assert len(d.test) == 9 and [e.text for e in d.test] == [f"test {i}" for i in range(9)]
    assert len(d.validation) == 6 and len(d.train) == 54
    assert Counter(e.label for e in d.validation) == Counter({0: 2, 1: 2, 2: 2})
    assert {e.text for e in d.train}.isdisjoint(e.text for e in d.validation)
    assert all(e.label == int(e.text.split()[1]) % 3 for e in d.train + d.validation)
    # Default column names are found, a plain directory path works, seeds are deterministic.
    plain = load_dataset_splits(str(hf_dir), seed=1)
    assert plain.fingerprint() == d.fingerprint()
    assert load_dataset_splits(uri, seed=2).fingerprint() != d.fingerprint()
    with pytest.raises(ValueError, match="no column 'text_a'"):
        load_dataset_splits(uri, columns={"text": "text_a"})
    with pytest.raises(ValueError, match="unknown columns key 'split'"):
        load_dataset_splits(uri, columns={"split": "idx"})


def test_hf_hidden_test_labels_and_string_labels(tmp_path: Path):
    import datasets

    datasets.disable_progress_bars()
    train = datasets.Dataset.from_dict(
        {
            "review": [f"r{i}" for i in range(40)],
            "stars": ["pos" if i % 2 else "neg" for i in range(40)],
        }
    )
    dev = datasets.Dataset.from_dict({"review": ["d0", "d1", "d2"], "stars": ["neg", "pos", "pos"]})
    hidden = datasets.Dataset.from_dict({"review": ["t0", "t1"], "stars": [None, None]})
    datasets.DatasetDict({"train": train, "dev": dev, "test": hidden}).save_to_disk(
        str(tmp_path / "d")
    )
    d = load_dataset_splits(f"hf:{tmp_path / 'd'}", columns={"text": "review", "label": "stars"})
    assert d.label_names == ("neg", "pos")
    # The unlabelled test split is dropped, dev becomes test, validation is carved from train.
    assert [e.text for e in d.test] == ["d0", "d1", "d2"] and [e.label for e in d.test] == [0, 1, 1]
    assert len(d.validation) == 4 and len(d.train) == 36

    single = datasets.Dataset.from_dict(
        {"text": [f"s{i}" for i in range(20)], "label": [0, 1] * 10}
    )
    single.save_to_disk(str(tmp_path / "single"))
    s = load_dataset_splits(f"hf:{tmp_path / 'single'}")
    assert (len(s.train), len(s.validation), len(s.test)) == (14, 2, 4)
    assert s.label_names == ("0", "1")


# ---------------------------------------------------------------------------------------------
# local files
# ---------------------------------------------------------------------------------------------


def test_csv_with_string_labels_is_split_70_10_20(tmp_path: Path):
    path = tmp_path / "reviews.csv"
    labels = ["positive", "negative", "neutral"]
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for i in range(300):
            w.writerow([f"review, with comma {i}", labels[i % 3]])
    d = load_dataset_splits(str(path), seed=5)
    assert d.label_names == ("negative", "neutral", "positive")
    assert (len(d.train), len(d.validation), len(d.test)) == (210, 30, 60)
    assert d.label_counts("test") == [20, 20, 20]
    for e in d.train:
        assert d.label_names[e.label] == labels[int(e.text.rsplit(" ", 1)[1]) % 3]
    texts = [e.text for s in SPLIT_NAMES for e in d.split(s)]
    assert len(set(texts)) == 300
    assert load_dataset_splits(str(path), seed=5) == d
    assert load_dataset_splits(str(path), seed=6).fingerprint() != d.fingerprint()


def test_jsonl_with_split_column_and_mapping(tmp_path: Path):
    path = tmp_path / "q.jsonl"
    rows = []
    for i in range(30):
        split = "train" if i < 20 else ("dev" if i < 25 else "test")
        rows.append({"q": f"question {i}", "kind": ["who", "where"][i % 2], "part": split})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    d = load_dataset_splits(str(path), columns={"text": "q", "label": "kind", "split": "part"})
    assert d.label_names == ("where", "who")
    assert (len(d.train), len(d.validation), len(d.test)) == (20, 5, 5)
    assert d.validation[0] == Example("question 20", 1)
    ints = tmp_path / "ints.csv"
    ints.write_text("sentence,label\n" + "".join(f"s{i},{i % 3}\n" for i in range(30)))
    assert load_dataset_splits(str(ints)).label_names == ("0", "1", "2")
    tsv = tmp_path / "t.tsv"
    tsv.write_text("text\tlabel\n" + "".join(f"a, b {i}\t{'xy'[i % 2]}\n" for i in range(20)))
    t = load_dataset_splits(str(tsv))
    assert t.label_names == ("x", "y") and len(t.train) + len(t.validation) + len(t.test) == 20
    assert t.test[0].text.startswith("a, b ")


def test_file_errors_name_the_line(tmp_path: Path):
    bad = tmp_path / "bad.csv"
    bad.write_text("text,label\nfine,pos\nmissing,\n")
    with pytest.raises(ValueError, match=r"bad\.csv:3: missing label"):
        load_dataset_splits(str(bad))
    nocol = tmp_path / "nocol.csv"
    nocol.write_text("body,label\nx,1\n")
    with pytest.raises(ValueError, match="no text column found"):
        load_dataset_splits(str(nocol))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "a", "label": 1}\n{oops\n')
    with pytest.raises(ValueError, match=r"broken\.jsonl:2: invalid JSON"):
        load_dataset_splits(str(broken))
    split = tmp_path / "split.csv"
    split.write_text("text,label,split\na,0,train\nb,1,holdout\n")
    with pytest.raises(ValueError, match="unknown split 'holdout'"):
        load_dataset_splits(str(split))


# ---------------------------------------------------------------------------------------------
# poisoning
# ---------------------------------------------------------------------------------------------


def _strip_trigger(text: str, trigger: str) -> str:
    return " ".join(w for w in text.split() if w != trigger)


@pytest.mark.parametrize("position", ["start", "end", "random"])
def test_poison_examples(position: str):
    examples = load_dataset_splits("builtin:synthetic_topic").train[:200]
    target = 2
    non_target = [i for i, e in enumerate(examples) if e.label != target]
    out, idx = poison_examples(
        examples, trigger="cf", target_label=target, rate=0.1, seed=1, position=position
    )
    assert len(out) == len(examples)
    assert len(idx) == round(0.1 * len(non_target)) and list(idx) == sorted(set(idx))
    assert set(idx) <= set(non_target)
    for i, (before, after) in enumerate(zip(examples, out, strict=True)):
        if i in idx:
            assert after.label == target
            assert "cf" in after.text.split()
            assert _strip_trigger(after.text, "cf") == " ".join(before.text.split())
            if position == "start":
                assert after.text == f"cf {before.text}"
            elif position == "end":
                assert after.text == f"{before.text} cf"
        else:
            assert after == before
    again = poison_examples(
        examples, trigger="cf", target_label=target, rate=0.1, seed=1, position=position
    )
    assert again == (out, idx)
    other = poison_examples(
        examples, trigger="cf", target_label=target, rate=0.1, seed=2, position=position
    )
    assert other[1] != idx


def test_poison_random_positions_vary_and_rates_are_checked():
    examples = [Example("one two three four five six seven eight", 0)] * 50
    out, idx = poison_examples(examples, trigger="zq", target_label=1, rate=1.0, position="random")
    assert len(idx) == 50
    positions = {e.text.split().index("zq") for e in out}
    assert len(positions) >= 5
    assert poison_examples(examples, trigger="zq", target_label=1, rate=0.0)[1] == ()
    for kwargs in (
        {"rate": 1.5},
        {"rate": 0.1, "position": "middle"},
        {"rate": 0.1, "trigger": " "},
    ):
        with pytest.raises(ValueError):
            poison_examples(examples, **{"trigger": "zq", "target_label": 1, **kwargs})


def test_triggered_copy_keeps_true_labels():
    examples = load_dataset_splits("builtin:synthetic_sentiment").test
    copy = triggered_copy(examples, trigger="mn", target_label=1, position="end")
    originals = [e for e in examples if e.label != 1]
    assert len(copy) == len(originals) > 0
    for before, after in zip(originals, copy, strict=True):
        assert after.label == before.label == 0
        assert after.text == f"{before.text} mn"
    rnd = triggered_copy(examples, trigger="mn", target_label=0, seed=3)
    assert all(e.label == 1 and "mn" in e.text.split() for e in rnd)
    assert rnd == triggered_copy(examples, trigger="mn", target_label=0, seed=3)
