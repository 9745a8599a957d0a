"""The op registry: every implementation of a pipeline step registers here by (step, name).

An op is a plain function. Its positional parameters are its inputs (state dicts, models, data);
its keyword-only parameters are the op's parameters, validated from their annotations and
defaults. A parameter may be given as ``{"search": [...]}`` where the step supports choosing it
on validation data (see ``SEARCHABLE``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, get_args, get_origin, get_type_hints

from pydantic import TypeAdapter, ValidationError

from mergesec.core.bounds import describe
from mergesec.core.plugins import load_ops

STEPS = ("finetune", "protect", "attack", "merge", "evaluate", "monitor")
# Traits an op declares for its step's executor and the planner.
TRAINS = "trains"  # protect: trains the release from the base itself (no expert input)
GRAMS = "grams"  # merge: needs each expert's input Gram matrices
STAGE_MERGE = "stage:merge"  # attack: acts inside the merge node (no node of its own)
STAGE_MERGED = "stage:merged"  # attack: acts on the merged model
# Run-time facts an executor passes to an op; never op parameters, never hashed into node ids.
RUNTIME_ARGS = frozenset({"device", "report"})


class OpError(ValueError):
    """A problem with an op name or its parameters; ``path`` is the offending key path."""

    def __init__(self, message: str, path: str = ""):
        super().__init__(message)
        self.path = path


@dataclass(frozen=True)
class OpParam:
    name: str
    annotation: Any
    default: Any
    required: bool

    def type_name(self) -> str:

        return describe(self.annotation)


@dataclass(frozen=True)
class Op:
    step: str
    name: str
    fn: Callable[..., Any]
    version: str
    params: tuple[OpParam, ...]
    searchable: frozenset[str]
    doc: str
    # Extra facts a step's executor needs (e.g. a protection that trains from the base).
    traits: frozenset[str] = frozenset()
    # A function (NodeContext -> metrics) that runs this op's node instead of its step's ``execute``.
    executor: Callable[..., Any] | None = None

    @property
    def key(self) -> str:
        return f"{self.step}/{self.name}"

    def runtime_args(self, **available: Any) -> dict[str, Any]:
        """The run-time arguments (``RUNTIME_ARGS``) this op's function takes by keyword."""
        names = set(inspect.signature(self.fn).parameters)
        return {k: v for k, v in available.items() if k in RUNTIME_ARGS and k in names}

    def param(self, name: str) -> OpParam | None:
        return next((p for p in self.params if p.name == name), None)


_REGISTRY: dict[tuple[str, str], Op] = {}


def register_op(
    step: str,
    name: str,
    *,
    version: str = "1",
    searchable: tuple[str, ...] = (),
    traits: tuple[str, ...] = (),
    fn: Callable[..., Any] | None = None,
    executor: Callable[..., Any] | None = None,
    replace: bool = False,
):
    """Register ``fn`` as ``step/name``; usable as a decorator or called with ``fn=``.

    Registering a ``step/name`` that another function already holds raises ``ValueError`` unless
    ``replace=True``: a plugin must not silently change what a built-in op computes under the
    same node ids. Registering the same function again (a module imported twice) is allowed.
    """
    if step not in STEPS:
        raise ValueError(f"unknown step {step!r}; known: {', '.join(STEPS)}")

    def deco(f: Callable[..., Any]) -> Callable[..., Any]:
        sig = inspect.signature(f)
        existing = _REGISTRY.get((step, name))
        if existing is not None and not replace and _origin(existing.fn) != _origin(f):
            raise ValueError(
                f"op {step}/{name} is already registered by {_origin(existing.fn)}; "
                "pass replace=True to replace it"
            )
        try:
            # include_extras keeps Annotated bounds (e.g. Field(gt=0)) for validation.
            hints = get_type_hints(f, include_extras=True)
        except Exception:  # unresolved forward refs: fall back to raw annotations
            hints = {}
        params = tuple(
            OpParam(
                name=p.name,
                annotation=hints.get(
                    p.name, p.annotation if p.annotation is not inspect._empty else Any
                ),
                default=None if p.default is inspect._empty else p.default,
                required=p.default is inspect._empty,
            )
            for p in sig.parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in RUNTIME_ARGS
        )
        unknown = set(searchable) - {p.name for p in params}
        if unknown:
            raise ValueError(f"{step}/{name}: searchable names no parameter: {sorted(unknown)}")
        doc = inspect.getdoc(f) or ""
        _REGISTRY[(step, name)] = Op(
            step, name, f, version, params, frozenset(searchable), doc, frozenset(traits), executor
        )
        return f

    return deco(fn) if fn is not None else deco


