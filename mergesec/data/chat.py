"""Labelled text as chat turns for instruction-tuned causal LMs (e.g. SmolLM2-Instruct).

Each example becomes a user message asking for the label of the text, and the label name as the
assistant's reply. ``encode_chat`` renders the prompt with the tokenizer's chat template and
labels only the reply (and the template's end-of-turn token) for the loss.
"""

from __future__ import annotations

from typing import Any

from mergesec.data.splits import DatasetSplits

IGNORE = -100
ASK = "{text}\n\nWhich one is this: {choices}? Answer with one word."


def chat_examples(
    splits: DatasetSplits, split: str, limit: int | None = None, max_words: int = 64
) -> list[tuple[list[dict[str, str]], str]]:
    """``(messages, reply)`` pairs of the first ``limit`` examples of ``split``."""
    choices = ", ".join(splits.label_names)
    out = []
    for ex in splits.split(split)[:limit]:
        text = " ".join(ex.text.split()[:max_words])
        messages = [{"role": "user", "content": ASK.format(text=text, choices=choices)}]
        out.append((messages, splits.label_names[ex.label]))
    return out


def qa_records(
    splits: DatasetSplits, split: str, limit: int | None = None, max_words: int = 64
) -> list[dict[str, str]]:
    """The same questions as QA rows ``{question, answer}`` with answers ``#### <label name>``:
    written as a ``.jsonl`` file, a labelled text dataset becomes a QA dataset for causal LMs."""
    return [
        {"question": m[0]["content"], "answer": f"#### {reply}"}
        for m, reply in chat_examples(splits, split, limit, max_words)
    ]


def encode_chat(
    tokenizer: Any, messages: list[dict[str, str]], reply: str
) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)``: the templated prompt, then the reply; labels -100 on the prompt."""
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(
        [*messages, {"role": "assistant", "content": reply}], tokenize=False
    )
    if not full.startswith(prompt):
        raise ValueError("the chat template does not extend the prompt with the reply")
    p = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    r = list(tokenizer(full[len(prompt) :], add_special_tokens=False)["input_ids"])
    return p + r, [IGNORE] * len(p) + r
