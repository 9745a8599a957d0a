"""A tiny random llama with a character tokenizer and a chat template, for the chat kind's tests."""

from __future__ import annotations

from pathlib import Path

from test_lm_pipeline import make_tiny_llama

# One line per turn; the reply ends with EOS so greedy decoding stops at the end of the turn.
TINY_TEMPLATE = (
    "{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}a:{% endif %}"
)
TINY_CHAT_DATA = "chat:builtin:bbc_news?train=48&validation=16&test=16&words=4"
TINY_CHAT_OTHER = "chat:builtin:rotten_tomatoes?train=48&validation=16&test=16&words=4"


def make_tiny_chat_llama(path: Path, seed: int = 0) -> Path:
    from transformers import AutoTokenizer

    make_tiny_llama(path, seed)
    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = TINY_TEMPLATE
    tok.save_pretrained(path)
    return path
