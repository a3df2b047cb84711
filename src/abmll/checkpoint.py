"""Adapters on disk: safetensors tensors + a JSON config, written atomically.

A saved adapter (a prior theta or a task posterior lambda) is a folder with
``adapter.safetensors`` (the flat dict of adapter tensors, see :mod:`abmll.bayes_lora`) and
``abmll_config.json`` (everything needed to rebuild the model it belongs to). Nothing is
ever loaded with pickle: safetensors holds raw tensors only.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

TENSORS = "adapter.safetensors"
CONFIG = "abmll_config.json"


class CheckpointError(ValueError):
    """An adapter folder is missing, truncated, tampered with or not safetensors; names the file."""


def atomic_write(path: str | os.PathLike, write) -> None:
    """Write a file atomically: ``write(tmp_path)`` fills a temporary file in the same folder,
    which is fsync'ed and renamed over ``path``; a crash never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2) + "\n"))


def save_adapter(folder: str | os.PathLike, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> Path:
    """Save adapter ``tensors`` (flat dict, any shapes) and its JSON-serialisable ``config``
    into ``folder`` (created if needed), each file atomically. Returns the folder."""
    folder = Path(folder)
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write(folder / TENSORS, lambda tmp: save_file(cpu, tmp, metadata={"format": "abmll"}))
    write_json(folder / CONFIG, config)
    return folder


def load_adapter(folder: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """Load ``(tensors, config)`` saved by :func:`save_adapter`.

    Raises:
        CheckpointError: the folder or a file is missing, the tensor file is not valid
            safetensors (a pickle, truncated, a tampered header), or the config is not JSON.
    """
    folder = Path(folder)
    tensor_path, config_path = folder / TENSORS, folder / CONFIG
    for p in (tensor_path, config_path):
        if not p.is_file():
            raise CheckpointError(f"{p}: not found (an abmll adapter folder holds {TENSORS} and {CONFIG})")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{config_path}: not valid JSON ({err})") from err
    try:
        tensors = load_file(tensor_path, device=str(device))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{tensor_path}: not a readable safetensors file ({err})") from err
    return tensors, config
