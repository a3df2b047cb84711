"""Output folders that never lose finished work: checked before any model is loaded, never
silently overwritten, and written as results finish so an interrupted command resumes.

- :func:`check_writable`: the folder can be created and written (checked up front).
- :func:`guard_run_folder`: a meta-training folder that already holds a run is refused unless
  the run is resumed (``--resume``) or replaced (``--overwrite``, which removes its outputs).
- :func:`guard_adapter_folder`: an adapter output (``adapt``, ``export``) is refused when it
  is the input adapter's own folder, holds other files, or holds an adapter (without
  ``--overwrite``).
- :class:`ResultLog`: an append-only JSON-lines log of finished results, keyed by a hash of
  the settings they depend on; a rerun with the same settings reads them back and computes
  only the rest (a different setting is refused, naming ``--overwrite``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

RUN_OUTPUTS = (
    "adapter.safetensors",
    "abmll_config.json",
    "checkpoint",
    "best",
    "history.json",
    "validation.json",
    "results.json",
    "results.partial.jsonl",
    "training_curves.png",
    "validation_curve.png",
    "adapter_model.safetensors",
    "abmll_scale.safetensors",
    "adapter_config.json",
)
"""What ``abmll meta-train`` / ``demo`` write into ``--out`` (plus ``reliability_*.png``), and
an exported adapter's files (a run over an ``adapt`` output replaces them too)."""

EXPORT_FILES = ("adapter_model.safetensors", "abmll_scale.safetensors", "adapter_config.json", "abmll_config.json")
"""The files of an exported adapter folder (``abmll.export``)."""


def check_writable(folder: str | os.PathLike) -> Path:
    """Create ``folder`` if needed and check a file can be written in it.

    Raises:
        ValueError: naming the folder and the reason (read-only, not a folder, ...).
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".abmll-write-check.")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise ValueError(f"--out {folder}: cannot write there ({err.strerror or err})") from None
    return folder


def run_outputs(folder: str | os.PathLike) -> list[Path]:
    """The meta-training outputs present in ``folder`` (see :data:`RUN_OUTPUTS`)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [folder / name for name in RUN_OUTPUTS if (folder / name).exists()]
    return found + sorted(folder.glob("reliability_*.png"))


def guard_run_folder(folder: str | os.PathLike, resume: bool, overwrite: bool) -> None:
    """Refuse to start a new meta-training run over a finished or interrupted one.

    With ``overwrite`` the previous run's outputs (:func:`run_outputs`; nothing else) are
    removed first, so no stale results or plots stay beside the new prior.

    Raises:
        ValueError: ``folder`` holds a run and neither ``resume`` nor ``overwrite`` is set,
            or both are set.
    """
    if resume and overwrite:
        raise ValueError("--resume and --overwrite contradict each other: continue the run or replace it")
    found = run_outputs(folder)
    if not found or resume:
        return
    if not overwrite:
        raise ValueError(
            f"--out {folder} already holds a run ({', '.join(p.name for p in found)}); pass --resume "
            "to continue it, --overwrite to replace it, or choose another --out"
        )
    for path in found:
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def guard_adapter_folder(out: str | os.PathLike, source: str | os.PathLike | None, overwrite: bool) -> None:
    """Check that an adapter can be written to ``out`` (before any work is done).

    Raises:
        ValueError: ``out`` is ``source``'s folder (the input would be destroyed), holds an
            exported adapter and ``overwrite`` is not set, or holds anything else (other files
            would be lost with the folder, even with ``overwrite``).
    """
    out = Path(out)
    if source is not None and out.resolve() == Path(source).resolve():
        raise ValueError(f"--out {out} is the input adapter's own folder; write the result elsewhere")
    if not out.is_dir() or not any(out.iterdir()):
        check_writable(out)
        return
    others = sorted(p.name for p in out.iterdir() if p.name not in EXPORT_FILES)
    if others:
        raise ValueError(
            f"--out {out} holds files that are not an exported adapter ({', '.join(others[:3])}); "
            "the folder is written whole, so choose a new or empty folder"
        )
    if not overwrite:
        raise ValueError(f"--out {out} already holds an adapter; pass --overwrite to replace it")
    check_writable(out)


def settings_hash(settings: Any, algorithm: str = "sha256", digits: int = 16) -> str:
    """The first ``digits`` hex digits of the ``algorithm`` (a :mod:`hashlib` name) hash of
    ``settings`` as sorted JSON (values JSON cannot hold by ``str``): the one hash of settings
    (an evaluation's resume key; the benchmarks' result and prior keys use sha1, 10 digits)."""
    text = json.dumps(settings, sort_keys=True, default=str).encode()
    return hashlib.new(algorithm, text).hexdigest()[:digits]


def file_digest(paths: Iterable[str | os.PathLike]) -> str:
    """sha256 of the contents of ``paths`` (in order), for keying results on their inputs."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


class ResultLog:
    """Finished results of one command, appended to ``path`` (JSON lines) as each is ready.

    The first line is ``{"settings": <hash>}``; every other line is one result. A log of the
    same settings is read back and continued (with or without ``overwrite``: rerunning the
    command that was interrupted resumes it); one of other settings raises, unless
    ``overwrite`` (then it is started afresh). A line cut short by an interrupt is dropped.

    Attributes:
        entries: the results read back and appended so far, in order.
    """

    def __init__(self, path: str | os.PathLike, settings: str, overwrite: bool = False) -> None:
        self.path = Path(path)
        self.entries: list[dict] = []
        lines = self.path.read_text(encoding="utf-8").split("\n") if self.path.is_file() else []
        try:
            same = bool(lines) and json.loads(lines[0]).get("settings") == settings
        except (ValueError, AttributeError):
            same = False
        if lines and not same and not overwrite:
            raise ValueError(
                f"{self.path} holds partial results of other settings; rerun with those settings "
                "to resume, or pass --overwrite to start again"
            )
        if same:
            for line in lines[1:]:
                try:
                    self.entries.append(json.loads(line))
                except ValueError:
                    break  # the line being written when interrupted
        with open(self.path, "w", encoding="utf-8") as f:  # rewritten without a cut-short last line
            f.write(json.dumps({"settings": settings}) + "\n")
            f.writelines(json.dumps(e) + "\n" for e in self.entries)

    def append(self, entry: dict) -> None:
        """Add one finished result (flushed and fsync'ed before returning)."""
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.entries.append(entry)

    def remove(self) -> None:
        """Delete the log (its results are complete and written elsewhere)."""
        self.path.unlink(missing_ok=True)


def complete_lines(path: str | os.PathLike) -> list[str]:
    """The lines of a JSON-lines file up to the first one that is not whole JSON (cut short)."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = []
    for line in path.read_text(encoding="utf-8").split("\n"):
        try:
            json.loads(line)
        except ValueError:
            break
        lines.append(line)
    return lines


def read_json_or_none(path: str | os.PathLike) -> dict | None:
    """The JSON object in ``path``, or None when it is absent or not JSON."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8-sig"))
    except (OSError, ValueError):
        return None


def tensor_digest(params: dict) -> str:
    """A short hash of adapter tensors (their names, shapes, dtypes and values)."""
    h = hashlib.sha256()
    for key in sorted(params):
        t = params[key].detach().to("cpu").contiguous()
        h.update(f"{key}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]
