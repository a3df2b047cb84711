"""Library-wide file safety: nothing in the package or the benchmarks unpickles (a recursive
scan, itself shown to catch a planted ``torch.load``), and every file and folder the library
writes gets the permissions the user's umask gives, whatever the umask."""

from __future__ import annotations

import ast
import os
import stat
from pathlib import Path

import pytest
import torch

import abmll
from abmll.checkpoint import CONFIG, TENSORS, atomic_folder, save_adapter, write_json
from abmll.train_state import STATE, save_state

REPO = Path(abmll.__file__).resolve().parents[2]
PICKLERS = ("pickle", "dill", "cloudpickle", "joblib", "_pickle")


def unpickling(path: Path) -> list[str]:
    """Each place in ``path`` that imports a pickler or calls ``torch.load`` without
    ``weights_only=True`` (also through ``import torch as th`` or ``from torch import load``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    torch_names, load_names, found = {"torch"}, set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            torch_names |= {a.asname for a in node.names if a.name == "torch" and a.asname}
        if isinstance(node, ast.ImportFrom) and node.module == "torch":
            load_names |= {a.asname or a.name for a in node.names if a.name == "load"}
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
            found += [f"{path}:{node.lineno}: imports {n}" for n in names if n.split(".")[0] in PICKLERS]
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        is_torch_load = (
            isinstance(f, ast.Attribute) and f.attr == "load" and isinstance(f.value, ast.Name) and f.value.id in torch_names
        ) or (isinstance(f, ast.Name) and f.id in load_names)
        safe = any(k.arg == "weights_only" and getattr(k.value, "value", None) is True for k in node.keywords)
        if is_torch_load and not safe:
            found.append(f"{path}:{node.lineno}: torch.load without weights_only=True")
    return found


def scanned_files() -> list[Path]:
    """Every Python file of the package (sub-packages included, e.g. abmll/commands) and of
    benchmarks/."""
    return sorted(Path(abmll.__file__).parent.rglob("*.py")) + sorted((REPO / "benchmarks").rglob("*.py"))


def test_library_and_benchmarks_never_unpickle():
    files = scanned_files()
    package = Path(abmll.__file__).parent
    assert package / "commands" / "predict.py" in files and REPO / "benchmarks" / "quality.py" in files
    assert [x for path in files for x in unpickling(path)] == []


@pytest.mark.parametrize(
    "source,flagged",
    [
        ("import torch\nstate = torch.load(path)\n", True),
        ("import torch\nstate = torch.load(path, weights_only=False)\n", True),
        ("import torch as th\nstate = th.load(path)\n", True),
        ("from torch import load\nstate = load(path)\n", True),
        ("import pickle\n", True),
        ("from joblib import load\n", True),
        ("import torch\nstate = torch.load(path, map_location='cpu', weights_only=True)\n", False),
        ("import json\nstate = json.load(f)\n", False),
    ],
)
def test_the_scan_finds_a_planted_unpickling_call(tmp_path, source, flagged):
    """The scan can fail: a ``torch.load(`` planted in a sub-package file is reported."""
    planted = tmp_path / "abmll" / "commands" / "planted.py"
    planted.parent.mkdir(parents=True)
    planted.write_text(source)
    assert bool(unpickling(planted)) == flagged


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o077], ids=["umask022", "umask027", "umask077"])
def test_written_files_get_the_umask_permissions(tmp_path, mask):
    """Outputs are as readable as the user's other files (mkstemp alone gives 0600); a
    hard-coded 0644 / 0755 fails under umask 027 and 077."""
    old = os.umask(mask)
    try:
        write_json(tmp_path / "r.json", {"a": 1})
        save_adapter(tmp_path / "p", {"a": torch.zeros(2)}, {})
        save_state(tmp_path / "s", 1, {"a": torch.zeros(2)}, {"history": []})
        with atomic_folder(tmp_path / "f") as tmp:
            (tmp / "x").write_text("x")
    finally:
        os.umask(old)
    files = [tmp_path / "r.json", tmp_path / "p" / TENSORS, tmp_path / "p" / CONFIG, tmp_path / "s" / STATE]
    files += [p for p in (tmp_path / "s").iterdir() if p.suffix == ".safetensors"]
    assert len(files) >= 5
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask, (path, oct(mask))
    for folder in (tmp_path / "p", tmp_path / "f"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~mask, (folder, oct(mask))
