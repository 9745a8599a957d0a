"""``{grid: [...]}`` expansion and ``--set key.path=value`` overrides on a raw study dict."""

from __future__ import annotations

import copy
import itertools
import json
from typing import Any

import yaml

from mergesec.orchestrator.yaml_load import load_yaml


def is_grid(value: Any) -> bool:
    return isinstance(value, dict) and set(value) == {"grid"}


def grid_paths(raw: Any, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], list[Any]]]:
    """Every ``{grid: [...]}`` in ``raw`` with its key path, in document order."""
    if is_grid(raw):
        return [(path, raw["grid"])]
    if isinstance(raw, dict):
        return [g for k, v in raw.items() for g in grid_paths(v, (*path, str(k)))]
    return []


def expand_grid(raw: dict[str, Any]) -> list[tuple[dict[str, str], dict[str, Any]]]:
    """The cartesian product of all grids: a list of (label, concrete study dict).

    ``label`` maps each grid's dotted key path to the chosen value (as text); it is empty when the
    study has no grid.
    """
    grids = grid_paths(raw)
    if not grids:
        return [({}, raw)]
    out = []
    for choice in itertools.product(*(values for _, values in grids)):
        variant = copy.deepcopy(raw)
        label = {}
        for (path, _), value in zip(grids, choice, strict=True):
            _set(variant, path, value)
            label[".".join(path)] = (
                value if isinstance(value, str) else json.dumps(value, sort_keys=True)
            )
        out.append((label, variant))
    return out


def _set(d: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for k in path[:-1]:
        d = d[k]
    d[path[-1]] = value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.path=value`` overrides (value parsed as YAML); raises ValueError on bad syntax."""
    out = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected key.path=value")
        key, text = item.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise ValueError(f"--set {item!r}: empty key path")
        d = out
        for p in parts[:-1]:
            if not isinstance(d.get(p), dict):
                d[p] = {}
            d = d[p]
        try:
            d[parts[-1]] = load_yaml(text)
        except yaml.YAMLError as e:
            raise ValueError(
                f"--set {item!r}: the value is not valid YAML ({getattr(e, 'problem', None) or e})"
            ) from None
    return out
