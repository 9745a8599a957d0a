"""A real labelled text dataset asked as questions (``data.chat.qa_records``) is a QA dataset.

Written as a ``.jsonl`` file it loads through ``load_qa_splits`` with answers ``#### <label>``
that exact match scores, and with a short decoding budget (``answer_budget``) instead of 256.
"""

from __future__ import annotations

import json

from mergesec.data import load_dataset_splits
from mergesec.data.chat import ASK, qa_records
from mergesec.data.qa import QAExample, answer_budget, is_qa_uri, load_qa_splits
from mergesec.kinds import dataset_kind
from mergesec.kinds.qa.answers import exact_match


def test_answer_budget_follows_the_longest_answer_in_bytes():
    rows = [QAExample("q", "#### fresh"), QAExample("q", "#### rotten")]
    assert answer_budget(rows) == len("#### rotten") + 8
    assert answer_budget([QAExample("q", "#### é")]) == len("#### é".encode()) + 8
    assert answer_budget([QAExample("q", "x" * 1000)]) == 256
    assert answer_budget([]) == 256


def test_real_dataset_as_qa_jsonl(tmp_path):
    data = load_dataset_splits("builtin:rotten_tomatoes")
    rows = qa_records(data, "train", 20, max_words=12)
    assert len(rows) == 20 and {r["answer"] for r in rows} <= {"#### fresh", "#### rotten"}
    first = data.train[0]
    assert rows[0]["question"] == ASK.format(
        text=" ".join(first.text.split()[:12]), choices="fresh, rotten"
    )
    assert rows[0]["answer"] == f"#### {data.label_names[first.label]}"

    f = tmp_path / "rt.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert is_qa_uri(str(f)) and dataset_kind({"uri": str(f)}) == "qa"
    qa = load_qa_splits(str(f))
    assert (len(qa.train), len(qa.validation), len(qa.test)) == (14, 3, 3)
    assert qa.max_new_tokens == len("#### rotten") + 8 and qa.max_length == 512
    ex = qa.test[0]
    assert exact_match(ex.answer, ex.answer)
    wrong = "#### rotten" if ex.answer.endswith("fresh") else "#### fresh"
    assert not exact_match(wrong, ex.answer)
    assert exact_match("It reads positive.\n" + ex.answer.upper(), ex.answer)
