"""Adapter and training-state folders: safetensors + JSON round trip; pickles, truncation,
tampering, changed bytes (sha256) and half-written states refused, a damaged newest training
state replaced by the previous one; no pickle loading anywhere in the library."""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import stat
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import abmll
from abmll import checkpoint, train_state
from abmll.checkpoint import (
    CONFIG,
    SHA256,
    TENSORS,
    CheckpointError,
    atomic_folder,
    atomic_write,
    load_adapter,
    save_adapter,
    write_json,
)
from abmll.priors import SHIPPED_DIR, shipped_priors
from abmll.train_state import PREVIOUS_STATE, STATE, load_latest_state, load_state, save_state


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


def test_state_round_trip_keeps_the_latest_and_the_previous(tmp_path):
    save_state(tmp_path, 2, state_tensors(2), {"history": [1, 2]})
    save_state(tmp_path, 4, state_tensors(4), {"history": [1, 2, 3, 4]})
    save_state(tmp_path, 6, state_tensors(6), {"history": [1, 2, 3, 4, 5, 6]})
    tensors, state = load_state(tmp_path)
    name = "state-00000006.safetensors"
    digest = hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()
    assert state == {
        "history": [1, 2, 3, 4, 5, 6],
        "format": "abmll-state",
        "step": 6,
        "tensors": name,
        SHA256: {name: digest},
    }
    for k, v in state_tensors(6).items():
        assert torch.equal(tensors[k], v) and tensors[k].dtype == v.dtype
    previous, state = load_state(tmp_path, name=PREVIOUS_STATE)
    assert state["step"] == 4 and state["history"] == [1, 2, 3, 4]
    assert torch.equal(previous["theta/w"], state_tensors(4)["theta/w"])
    assert {p.name for p in tmp_path.iterdir()} == {STATE, PREVIOUS_STATE, name, "state-00000004.safetensors"}


def test_crash_before_the_commit_keeps_the_previous_state(tmp_path, monkeypatch):
    save_state(tmp_path, 2, state_tensors(2), {})

    def crash(path, obj):
        raise OSError("disk full")

    monkeypatch.setattr(train_state, "write_json", crash)  # the new tensors are written, the JSON is not
    with pytest.raises(OSError, match="disk full"):
        save_state(tmp_path, 4, state_tensors(4), {})
    tensors, state = load_state(tmp_path)
    assert state["step"] == 2 and torch.equal(tensors["theta/w"], state_tensors(2)["theta/w"])
    monkeypatch.undo()
    save_state(tmp_path, 6, state_tensors(6), {})  # the orphan of the crash is cleaned up
    assert {p.name for p in tmp_path.iterdir()} == {
        STATE,
        PREVIOUS_STATE,
        "state-00000006.safetensors",
        "state-00000002.safetensors",
    }


def flip_a_bit(path: Path) -> None:
    """Flip one bit in the middle of a safetensors file's tensor data: same size, same header,
    and safetensors itself still reads it (only a checksum tells)."""
    raw = bytearray(path.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    raw[8 + n + (len(raw) - 8 - n) // 2] ^= 0x10
    path.write_bytes(bytes(raw))
    assert load_file(path).keys()  # still a readable safetensors file


def damage_file(path: Path, damage: str) -> None:
    """Damage ``path`` as ``damage`` says: flipped (one bit, see :func:`flip_a_bit`), truncated
    (40 bytes short), empty, missing, pickle (a torch.save file in its place)."""
    if damage == "flipped":
        flip_a_bit(path)
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:-40])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "missing":
        path.unlink()
    else:
        assert damage == "pickle"
        torch.save({"theta/w": torch.zeros(2)}, path)


@pytest.mark.parametrize("damage", ["pickle", "truncated", "tampered", "missing", "empty", "flipped"])
def test_damaged_state_tensors_refused(tmp_path, damage):
    save_state(tmp_path, 2, state_tensors(2), {})
    path = tmp_path / "state-00000002.safetensors"
    if damage == "tampered":
        tamper_header(path)
    else:
        damage_file(path, damage)
    message = {"missing": "not found", "empty": "empty", "flipped": "damaged: its sha256"}.get(damage, "safetensors")
    with pytest.raises(CheckpointError, match=f"{re.escape(str(path))}: .*{message}") as err:
        load_state(tmp_path)
    assert str(err.value).endswith("no earlier state is kept: start the run again (without --resume)")


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


