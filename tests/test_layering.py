"""Imports flow one way (docs/architecture.md): no import circle among epic's modules, and no package reaches up
into the ones built on it (compression knows nothing of training, eval nothing of training, ...)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[1] / "src"

# package -> the epic packages it must never import (at module level or inside a function)
FORBIDDEN = {
    "epic.labels": {"epic"},
    "epic.compat": {"epic"},
    "epic.compression": {"epic.data", "epic.distill", "epic.train", "epic.eval", "epic.demo", "epic.cli"},
    "epic.data": {"epic.compression", "epic.distill", "epic.train", "epic.eval", "epic.demo", "epic.cli"},
    "epic.distill": {"epic.train", "epic.eval", "epic.demo", "epic.cli"},
    "epic.models": {"epic.train", "epic.eval", "epic.demo", "epic.cli"},
    "epic.eval": {"epic.train", "epic.demo", "epic.cli"},
    "epic.train": {"epic.eval", "epic.demo", "epic.cli"},
}
ALLOWED_INSIDE = {"epic.labels": {"epic.labels"}, "epic.compat": {"epic.compat"}}


def module_name(path: Path) -> str:
    parts = path.relative_to(SOURCE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(SOURCE.joinpath("epic").rglob("*.py"))}


def imported(node: ast.AST) -> list[str]:
    """The epic modules an import statement names (a `from package import submodule` names the submodule too)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name.split(".")[0] == "epic"]
    if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "epic":
        submodules = [f"{node.module}.{alias.name}" for alias in node.names if f"{node.module}.{alias.name}" in MODULES]
        named_from_package = len(submodules) < len(node.names)  # a name defined in the package's own module
        return [node.module, *submodules] if named_from_package else submodules
    return []


def is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def top_level_imports(tree: ast.Module) -> set[str]:
    """Imports that run when the module is imported: module level, in try/if blocks, not under TYPE_CHECKING."""
    found: set[str] = set()
    pending = list(tree.body)
    while pending:
        node = pending.pop()
        if is_type_checking(node):
            continue
        found.update(imported(node))
        if isinstance(node, (ast.If, ast.Try)):
            pending += [*node.body, *node.orelse, *getattr(node, "finalbody", []), *getattr(node, "handlers", [])]
        elif isinstance(node, ast.ExceptHandler):
            pending += node.body
    return found


def all_imports(tree: ast.Module) -> set[str]:
    """Every import, wherever it runs, except those only for type checkers."""
    skipped = {id(node) for block in ast.walk(tree) if is_type_checking(block) for node in ast.walk(block)}
    return {name for node in ast.walk(tree) if id(node) not in skipped for name in imported(node)}


TREES = {name: ast.parse(path.read_text()) for name, path in MODULES.items()}


@pytest.mark.parametrize("where", ["module level", "anywhere"])
def test_no_import_circle(where):
    """Neither the imports that run at import time nor those inside functions (a circle postponed) go round."""
    found = top_level_imports if where == "module level" else all_imports
    graph = {name: {other for other in found(tree) if other in MODULES} for name, tree in TREES.items()}

    def reaches(start: str) -> list[str] | None:
        """A path of module-level imports from `start` back to itself, or None."""
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for other in graph[node]:
                if other == start:
                    return [*path, start]
                if other not in seen:
                    seen.add(other)
                    stack.append((other, [*path, other]))
        return None

    circles = [circle for name in graph if (circle := reaches(name))]
    assert not circles, "import circles: " + "; ".join(" -> ".join(circle) for circle in circles)


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_a_package_never_imports_the_ones_built_on_it(package):
    allowed = ALLOWED_INSIDE.get(package, set())
    offences = []
    for name, tree in TREES.items():
        if name != package and not name.startswith(package + "."):
            continue
        for target in all_imports(tree):
            if any(target == allowed_name or target.startswith(allowed_name + ".") for allowed_name in allowed):
                continue
            if any(target == banned or target.startswith(banned + ".") for banned in FORBIDDEN[package]):
                offences.append(f"{name} imports {target}")
    assert not offences, offences
