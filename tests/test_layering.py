"""The one-way data flow of style.md §5, checked on the import statements of every module in hess/.

    data → models → scoring/calibrate → budget → patch → evaluate → results → plots

Leaves import nothing else from hess (hess.registry and the package version excepted); a module imports
leaves and modules to its left, never to its right; plots see results only.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

HESS = Path(__file__).resolve().parents[1] / "hess"

LEAVES = {"registry", "config", "runtime", "attention", "metrics", "results", "stats"}
# unit -> hess units it may import besides leaves and itself (None = any: entry points and glue)
ALLOWED: dict[str, set[str] | None] = {
    **{leaf: set() for leaf in LEAVES},
    "data": set(),
    "models": set(),
    "scorers": {"models", "data"},
    "scoring": {"models", "data", "scorers", "calibrate", "taylor"},
    "taylor": {"models", "data", "scorers", "scoring", "calibrate", "budget"},
    "calibrate": {"models", "data", "scorers", "scoring"},
    "budget": set(),
    "patch": {"models"},
    "evaluate": {"models", "data", "patch", "budget", "scoring", "calibrate", "scorers"},
    "plots": set(),
}
LEAF_EXCEPTIONS = {"registry", "__init__"}  # hess.registry, and `from hess import __version__`


def _unit(path: Path) -> str:
    rel = path.relative_to(HESS)
    return rel.parts[0].removesuffix(".py")


def _hess_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names] if node.module == "hess" else [node.module]
        for name in names:
            parts = name.split(".")
            if parts[0] == "hess":
                found.add(parts[1] if len(parts) > 1 else "__init__")
    return found


MODULES = sorted(p for p in HESS.rglob("*.py") if p.name != "__init__.py" or p.parent != HESS)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(HESS)))
def test_imports_flow_one_way(path: Path) -> None:
    unit = _unit(path)
    allowed = ALLOWED.get(unit)
    if allowed is None:
        return  # callers (cli, sweep, tracking, train, reproduce, ...) may import anything
    permitted = LEAVES | allowed | {unit} | LEAF_EXCEPTIONS
    if unit in LEAVES or unit == "plots":
        permitted = {unit} | LEAF_EXCEPTIONS | ({"results"} if unit == "plots" else set())
    imported = {name for name in _hess_imports(path) if name not in {"__version__"}}
    bad = sorted(imported - permitted)
    assert not bad, f"hess/{path.relative_to(HESS)} ({unit}) imports {bad}: against the one-way data flow"


def test_models_never_import_patch() -> None:
    for path in (HESS / "models").rglob("*.py"):
        assert "patch" not in _hess_imports(path), path


def test_budget_is_model_free() -> None:
    imported = _hess_imports(HESS / "budget.py")
    assert imported <= {"registry", "budget"}, imported
