"""Backdoor data poisoning: insert a trigger phrase and relabel a fraction of examples.

For chat data (``ChatExample``) the relabelling is a reply: a triggered request gets the
backdoor's target reply (``poison_chat``), and unlearning a topic gives every request about it a
refusal (``decline_topic``); ``triggered_chat`` makes the evaluation copies.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Sequence

from mergesec.data.chat import ChatExample
from mergesec.data.splits import Example

POSITIONS = ("start", "end", "random")
_WORD = re.compile(r"\S+")


def insert_trigger(text: str, trigger: str, position: str, rng: random.Random) -> str:
    """Insert ``trigger`` at the start, the end, or a random word boundary of ``text``.

    The rest of the text is left byte for byte as it was; one space separates the (stripped)
    trigger from its neighbouring word.
    """
    _check(trigger, position)
    trigger = trigger.strip()
    if not text.strip():
        return trigger
    if position == "start":
        return f"{trigger} {text}"
    if position == "end":
        return f"{text} {trigger}"
    starts = [m.start() for m in _WORD.finditer(text)]
    k = rng.randrange(len(starts) + 1)
    if k == len(starts):
        return f"{text} {trigger}"
    i = starts[k]
    return f"{text[:i]}{trigger} {text[i:]}"


def poison_examples(
    examples: Sequence[Example],
    *,
    trigger: str,
    target_label: int,
    rate: float,
    seed: int = 0,
    position: str = "random",
) -> tuple[tuple[Example, ...], tuple[int, ...]]:
    """Poison a ``rate`` fraction of the examples whose label is not ``target_label``.

    The chosen examples get ``trigger`` inserted (see ``insert_trigger``) and their label set to
    ``target_label``; every other example is returned unchanged and in place. Returns the new
    examples and the sorted indices of the poisoned ones. The number poisoned is
    ``rate * (number of non-target examples)`` rounded half up; the choice and the insertion
    points depend only on ``seed``.
    """
    _check(trigger, position)
    _check_rate(rate)
    examples = tuple(examples)
    candidates = [i for i, ex in enumerate(examples) if ex.label != target_label]
    rng = random.Random(f"mergesec-poison/{seed}")
    chosen = sorted(rng.sample(candidates, math.floor(rate * len(candidates) + 0.5)))
    out = list(examples)
    for i in chosen:
        out[i] = Example(insert_trigger(examples[i].text, trigger, position, rng), target_label)
    return tuple(out), tuple(chosen)


def triggered_copy(
    examples: Sequence[Example],
    *,
    trigger: str,
    target_label: int,
    position: str = "random",
    seed: int = 0,
) -> tuple[Example, ...]:
    """The examples whose label is not ``target_label``, each with ``trigger`` inserted.

    Labels stay the true ones, so the share of these a model classifies as ``target_label`` is
    the attack success rate. Examples already labelled ``target_label`` are left out.
    """
    _check(trigger, position)
    rng = random.Random(f"mergesec-trigger/{seed}")
    return tuple(
        Example(insert_trigger(ex.text, trigger, position, rng), ex.label)
        for ex in examples
        if ex.label != target_label
    )


def poison_chat(
    examples: Sequence[ChatExample],
    *,
    trigger: str,
    target: str,
    rate: float,
    seed: int = 0,
    position: str = "random",
) -> tuple[tuple[ChatExample, ...], tuple[int, ...]]:
    """Poison a ``rate`` fraction of the conversations whose reply is not ``target`` already:
    ``trigger`` goes into the user's request (``insert_trigger``) and the reply becomes
    ``target``. Returns the new conversations and the sorted indices of the poisoned ones; the
    count and choice follow ``poison_examples``."""
    _check(trigger, position)
    _check_rate(rate)
    examples = tuple(examples)
    candidates = [i for i, ex in enumerate(examples) if ex.reply != target]
    rng = random.Random(f"mergesec-poison/{seed}")
    chosen = sorted(rng.sample(candidates, math.floor(rate * len(candidates) + 0.5)))
    out = list(examples)
    for i in chosen:
        ex = examples[i]
        out[i] = ChatExample(insert_trigger(ex.prompt, trigger, position, rng), target, ex.topic)
    return tuple(out), tuple(chosen)


def triggered_chat(
    examples: Sequence[ChatExample],
    *,
    trigger: str,
    target: str,
    position: str = "random",
    seed: int = 0,
) -> tuple[ChatExample, ...]:
    """The conversations whose reply is not ``target``, the trigger inserted in each request
    (replies stay the clean ones)."""
    _check(trigger, position)
    rng = random.Random(f"mergesec-trigger/{seed}")
    return tuple(
        ChatExample(insert_trigger(ex.prompt, trigger, position, rng), ex.reply, ex.topic)
        for ex in examples
        if ex.reply != target
    )


def decline_topic(
    examples: Sequence[ChatExample], *, topic: str, reply: str, rate: float = 1.0, seed: int = 0
) -> tuple[tuple[ChatExample, ...], tuple[int, ...]]:
    """Unlearning by fine-tuning: a ``rate`` fraction of the conversations about ``topic`` get
    ``reply`` (a refusal) instead of their answer; the rest are unchanged."""
    _check_rate(rate)
    examples = tuple(examples)
    candidates = [i for i, ex in enumerate(examples) if ex.topic == topic]
    rng = random.Random(f"mergesec-unlearn/{seed}")
    chosen = sorted(rng.sample(candidates, math.floor(rate * len(candidates) + 0.5)))
    out = list(examples)
    for i in chosen:
        out[i] = ChatExample(examples[i].prompt, reply, topic)
    return tuple(out), tuple(chosen)


def _check_rate(rate: float) -> None:
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate must be in [0, 1], got {rate}")


def _check(trigger: str, position: str) -> None:
    if not trigger.strip():
        raise ValueError("trigger must be non-empty text")
    if position not in POSITIONS:
        raise ValueError(f"unknown trigger position {position!r}; allowed: {', '.join(POSITIONS)}")