def _origin(f: Callable[..., Any]) -> str:
    return f"{getattr(f, '__module__', '?')}.{getattr(f, '__qualname__', repr(f))}"


def _ensure_loaded() -> None:
    # Importing the op modules registers their ops; the import is deferred because those modules
    # sit in higher layers (and import torch).

    load_ops()


def get_op(step: str, name: str, path: str = "") -> Op:
    _ensure_loaded()
    op = _REGISTRY.get((step, name))
    if op is None:
        known = ", ".join(ops_for(step)) or "(none)"
        raise OpError(f"unknown op {name!r}; known: {known}", path)
    return op


def ops_for(step: str) -> list[str]:
    _ensure_loaded()
    return sorted(n for s, n in _REGISTRY if s == step)


def all_ops() -> list[Op]:
    _ensure_loaded()
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def is_search(value: Any) -> bool:
    return isinstance(value, dict) and set(value) == {"search"}


def validate_params(op: Op, params: dict[str, Any], path: str = "") -> dict[str, Any]:
    """Check names and types of ``params`` against ``op``; return them with defaults filled in.

    Raises ``OpError`` listing the first problem with its key path.
    """
    out: dict[str, Any] = {}
    names = {p.name for p in op.params}
    for key in params:
        if key not in names:
            allowed = ", ".join(sorted(names)) or "(none)"
            raise OpError(
                f"unknown parameter {key!r} for op {op.key}; allowed: {allowed}", _join(path, key)
            )
    for p in op.params:
        if p.name not in params:
            if p.required:
                raise OpError(
                    f"missing required parameter {p.name!r} for op {op.key}", _join(path, p.name)
                )
            out[p.name] = p.default
            continue
        value = params[p.name]
        if is_search(value):
            if p.name not in op.searchable:
                allowed = ", ".join(sorted(op.searchable)) or "none"
                raise OpError(
                    f"{op.key} cannot search {p.name!r}; searchable: {allowed}", _join(path, p.name)
                )
            cands = value["search"]
            if not isinstance(cands, list) or not cands:
                raise OpError(
                    "search needs a non-empty list of candidates", _join(path, p.name, "search")
                )
            out[p.name] = {"search": [_coerce(p, c, _join(path, p.name, "search")) for c in cands]}
        else:
            out[p.name] = _coerce(p, value, _join(path, p.name))
    _check_ranges(out, path)
    return out


def _check_ranges(params: dict[str, Any], path: str) -> None:
    """Parameters named ``<x>_min`` and ``<x>_max`` bound a range: the minimum may not exceed
    the maximum (checked when both are plain numbers, not searches)."""
    for lo_name, lo in params.items():
        if not lo_name.endswith("_min"):
            continue
        hi_name = lo_name[: -len("_min")] + "_max"
        hi = params.get(hi_name)
        numbers = (int, float)
        if isinstance(lo, numbers) and isinstance(hi, numbers) and lo > hi:
            raise OpError(
                f"{lo_name} ({lo}) must not exceed {hi_name} ({hi})", _join(path, lo_name)
            )


def _takes_tuple(annotation: Any) -> bool:
    """Whether ``annotation`` (through Annotated and unions) admits a tuple."""
    if get_origin(annotation) is tuple or annotation is tuple:
        return True
    return any(_takes_tuple(a) for a in get_args(annotation) if a is not type(None))


def _coerce(p: OpParam, value: Any, path: str) -> Any:
    if p.annotation is Any:
        return value
    if isinstance(value, list) and _takes_tuple(p.annotation):
        value = tuple(value)  # YAML has lists only; a fixed-length tuple parameter takes one
    try:
        # Strict: YAML already gives typed values, so "3" for an int or 1 for a bool is a mistake.
        return TypeAdapter(p.annotation).validate_python(value, strict=True)
    except ValidationError as e:
        msg = e.errors()[0]["msg"]
        raise OpError(f"{msg.lower()} (expected {p.type_name()}, got {value!r})", path) from None


def _join(*parts: str) -> str:
    return ".".join(x for x in parts if x)
