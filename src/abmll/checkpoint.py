"""Adapters and training states on disk: safetensors tensors + JSON, written atomically.

A saved adapter (a prior theta or a task posterior lambda) is a folder with
``adapter.safetensors`` (the flat dict of adapter tensors, see :mod:`abmll.bayes_lora`) and
``abmll_config.json`` (everything needed to rebuild the model it belongs to). Both carry the
same random ``bundle`` id (the tensors in their safetensors metadata), and loading refuses a
pair whose ids differ: files of two saves (one interrupted half-way) are never mixed.
A folder that is only an adapter can also be written whole (:func:`atomic_folder`).

Every tensor file is recorded in the JSON written beside it with the sha256 of the bytes
written (``"sha256": {file name: hex digest}``), and loading refuses a file whose bytes differ
(a flipped bit, a truncated or replaced file), naming it: abmll never adapts with or resumes
from bytes it did not write. Files of older abmll, whose JSON records no checksum, still load.

Files get the permissions the user's umask gives (as ``open`` would), not ``mkstemp``'s 0600.

Meta-training states are written the same way by :mod:`abmll.train_state`.

Nothing is ever loaded with pickle: safetensors holds raw tensors only, everything else is JSON.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
import uuid
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensor_bytes
from safetensors.torch import save as tensor_bytes

TENSORS = "adapter.safetensors"
CONFIG = "abmll_config.json"
SHA256 = "sha256"


class CheckpointError(ValueError):
    """An adapter or state folder is missing, truncated, tampered with or not safetensors /
    JSON, inconsistent, or a file's bytes differ from those written (its sha256); the message
    names the file."""


BUNDLE = "bundle"


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write) -> None:
    """Write a file atomically: ``write(tmp_path)`` fills a temporary file in the same folder,
    which is fsync'ed, given the umask's permissions and renamed over ``path``; a crash never
    leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    """Atomically write ``obj`` as JSON, indented by ``indent`` spaces (None: one line, for
    large machine-read files)."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=indent) + "\n"))


@contextlib.contextmanager
def atomic_folder(folder: str | os.PathLike) -> Iterator[Path]:
    """Write a whole folder as a unit: yields a new temporary sibling to fill; on success it
    takes ``folder``'s place (an old ``folder`` is moved aside first and then removed), on an
    error it is removed and ``folder`` is left as it was. Readers see the old folder or the
    new one, never a mix (between the two renames, briefly, none)."""
    folder = Path(folder).resolve() if Path(folder).is_symlink() else Path(folder)  # replace the link's target
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".tmp"))
    if folder.is_dir():  # the new folder keeps the old one's mode and group
        st = folder.stat()
        os.chmod(tmp, stat.S_IMODE(st.st_mode))
        with contextlib.suppress(OSError):
            os.chown(tmp, -1, st.st_gid)
    else:
        os.chmod(tmp, 0o777 & ~_umask())
    old = None
    try:
        yield tmp
        if folder.exists():
            old = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".old"))
            os.replace(folder, old / folder.name)
        os.replace(tmp, folder)
        _fsync_dir(folder.parent)
    except BaseException:
        if old is not None and not folder.exists():  # interrupted between the two renames: put it back
            os.replace(old / folder.name, folder)
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def new_bundle_id() -> str:
    """A random id shared by the files of one adapter save (see the module docstring)."""
    return uuid.uuid4().hex


def check_bundle(path: str | os.PathLike, config: dict, metadata: dict[str, str], tensor_path) -> None:
    """Raises CheckpointError when the config at ``path`` and the tensors at ``tensor_path``
    carry different bundle ids (files of two different saves; neither carrying one is older
    abmll's layout and accepted)."""
    mine, theirs = config.get(BUNDLE) if isinstance(config, dict) else None, metadata.get(BUNDLE)
    if mine != theirs:
        raise CheckpointError(
            f"{path} and {tensor_path} were not written by the same save (bundle {mine} vs "
            f"{theirs}): an interrupted save left files of two versions; save the adapter again"
        )


ADAPTER_REMEDY = "; save the adapter again, or copy it again from where it came from"
"""What to do about a damaged adapter file (appended to the CheckpointError)."""


def save_adapter(folder: str | os.PathLike, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> Path:
    """Save adapter ``tensors`` (flat dict, any shapes) and its JSON-serialisable ``config``
    into ``folder`` (created if needed), each file atomically, both with one new bundle id
    (an interrupted save is detected by :func:`load_adapter`); the config records the tensor
    file's sha256 (``"sha256": {"adapter.safetensors": hex}``). Returns the folder."""
    folder = Path(folder)
    bundle = new_bundle_id()
    digest = write_tensors(folder / TENSORS, tensors, {"format": "abmll", BUNDLE: bundle})
    write_json(folder / CONFIG, {**config, BUNDLE: bundle, SHA256: {TENSORS: digest}})
    return folder


def encode_tensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """The safetensors file of ``tensors`` (moved to the CPU, made contiguous) with ``metadata``."""
    return tensor_bytes({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, metadata=metadata)


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """Atomically write ``tensors`` (moved to the CPU, made contiguous) as a safetensors file
    with ``metadata``. Returns the sha256 (hex) of the file written (see :func:`write_bytes`)."""
    return write_bytes(path, encode_tensors(tensors, metadata))


def write_bytes(path: Path, data: bytes) -> str:
    """Atomically write ``data`` to ``path``. Returns its sha256 (hex), which the temporary
    file is read back and checked to have before it is renamed into place.

    Raises:
        OSError: the file read back differs from ``data`` (nothing is renamed into place).
    """
    digest = hashlib.sha256(data).hexdigest()

    def write(tmp):
        Path(tmp).write_bytes(data)
        if file_sha256(Path(tmp)) != digest:
            raise OSError(f"{path}: the bytes read back differ from those written")

    atomic_write(path, write)
    return digest


def file_sha256(path: Path) -> str:
    """The sha256 (hex) of the file at ``path``, read in chunks."""
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            sha.update(chunk)
    return sha.hexdigest()


def recorded_sha256(record: Any, name: str, json_path: Path) -> str | None:
    """The sha256 that the JSON ``record`` (read from ``json_path``) records for its file
    ``name``; None when it records none (written by an older abmll).

    Raises:
        CheckpointError: it has a ``sha256`` entry, but no valid digest for ``name`` there.
    """
    if not isinstance(record, dict) or SHA256 not in record:
        return None
    sums = record[SHA256]
    digest = sums.get(name) if isinstance(sums, dict) else None
    if not (isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest)):
        raise CheckpointError(f"{json_path}: its {SHA256} entry records no valid checksum for {name}")
    return digest


def read_tensors(
    path: Path,
    device: str | torch.device = "cpu",
    sha256: str | None = None,
    recorded_in: Path | None = None,
    remedy: str = "",
    check_metadata: Callable[[dict[str, str]], None] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of a safetensors file, read once and parsed from the bytes read;
    when ``sha256`` is given (recorded in the JSON file ``recorded_in``), those bytes must
    have it. ``check_metadata(metadata)`` runs before the checksum is compared (e.g.
    :func:`check_bundle`: a file of another save is reported as such).

    Raises:
        CheckpointError: naming ``path``, followed by ``remedy`` (what to do): it is missing,
            empty, not safetensors (a pickle, truncated, a tampered header) or its sha256
            differs (a changed byte, or another file in its place); or from ``check_metadata``.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found{remedy}") from None
    except OSError as err:
        raise CheckpointError(f"{path}: not readable ({err}){remedy}") from err
    if not data:
        raise CheckpointError(f"{path}: empty (0 bytes){remedy}")
    try:
        # copied into fresh (allocator-aligned) storage: views into ``data`` sit at a different
        # alignment on every read, and CPU kernels then round differently from load to load
        tensors = {k: v.clone() for k, v in load_tensor_bytes(data).items()}
        n = int.from_bytes(data[:8], "little")
        metadata = json.loads(data[8 : 8 + n]).get("__metadata__") or {}
    except (SafetensorError, ValueError, AttributeError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err}){remedy}") from err
    if check_metadata is not None:
        check_metadata(metadata)
    if sha256 is not None:
        digest = hashlib.sha256(data).hexdigest()
        if digest != sha256:
            raise CheckpointError(
                f"{path}: damaged: its sha256 is {digest[:16]}..., not the {sha256[:16]}... recorded in "
                f"{recorded_in} when it was written (a changed byte, or another file in its place){remedy}"
            )
    if str(device) != "cpu":
        tensors = {k: v.to(device) for k, v in tensors.items()}
    return tensors, metadata


def read_json(path: Path) -> Any:
    """The JSON of ``path`` (a UTF-8 BOM allowed). Raises CheckpointError naming the file when
    it is missing or not valid JSON."""
    if not path.is_file():
        raise CheckpointError(f"{path}: not found")
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from err


def load_adapter(folder: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """Load ``(tensors, config)`` saved by :func:`save_adapter`.

    Raises:
        CheckpointError: the folder or a file is missing, the tensor file is empty, not valid
            safetensors (a pickle, truncated, a tampered header) or not the bytes written (its
            sha256 differs from the config's; a config without one, of older abmll, is not
            checked), the config is not JSON, or the two files come from different saves
            (their bundle ids differ).
    """
    folder = Path(folder)
    tensor_path, config_path = folder / TENSORS, folder / CONFIG
    for p in (tensor_path, config_path):
        if not p.is_file():
            raise CheckpointError(f"{p}: not found (an abmll adapter folder holds {TENSORS} and {CONFIG})")
    config = read_json(config_path)
    digest = recorded_sha256(config, TENSORS, config_path)
    same_save = partial(check_bundle, config_path, config, tensor_path=tensor_path)
    tensors, _ = read_tensors(tensor_path, device, digest, config_path, ADAPTER_REMEDY, same_save)
    return tensors, without_bundle(config)


def without_bundle(config):
    """``config`` without its bundle id and checksums (records of the save, not the adapter's settings)."""
    return {k: v for k, v in config.items() if k not in (BUNDLE, SHA256)} if isinstance(config, dict) else config
