"""Adapter and training-state folders: safetensors + JSON round trip; pickles, truncation,
tampering and half-written states refused; no pickle loading anywhere in the library."""

from __future__ import annotations

import ast
import json
import os
import stat
from pathlib import Path

import pytest
import torch

import abmll
from abmll import checkpoint
from abmll.checkpoint import (
    CONFIG,
    STATE,
    TENSORS,
    CheckpointError,
    atomic_folder,
    atomic_write,
    load_adapter,
    load_state,
    save_adapter,
    save_state,
    write_json,
)


def test_round_trip(tmp_path):
    tensors = {"a.weight": torch.randn(3, 4), "b": torch.arange(5.0)}
    save_adapter(tmp_path / "p", tensors, {"lora": {"rank": 3}})
    got, cfg = load_adapter(tmp_path / "p")
    assert cfg == {"lora": {"rank": 3}}
    assert got.keys() == tensors.keys()
    for k in tensors:
        assert torch.equal(got[k], tensors[k])
    assert not list((tmp_path / "p").glob(".*tmp"))  # no temporary files left


def _saved(tmp_path):
    save_adapter(tmp_path, {"w": torch.randn(8, 8)}, {"x": 1})
    return tmp_path / TENSORS


def test_pickle_file_refused(tmp_path):
    path = _saved(tmp_path)
    torch.save({"w": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_adapter(tmp_path)


def test_truncated_file_refused(tmp_path):
    path = _saved(tmp_path)
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(CheckpointError, match=str(path)):
        load_adapter(tmp_path)


def tamper_header(path: Path) -> None:
    """Point a tensor's data past the end of the file, keeping the header's length."""
    raw = bytearray(path.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["data_offsets"][1] += 1000
    new = json.dumps(header).encode().ljust(n)[:n]
    raw[8 : 8 + n] = new
    path.write_bytes(bytes(raw))


def test_tampered_header_refused(tmp_path):
    tamper_header(_saved(tmp_path))
    with pytest.raises(CheckpointError, match="safetensors"):
        load_adapter(tmp_path)


def test_missing_and_bad_config(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_adapter(tmp_path / "nothing")
    _saved(tmp_path)
    (tmp_path / CONFIG).write_text("{not json")
    with pytest.raises(CheckpointError, match=CONFIG):
        load_adapter(tmp_path)


def test_atomic_write_keeps_old_file_when_writer_fails(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old")

    def failing(tmp):
        open(tmp, "w").write("half")
        raise RuntimeError("crash while writing")

    with pytest.raises(RuntimeError):
        atomic_write(target, failing)
    assert target.read_text() == "old"
    assert list(tmp_path.iterdir()) == [target]


# ---------------------------------------------------------------- training states


def state_tensors(step: int) -> dict[str, torch.Tensor]:
    return {
        "theta/w": torch.full((8, 8), float(step)),
        "adam/w/step": torch.tensor(float(step)),
        "rng/torch": torch.get_rng_state(),
    }


def test_state_round_trip_keeps_only_the_latest(tmp_path):
    save_state(tmp_path, 2, state_tensors(2), {"history": [1, 2]})
    save_state(tmp_path, 4, state_tensors(4), {"history": [1, 2, 3, 4]})
    tensors, state = load_state(tmp_path)
    assert state == {"history": [1, 2, 3, 4], "format": "abmll-state", "step": 4, "tensors": "state-00000004.safetensors"}
    for k, v in state_tensors(4).items():
        assert torch.equal(tensors[k], v) and tensors[k].dtype == v.dtype
    assert {p.name for p in tmp_path.iterdir()} == {STATE, "state-00000004.safetensors"}


def test_crash_before_the_commit_keeps_the_previous_state(tmp_path, monkeypatch):
    save_state(tmp_path, 2, state_tensors(2), {})

    def crash(path, obj):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "write_json", crash)  # the new tensors are written, the JSON is not
    with pytest.raises(OSError, match="disk full"):
        save_state(tmp_path, 4, state_tensors(4), {})
    tensors, state = load_state(tmp_path)
    assert state["step"] == 2 and torch.equal(tensors["theta/w"], state_tensors(2)["theta/w"])
    monkeypatch.undo()
    save_state(tmp_path, 6, state_tensors(6), {})  # the orphan of the crash is cleaned up
    assert {p.name for p in tmp_path.iterdir()} == {STATE, "state-00000006.safetensors"}


@pytest.mark.parametrize("damage", ["pickle", "truncated", "tampered", "missing"])
def test_damaged_state_tensors_refused(tmp_path, damage):
    save_state(tmp_path, 2, state_tensors(2), {})
    path = tmp_path / "state-00000002.safetensors"
    if damage == "pickle":
        torch.save(state_tensors(2), path)
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:-40])
    elif damage == "tampered":
        tamper_header(path)
    else:
        path.unlink()
    with pytest.raises(CheckpointError, match=str(path)):
        load_state(tmp_path)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"step": 3}, "does not match step 3"),
        ({"tensors": "../adapter.safetensors"}, "not an abmll training state"),
        ({"format": "other"}, "not an abmll training state"),
    ],
)
def test_inconsistent_state_json_refused(tmp_path, change, message):
    save_state(tmp_path, 2, state_tensors(2), {})
    good = json.loads((tmp_path / STATE).read_text())
    (tmp_path / STATE).write_text(json.dumps({**good, **change}))
    with pytest.raises(CheckpointError, match=message):
        load_state(tmp_path)
    (tmp_path / STATE).write_text('{"step": 2, "tensors": ')
    with pytest.raises(CheckpointError, match=f"{tmp_path / STATE}: not valid JSON"):
        load_state(tmp_path)


