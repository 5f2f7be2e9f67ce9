"""The demo is a straight line: no import circle among its modules, and the modules that render the reports import
nothing that trains, measures or loads a model (so a report can only render what the stages wrote)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

DEMO = Path(__file__).resolve().parents[2] / "src" / "epic" / "demo"
RENDERING = ("config", "results", "figures", "report", "kd_report")
MEASURING = ("torch", "transformers", "epic.train", "epic.models.loading", "epic.eval.bench", "epic.eval.show")
STAGES = ("pipeline", "jobs", "training", "measure", "exposure", "kd")


def imports(module: str) -> set[str]:
    """Every module `epic/demo/<module>.py` imports, wherever in the file."""
    found = set()
    for node in ast.walk(ast.parse((DEMO / f"{module}.py").read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def demo_imports(module: str) -> set[str]:
    return {name.removeprefix("epic.demo.") for name in imports(module) if name.startswith("epic.demo.")}


def test_no_import_circle_among_the_demo_modules():
    modules = [path.stem for path in DEMO.glob("*.py") if path.stem != "__init__"]
    assert set(RENDERING + STAGES) == set(modules)  # a new module is placed on one side or the other
    for start in modules:
        seen, pending = set(), list(demo_imports(start))
        while pending:
            module = pending.pop()
            assert module != start, f"epic.demo.{start} imports itself back through epic.demo.{module}"
            if module not in seen:
                seen.add(module)
                pending += demo_imports(module)


@pytest.mark.parametrize("module", RENDERING)
def test_a_rendering_module_imports_nothing_that_trains_measures_or_runs_the_stages(module):
    banned = [
        name
        for name in imports(module)
        if any(name == other or name.startswith(f"{other}.") for other in MEASURING)
        or name.removeprefix("epic.demo.") in STAGES
    ]
    assert not banned, f"epic.demo.{module} imports {banned}"


def test_the_pipeline_runs_the_stages_and_then_the_report():
    assert demo_imports("pipeline") == {"config", "training", "measure", "report"}