@pytest.mark.parametrize("damage", ["flipped", "truncated", "empty", "missing", "json"])
def test_a_damaged_newest_state_falls_back_to_the_previous_one_with_a_warning(tmp_path, damage):
    save_state(tmp_path, 2, state_tensors(2), {"history": [1, 2]})
    save_state(tmp_path, 4, state_tensors(4), {"history": [1, 2, 3, 4]})
    damaged = tmp_path / (STATE if damage == "json" else "state-00000004.safetensors")
    if damage == "json":
        damaged.write_text(damaged.read_text()[:-20])
    else:
        damage_file(damaged, damage)
    with pytest.raises(CheckpointError, match=re.escape(str(damaged))) as err:
        load_state(tmp_path)  # the newest state alone: refused, pointing at the previous one
    assert str(err.value).endswith(
        f"resume from the previous state, {PREVIOUS_STATE} (`abmll meta-train --resume` falls back to it)"
    )

    with pytest.warns(RuntimeWarning) as caught:
        tensors, state, json_path = load_latest_state(tmp_path)
    assert state["step"] == 2 and state["history"] == [1, 2] and json_path == tmp_path / PREVIOUS_STATE
    assert all(torch.equal(tensors[k], v) for k, v in state_tensors(2).items())
    (warning,) = caught
    text = str(warning.message)
    assert text.startswith(f"{damaged}: ") and text.endswith(f"resuming from the previous state {json_path} (step 2) instead")


def test_an_intact_newest_state_is_loaded_without_a_warning(tmp_path):
    save_state(tmp_path, 2, state_tensors(2), {})
    flip_a_bit(tmp_path / "state-00000002.safetensors")  # the previous one, damaged, is not read
    save_state(tmp_path, 4, state_tensors(4), {})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_latest_state(tmp_path)[1]["step"] == 4


def test_both_states_damaged_are_refused_naming_both_files(tmp_path):
    save_state(tmp_path, 2, state_tensors(2), {})
    with pytest.raises(CheckpointError, match="no earlier state is kept in .*: start the run again"):
        flip_a_bit(tmp_path / "state-00000002.safetensors")
        load_latest_state(tmp_path)  # no previous state yet
    save_state(tmp_path, 2, state_tensors(2), {})
    save_state(tmp_path, 4, state_tensors(4), {})
    newest, previous = tmp_path / "state-00000004.safetensors", tmp_path / "state-00000002.safetensors"
    flip_a_bit(newest)
    previous.write_bytes(previous.read_bytes()[:-40])
    with pytest.raises(CheckpointError) as err:
        load_latest_state(tmp_path)
    message = str(err.value)
    assert message.startswith(f"no intact training state in {tmp_path}: the newest is damaged ({newest}: damaged: its sha256")
    assert f"and so is the previous one ({previous}: not a readable safetensors file" in message
    assert message.endswith("start the run again (without --resume)")


def test_a_damaged_state_is_never_kept_as_the_previous_one(tmp_path):
    """A save after a damaged newest state keeps the intact previous one, also when the run
    resumed from it (the damaged state is of a later step than the new one)."""
    save_state(tmp_path, 2, state_tensors(2), {})
    save_state(tmp_path, 4, state_tensors(4), {})
    flip_a_bit(tmp_path / "state-00000004.safetensors")
    save_state(tmp_path, 6, state_tensors(6), {})
    assert load_state(tmp_path, name=PREVIOUS_STATE)[1]["step"] == 2
    assert {p.name for p in tmp_path.iterdir()} == {
        STATE,
        PREVIOUS_STATE,
        "state-00000006.safetensors",
        "state-00000002.safetensors",
    }

    flip_a_bit(tmp_path / "state-00000006.safetensors")
    with pytest.warns(RuntimeWarning, match="step 2"):
        assert load_latest_state(tmp_path)[1]["step"] == 2
    save_state(tmp_path, 3, state_tensors(3), {})  # the run resumed at step 2 saves step 3
    assert load_state(tmp_path)[1]["step"] == 3 and load_state(tmp_path, name=PREVIOUS_STATE)[1]["step"] == 2
    assert {p.name for p in tmp_path.iterdir()} == {
        STATE,
        PREVIOUS_STATE,
        "state-00000003.safetensors",
        "state-00000002.safetensors",
    }


