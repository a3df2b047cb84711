"""Adapter folders: safetensors + JSON round trip; pickles, truncation, tampering refused."""

from __future__ import annotations

import json

import pytest
import torch

from abmll.checkpoint import CONFIG, TENSORS, CheckpointError, atomic_write, load_adapter, save_adapter


def test_round_trip(tmp_path):
    tensors = {"a.weight": torch.randn(3, 4), "b": torch.arange(5.0)}
    save_adapter(tmp_path / "p", tensors, {"lora": {"rank": 3}})
    got, cfg = load_adapter(tmp_path / "p")
    assert cfg == {"lora": {"rank": 3}}
    assert got.keys() == tensors.keys()
    for k in tensors:
        assert torch.equal(got[k], tensors[k])
    assert not list((tmp_path / "p").glob(".*tmp"))     # no temporary files left


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


def test_tampered_header_refused(tmp_path):
    path = _saved(tmp_path)
    raw = bytearray(path.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header["w"]["data_offsets"][1] += 1000
    new = json.dumps(header).encode().ljust(n)[:n]
    raw[8:8 + n] = new
    path.write_bytes(bytes(raw))
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
