"""Imports: one-way layers (import-linter, configured in pyproject.toml) and imports inside
functions only where they defer a heavy library."""

from __future__ import annotations

import ast
import shutil
import subprocess
from functools import cache
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mergesec"
# Libraries worth deferring: each takes from a tenth of a second to seconds to import.
HEAVY = frozenset(
    {"torch", "transformers", "peft", "datasets", "ray", "mlflow", "matplotlib", "scipy",
     "sklearn", "gguf", "pyarrow", "safetensors", "PIL", "numpy", "tokenizers"}
)  # fmt: skip


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_path(name: str) -> Path | None:
    base = PACKAGE.parent.joinpath(*name.split("."))
    for p in (base.with_suffix(".py"), base / "__init__.py"):
        if p.is_file():
            return p
    return None


def _resolve(node: ast.ImportFrom, current: str, is_pkg: bool) -> str:
    if not node.level:
        return node.module or ""
    parts = current.split(".")
    parts = parts if is_pkg else parts[:-1]
    parts = parts[: len(parts) - node.level + 1]
    return ".".join(parts + ([node.module] if node.module else []))


def imported(node: ast.AST, current: str, is_pkg: bool) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom):
        base = _resolve(node, current, is_pkg)
        out = []
        for a in node.names:
            sub = f"{base}.{a.name}"
            out.append(sub if module_path(sub) else base)
        return out
    return []


def _type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def top_level_imports(name: str) -> set[str]:
    """Modules imported when ``name`` is imported (module level, outside TYPE_CHECKING)."""
    path = module_path(name)
    if path is None:
        return set()
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    stack = list(ast.parse(path.read_text()).body)
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _type_checking(node):
            continue
        if isinstance(node, (ast.If, ast.Try)):
            stack += (
                node.body
                + node.orelse
                + getattr(node, "handlers", [])
                + getattr(node, "finalbody", [])
            )
        elif isinstance(node, ast.ExceptHandler):
            stack += node.body
        out.update(imported(node, name, is_pkg))
    return out


@cache
def heavy_closure(name: str) -> frozenset[str]:
    """The heavy libraries that importing ``name`` loads (through first-party modules too)."""
    seen, todo, heavy = set(), [name], set()
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        root = m.split(".")[0]
        if root in HEAVY:
            heavy.add(root)
        elif root == "mergesec":
            parts = m.split(".")
            todo += [".".join(parts[:i]) for i in range(2, len(parts))]  # parent packages
            todo += list(top_level_imports(m))
    return frozenset(heavy)


def function_imports(path: Path) -> list[tuple[int, str]]:
    name = module_name(path)
    is_pkg = path.name == "__init__.py"
    out = []
    for fn in ast.walk(ast.parse(path.read_text())):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                for m in imported(node, name, is_pkg):
                    if m.startswith("mergesec"):
                        out.append((node.lineno, m))
    return out


def test_imports_inside_functions_only_defer_heavy_libraries():
    offenders = []
    count = 0
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        loaded = heavy_closure(name)
        for line, target in function_imports(path):
            count += 1
            if not heavy_closure(target) - loaded:
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}")
    assert not offenders, "in-function imports that defer nothing heavy:\n" + "\n".join(offenders)
    assert count > 0  # the walk found the deferred imports the CLI relies on


@pytest.mark.skipif(shutil.which("lint-imports") is None, reason="import-linter is not installed")
def test_import_layers_hold():
    r = subprocess.run(
        [shutil.which("lint-imports")], cwd=PACKAGE.parent, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