@pytest.mark.parametrize("crash_at", [1, 2, 3])
def test_a_save_interrupted_at_any_write_leaves_an_intact_newest_and_previous_state(tmp_path, monkeypatch, crash_at):
    """The three files a save writes (the tensors, the commit, the previous state's JSON): a
    crash before each leaves the last committed state and a previous one, both loadable."""
    save_state(tmp_path, 2, state_tensors(2), {})
    save_state(tmp_path, 4, state_tensors(4), {})
    real, calls = checkpoint.atomic_write, []

    def crashing(path, write):
        calls.append(Path(path).name)
        if len(calls) == crash_at:
            raise OSError("power cut")
        real(path, write)

    monkeypatch.setattr(checkpoint, "atomic_write", crashing)
    with pytest.raises(OSError, match="power cut"):
        save_state(tmp_path, 6, state_tensors(6), {})
    monkeypatch.undo()
    assert calls == ["state-00000006.safetensors", STATE, PREVIOUS_STATE][:crash_at]
    newest, previous = (4, 2) if crash_at < 3 else (6, 2)
    assert load_state(tmp_path)[1]["step"] == newest
    tensors, state = load_state(tmp_path, name=PREVIOUS_STATE)
    assert state["step"] == previous and torch.equal(tensors["theta/w"], state_tensors(previous)["theta/w"])
    save_state(tmp_path, 8, state_tensors(8), {})
    assert load_state(tmp_path, name=PREVIOUS_STATE)[1]["step"] == newest
    assert {p.name for p in tmp_path.iterdir()} == {
        STATE,
        PREVIOUS_STATE,
        "state-00000008.safetensors",
        f"state-{newest:08d}.safetensors",
    }


@pytest.mark.parametrize("damage", ["flipped", "truncated", "empty", "pickle"])
def test_a_damaged_adapter_file_is_refused_naming_it(tmp_path, damage):
    path = _saved(tmp_path)
    config = json.loads((tmp_path / CONFIG).read_text())
    assert config[SHA256] == {TENSORS: hashlib.sha256(path.read_bytes()).hexdigest()}
    damage_file(path, damage)
    message = {"flipped": "damaged: its sha256", "empty": "empty"}.get(damage, "not a readable safetensors")
    with pytest.raises(CheckpointError, match=f"{re.escape(str(path))}: {message}") as err:
        load_adapter(tmp_path)
    assert str(err.value).endswith("save the adapter again, or copy it again from where it came from")
    path.unlink()
    with pytest.raises(CheckpointError, match=f"{re.escape(str(path))}: not found"):
        load_adapter(tmp_path)


def test_files_without_a_checksum_of_older_abmll_still_load(tmp_path):
    tensors = {"w": torch.randn(8, 8)}
    save_adapter(tmp_path / "p", tensors, {"x": 1})
    config = json.loads((tmp_path / "p" / CONFIG).read_text())
    write_json(tmp_path / "p" / CONFIG, {k: v for k, v in config.items() if k != SHA256})
    got, cfg = load_adapter(tmp_path / "p")
    assert cfg == {"x": 1} and torch.equal(got["w"], tensors["w"])

    save_state(tmp_path / "s", 2, state_tensors(2), {})
    save_state(tmp_path / "s", 4, state_tensors(4), {})
    for name in (STATE, PREVIOUS_STATE):
        state = json.loads((tmp_path / "s" / name).read_text())
        write_json(tmp_path / "s" / name, {k: v for k, v in state.items() if k != SHA256})
    assert load_latest_state(tmp_path / "s")[1]["step"] == 4
    save_state(tmp_path / "s", 6, state_tensors(6), {})  # the older state is kept as the previous one
    assert load_state(tmp_path / "s", name=PREVIOUS_STATE)[1]["step"] == 4

    assert shipped_priors()
    for name in shipped_priors():  # shipped before checksums: loaded as they are
        assert SHA256 not in json.loads((SHIPPED_DIR / name / CONFIG).read_text())
        got, cfg = load_adapter(SHIPPED_DIR / name)
        assert got and all(v.numel() > 0 for v in got.values()) and "lora" in cfg


def test_a_malformed_checksum_entry_is_refused(tmp_path):
    _saved(tmp_path)
    config = json.loads((tmp_path / CONFIG).read_text())
    write_json(tmp_path / CONFIG, {**config, SHA256: {TENSORS: "0" * 10}})
    with pytest.raises(CheckpointError, match=f"{re.escape(str(tmp_path / CONFIG))}: its sha256 entry records no valid checksum"):
        load_adapter(tmp_path)


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
    from abmll.train_state import load_optimizer_tensors, optimizer_tensors, rng_tensors, set_rng_tensors

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
