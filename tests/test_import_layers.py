"""The import layers: the console entry and the parser do not import each other in a circle,
and nothing below the CLI (library modules, benchmarks) imports it."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports (absolute names; ``from x import y`` gives x)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_nothing_below_the_cli_imports_it_or_the_console_entry():
    allowed = {"__main__.py": {"abmll.cli"}, "helptext.py": {"abmll.cli"}}  # the entry; the help-text writer
    files = [*(ROOT / "src" / "abmll").rglob("*.py"), *(ROOT / "benchmarks").glob("*.py")]
    offenders = {}
    for path in files:
        upward = imported_modules(path) & {"abmll.cli", "abmll.__main__"}
        upward -= allowed.get(path.name, set()) if path.parent.name == "abmll" else set()
        if upward:
            offenders[str(path.relative_to(ROOT))] = sorted(upward)
    assert offenders == {}  # e.g. the parser importing the entry's command list (a circle)
    assert imported_modules(ROOT / "src" / "abmll" / "command_names.py") <= {"__future__", "itertools"}  # no torch


CROSS_CUTTING = {"import_layers", "walkthrough"}
"""Test files that exercise no one module: the package's import layers, the README's walk-through."""


def test_each_test_file_is_named_after_the_module_it_exercises():
    """tests/test_<module>[_<aspect>].py, a module of src/abmll (or ``commands``) or benchmarks/."""
    modules = {p.stem for p in [*(ROOT / "src" / "abmll").glob("*.py"), *(ROOT / "benchmarks").glob("*.py")]} | {"commands"}
    unplaced = [
        p.name
        for p in (ROOT / "tests").glob("test_*.py")
        if (name := p.stem.removeprefix("test_")) not in CROSS_CUTTING
        and not any(name == m or name.startswith(f"{m}_") for m in modules)
    ]
    assert unplaced == []
