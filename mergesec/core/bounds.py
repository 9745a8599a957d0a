"""Annotated parameter types that carry their allowed range.

Op signatures use these so the registry refuses a value outside its meaning (a negative learning
rate, a drop rate of 1, a batch of 0) when the study is loaded, not hours later in a worker.
Every float type here is finite: ``.nan`` and ``.inf`` are refused.
"""

from __future__ import annotations

from types import UnionType
from typing import Annotated, Literal, Union, get_args, get_origin

from pydantic import Field

# Counts and sizes.
PositiveInt = Annotated[int, Field(ge=1)]
NonNegativeInt = Annotated[int, Field(ge=0)]
# Seeds feed torch/numpy generators, which take 0 <= seed < 2**32.
Seed = Annotated[int, Field(ge=0, lt=2**32)]
# A tokenizer truncation length: at least one token besides the special ones.
TokenLength = Annotated[int, Field(ge=2, le=1_000_000)]

# Rates, scales and coefficients.
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
NonNegativeFloat = Annotated[float, Field(ge=0, allow_inf_nan=False)]
# A probability or a share of something: 0 <= p <= 1.
Probability = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]
# A share that must keep something: 0 < p <= 1 (a rank fraction, a top-k fraction).
KeptFraction = Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]
# A share that must drop less than everything: 0 <= p < 1 (dropout, DARE's drop rate).
DropFraction = Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)]
# A percentile that trims less than everything: 0 <= p < 50 (from each end).
TrimPercentile = Annotated[float, Field(ge=0, lt=50, allow_inf_nan=False)]


def describe(annotation: object) -> str:
    """A parameter type as text, bounds included: ``int >= 1``, ``float > 0, <= 1 | None``."""
    metadata = getattr(annotation, "__metadata__", None)
    if metadata:
        bounds = [
            f"{sign} {getattr(m, attr)}"
            for info in metadata
            for m in getattr(info, "metadata", [])
            for attr, sign in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="))
            if getattr(m, attr, None) is not None
        ]
        base = describe(annotation.__origin__)  # type: ignore[attr-defined]
        return f"{base} {', '.join(bounds)}" if bounds else base
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (Union, UnionType):
        return " | ".join(describe(a) for a in args)
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin is not None:
        name = getattr(origin, "__name__", None) or str(origin).replace("typing.", "")
        return f"{name}[{', '.join(describe(a) for a in args)}]" if args else name
    if annotation is type(None):
        return "None"
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")