def test_library_never_unpickles():
    """No pickle/torch.load in abmll, except torch.load(..., weights_only=True)."""
    offenders = []
    for path in Path(abmll.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                offenders += [f"{path.name}: imports {n}" for n in names if n.split(".")[0] in ("pickle", "dill")]
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "load"
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "torch"
            ):
                safe = any(k.arg == "weights_only" and getattr(k.value, "value", None) is True for k in node.keywords)
                offenders += [] if safe else [f"{path.name}:{node.lineno}: torch.load without weights_only=True"]
    assert offenders == []


def test_adapter_files_of_two_saves_are_refused(tmp_path):
    """An interrupted save over an existing adapter (new tensors, old config) is detected."""
    save_adapter(tmp_path / "old", {"a": torch.zeros(2)}, {"kind": "old"})
    save_adapter(tmp_path / "new", {"a": torch.ones(2)}, {"kind": "new"})
    (tmp_path / "old" / TENSORS).write_bytes((tmp_path / "new" / TENSORS).read_bytes())
    with pytest.raises(CheckpointError, match="not written by the same save"):
        load_adapter(tmp_path / "old")
    assert load_adapter(tmp_path / "new")[1] == {"kind": "new"}


def test_written_files_get_the_umask_permissions(tmp_path):
    """Outputs are as readable as the user's other files (mkstemp alone gives 0600)."""
    old = os.umask(0o022)
    try:
        write_json(tmp_path / "r.json", {"a": 1})
        save_adapter(tmp_path / "p", {"a": torch.zeros(2)}, {})
        with atomic_folder(tmp_path / "f") as tmp:
            (tmp / "x").write_text("x")
    finally:
        os.umask(old)
    for path in (tmp_path / "r.json", tmp_path / "p" / TENSORS, tmp_path / "p" / CONFIG):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    assert stat.S_IMODE((tmp_path / "f").stat().st_mode) == 0o755


def test_optimizer_and_rng_tensors_round_trip_and_refuse_foreign_groups():
    from abmll.checkpoint import load_optimizer_tensors, optimizer_tensors, rng_tensors, set_rng_tensors

    params = {"a": torch.randn(3, requires_grad=True), "b": torch.randn(2, 2, requires_grad=True)}
    opt = torch.optim.Adam(params.values(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        sum((v**2).sum() for v in params.values()).backward()
        opt.step()
    tensors, groups = optimizer_tensors(opt, list(params))
    assert set(tensors) == {f"adam/{k}/{f}" for k in params for f in ("step", "exp_avg", "exp_avg_sq")}
    fresh = torch.optim.Adam([torch.zeros(3, requires_grad=True), torch.zeros(2, 2, requires_grad=True)], lr=0.5)
    load_optimizer_tensors(fresh, list(params), tensors, json.loads(json.dumps(groups)))  # through JSON, as saved
    assert fresh.param_groups[0]["lr"] == 0.1
    for i, k in enumerate(params):
        for field, value in opt.state_dict()["state"][i].items():
            assert torch.equal(fresh.state_dict()["state"][i][field], value), (k, field)
    with pytest.raises(ValueError, match="do not match the optimiser's"):
        load_optimizer_tensors(torch.optim.SGD(params.values(), lr=0.1), list(params), tensors, groups)
    older = [{k: v for k, v in g.items() if k not in ("decoupled_weight_decay", "foreach")} for g in groups]
    load_optimizer_tensors(fresh, list(params), tensors, older)  # saved by a torch without those options
    assert fresh.param_groups[0]["foreach"] is None
    without_betas = [{k: v for k, v in g.items() if k != "betas"} for g in groups]
    with pytest.raises(ValueError, match="do not match the optimiser's"):
        load_optimizer_tensors(fresh, list(params), tensors, without_betas)

    saved = rng_tensors(torch.device("cpu"))
    first = torch.rand(4)
    set_rng_tensors(saved, torch.device("cpu"))
    assert torch.equal(torch.rand(4), first)
    with pytest.raises(ValueError, match="not a torch RNG state"):
        set_rng_tensors({"rng/torch": torch.zeros(3)}, torch.device("cpu"))
