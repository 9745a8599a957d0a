"""Labelled text as chat turns for instruction-tuned causal LMs (e.g. SmolLM2-Instruct).

Each example becomes a user message asking for the label of the text, and the label name as the
assistant's reply. ``encode_chat`` renders the prompt with the tokenizer's chat template and
labels only the reply (and the template's end-of-turn token) for the loss.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
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


# ---------------------------------------------------------------------------------------------
# Chat datasets: ``chat:<labelled text dataset>[?train=N&validation=N&test=N&words=N]``
# ---------------------------------------------------------------------------------------------

CHAT_SCHEME = "chat:"
_CAPS = ("train", "validation", "test")
_SPLIT_SEED = 0


@dataclass(frozen=True)
class ChatExample:
    """One single-turn conversation: the user's request, the assistant's reply, and the topic
    (the source label name) the request is about."""

    prompt: str
    reply: str
    topic: str = ""

    def messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.prompt}]


@dataclass(frozen=True)
class ChatSplits:
    """A chat dataset: three splits of ``ChatExample`` and the replies' decoding budget."""

    name: str
    train: tuple[ChatExample, ...]
    validation: tuple[ChatExample, ...]
    test: tuple[ChatExample, ...]
    topics: tuple[str, ...] = ()
    max_new_tokens: int = 16
    max_length: int = 256

    kind = "chat"
    label_names: tuple[str, ...] = ()

    def split(self, name: str) -> tuple[ChatExample, ...]:
        if name not in _CAPS:
            raise KeyError(f"unknown split {name!r}; known: train, validation, test")
        return getattr(self, name)


def is_chat_uri(uri: str) -> bool:
    return uri.strip().startswith(CHAT_SCHEME)


def parse_chat_uri(uri: str) -> tuple[str, dict[str, int]]:
    """``(source URI, options)`` of ``chat:<source>?train=N&...``; ``ValueError`` when malformed."""
    rest = uri.strip()[len(CHAT_SCHEME) :]
    source, _, query = rest.partition("?")
    if not source.strip():
        raise ValueError(f"{uri}: a chat dataset names its source, e.g. chat:builtin:bbc_news")
    options: dict[str, int] = {}
    for part in filter(None, query.split("&")):
        key, _, value = part.partition("=")
        if key not in (*_CAPS, "words"):
            raise ValueError(
                f"{uri}: unknown chat option {key!r}; allowed: train, validation, test, words"
            )
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"{uri}: chat option {key} must be a whole number ≥ 1, got {value!r}")
        options[key] = int(value)
    return source.strip(), options


def seeded_sample(rows: Sequence[Any], n: int | None, seed: int) -> list[Any]:
    """``n`` rows drawn with ``seed`` (all when ``n`` is None or not smaller), in their order."""
    if n is None or n >= len(rows):
        return list(rows)
    return [rows[i] for i in sorted(random.Random(seed).sample(range(len(rows)), n))]


def reply_budget(replies: Sequence[str], cap: int = 64) -> int:
    """Greedy decoding length for replies like these: the longest in UTF-8 bytes (a byte-level
    tokenizer never needs more tokens) plus a margin for the end-of-turn token, at most ``cap``."""
    return min(cap, max((len(r.encode("utf-8")) for r in replies), default=cap) + 4)


def chat_splits_from(data: DatasetSplits, name: str, options: Mapping[str, int]) -> ChatSplits:
    """A labelled text dataset as chat: each text asked as ``ASK`` with its label name as reply;
    each split capped at a seeded sample of ``options[split]`` examples."""
    words = options.get("words", 64)
    out = {}
    for split in _CAPS:
        rows = chat_examples(data, split, None, words)
        exs = [
            ChatExample(m[0]["content"], reply, reply)
            for m, reply in seeded_sample(rows, options.get(split), _SPLIT_SEED)
        ]
        out[split] = tuple(exs)
    replies = [e.reply for s in out.values() for e in s]
    return ChatSplits(
        name, out["train"], out["validation"], out["test"], topics=tuple(data.label_names),
        max_new_tokens=reply_budget(replies),
    )  # fmt: skip


def with_replies(splits: ChatSplits, **changed: tuple[ChatExample, ...]) -> ChatSplits:
    """``splits`` with some splits replaced, the decoding budget grown to their replies."""
    new = replace(splits, **changed)
    replies = [e.reply for s in _CAPS for e in new.split(s)]
    return replace(new, max_new_tokens=max(splits.max_new_tokens, reply_budget(replies)))
