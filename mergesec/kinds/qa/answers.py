"""Final-answer extraction and exact match for GSM8K-style solutions (``... #### 42``).

The final answer is the number right after the first ``####``; a solution without a ``####`` falls
back to its last number (how GSM8K evaluations score free-form answers). Numbers are compared
as values: thousands separators, currency and percent signs and trailing zeros do not matter
(``#### $1,234.50`` matches ``1234.5``).
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

MARK = "####"
NUMBER = re.compile(r"[-+]?(?:\d[\d,]*(?:\.\d+)?|\.\d+)")


def normalize_number(text: str) -> str | None:
    """A number's canonical string (``"1,234.50"`` -> ``"1234.5"``, ``"-0"`` -> ``"0"``), else None."""
    raw = text.replace(",", "").strip()
    try:
        value = Decimal(raw)
    except InvalidOperation:
        return None
    if value == 0:
        return "0"
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def extract_answer(text: str) -> str | None:
    """The final answer of a solution, normalised; None when it holds no answer at all."""
    if MARK in text:
        after = text.split(MARK, 1)[1]
        line = after.strip().splitlines()[0] if after.strip() else ""
        m = NUMBER.search(line.replace("$", "").replace("%", " "))
        if m:
            return normalize_number(m.group(0))
        word = line.strip().rstrip(".").lower()
        return word or None
    found = NUMBER.findall(text.replace("$", ""))
    return normalize_number(found[-1]) if found else None


def exact_match(prediction: str, reference: str) -> bool:
    """Whether the prediction's final answer equals the reference's (both extracted)."""
    gold = extract_answer(reference)
    return gold is not None and extract_answer(prediction) == gold
