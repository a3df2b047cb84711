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

A training state (see :func:`save_state`) is a folder with ``state-<step>.safetensors`` and
``state.json``; the JSON file is written last and names the tensor file, so replacing it is
the single atomic step that commits a new state: a crash at any moment leaves the previous
state or the new one, never a mix. The state before the newest is kept too
(``state.previous.json`` and its tensor file), and :func:`load_latest_state` falls back to
it, with a warning, when the newest one is damaged.

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
import warnings
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
STATE = "state.json"
PREVIOUS_STATE = "state.previous.json"
SHA256 = "sha256"
STATE_FORMAT = "abmll-state"
_STATE_TENSORS = re.compile(r"state-(\d+)\.safetensors")


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


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2) + "\n"))


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


def _read_json(path: Path) -> Any:
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
    config = _read_json(config_path)
    digest = recorded_sha256(config, TENSORS, config_path)
    same_save = partial(check_bundle, config_path, config, tensor_path=tensor_path)
    tensors, _ = read_tensors(tensor_path, device, digest, config_path, ADAPTER_REMEDY, same_save)
    return tensors, without_bundle(config)


def without_bundle(config):
    """``config`` without its bundle id and checksums (records of the save, not the adapter's settings)."""
    return {k: v for k, v in config.items() if k not in (BUNDLE, SHA256)} if isinstance(config, dict) else config


def save_state(folder: str | os.PathLike, step: int, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> Path:
    """Save a training state at ``step`` into ``folder`` (created if needed), atomically as a
    pair, keeping the state before it.

    ``tensors`` (flat dict, any shapes and dtypes) go to ``state-<step>.safetensors`` (with
    ``step`` in its metadata), then ``state.json`` = ``state`` (JSON-serialisable) plus
    ``step``, ``format``, the tensor file's name and its sha256 (``"sha256": {name: hex}``)
    replaces the newest one: that rename is the commit. The state it replaced becomes the
    previous one (``state.previous.json``, a copy of its JSON) when it is intact (its tensor
    file has the recorded sha256) and of an earlier step; otherwise the previous one stays
    (when of an earlier step). Tensor files of neither state (older ones, orphans of a crash)
    are removed last. A crash at any moment leaves a loadable newest state and the previous
    one of before the call or of after it. Returns the folder.
    """
    folder = Path(folder)
    name = f"state-{step:08d}.safetensors"
    digest = write_tensors(folder / name, tensors, {"format": STATE_FORMAT, "step": str(step)})
    newest = _intact_state(folder, STATE)
    if newest is not None and newest["step"] < step and newest["tensors"] != name:
        previous = newest
    else:
        previous = _intact_state(folder, PREVIOUS_STATE, check_file=False)
        if previous is not None and (previous["step"] >= step or previous["tensors"] == name):
            previous = None
    write_json(folder / STATE, {**state, "format": STATE_FORMAT, "step": step, "tensors": name, SHA256: {name: digest}})
    if previous is None:
        (folder / PREVIOUS_STATE).unlink(missing_ok=True)
    elif previous is newest:  # until this rename, the previous state is the one before it, its files still there
        write_json(folder / PREVIOUS_STATE, newest)
    keep = {name} if previous is None else {name, previous["tensors"]}
    for old in folder.iterdir():
        stale_tmp = old.name.startswith(".state") and old.name.endswith(".tmp")
        if old.name not in keep and (_STATE_TENSORS.fullmatch(old.name) or stale_tmp):
            old.unlink(missing_ok=True)
    return folder


def _state_json(json_path: Path) -> dict:
    """The JSON of a training state, checked to name its tensor file.

    Raises:
        CheckpointError: missing, not JSON, or without the format, step and tensors fields.
    """
    state = _read_json(json_path)
    if not (
        isinstance(state, dict)
        and state.get("format") == STATE_FORMAT
        and isinstance(state.get("step"), int)
        and isinstance(state.get("tensors"), str)
        and _STATE_TENSORS.fullmatch(state["tensors"])
    ):
        raise CheckpointError(f"{json_path}: not an abmll training state (format, step and tensors fields)")
    return state


def _intact_state(folder: Path, name: str, check_file: bool = True) -> dict | None:
    """The state JSON ``folder/name`` when it is one and (``check_file``) its tensor file has
    the recorded sha256 (is not empty, when none is recorded); None otherwise."""
    try:
        state = _state_json(folder / name)
        if not check_file:
            return state
        digest = recorded_sha256(state, state["tensors"], folder / name)
        tensor_path = folder / state["tensors"]
        intact = file_sha256(tensor_path) == digest if digest is not None else tensor_path.stat().st_size > 0
    except (CheckpointError, OSError):
        return None
    return state if intact else None


def _load_state_file(folder: Path, name: str, device: str | torch.device) -> tuple[dict[str, torch.Tensor], dict]:
    """:func:`load_state` of the state JSON ``folder/name``, its errors without a remedy."""
    json_path = folder / name
    state = _state_json(json_path)
    tensor_path = folder / state["tensors"]
    digest = recorded_sha256(state, state["tensors"], json_path)
    tensors, metadata = read_tensors(tensor_path, device, digest, json_path)
    if metadata.get("format") != STATE_FORMAT or metadata.get("step") != str(state["step"]):
        raise CheckpointError(f"{tensor_path}: metadata {metadata} does not match step {state['step']} of {json_path}")
    return tensors, state


_START_AGAIN = "start the run again (without --resume)"


def load_state(
    folder: str | os.PathLike, device: str | torch.device = "cpu", name: str = STATE
) -> tuple[dict[str, torch.Tensor], dict]:
    """Load ``(tensors, state)`` written by :func:`save_state`: the newest state
    (``state.json``), or the previous one with ``name="state.previous.json"``; ``state["step"]``
    is the step. See :func:`load_latest_state` for the newest intact one.

    Raises:
        CheckpointError: naming the file and what to do: the state JSON or the tensor file it
            names is missing, not valid JSON / safetensors (a pickle, empty, truncated, a
            tampered header), not the bytes written (its sha256 differs from the recorded one;
            a state of older abmll, without one, is not checked), or the two disagree on the step.
    """
    folder = Path(folder)
    try:
        return _load_state_file(folder, name, device)
    except CheckpointError as err:
        if name == STATE and (folder / PREVIOUS_STATE).exists():
            remedy = f"resume from the previous state, {PREVIOUS_STATE} (`abmll meta-train --resume` falls back to it)"
        else:
            remedy = f"no earlier state is kept: {_START_AGAIN}"
        raise CheckpointError(f"{err}; {remedy}") from err


def load_latest_state(
    folder: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[dict[str, torch.Tensor], dict, Path]:
    """``(tensors, state, json_path)`` of the newest intact training state in ``folder``
    (:func:`load_state`): the newest one, else the previous one, with a RuntimeWarning
    naming the damaged file and the step resumed from.

    Raises:
        CheckpointError: the newest state is damaged and no previous one is kept, or both
            are damaged (the message names the files of both).
    """
    folder = Path(folder)
    try:
        return (*_load_state_file(folder, STATE, device), folder / STATE)
    except CheckpointError as err:
        newest = err
    previous_path = folder / PREVIOUS_STATE
    if not previous_path.exists():
        raise CheckpointError(f"{newest}; no earlier state is kept in {folder}: {_START_AGAIN}") from newest
    try:
        tensors, state = _load_state_file(folder, PREVIOUS_STATE, device)
    except CheckpointError as err:
        raise CheckpointError(
            f"no intact training state in {folder}: the newest is damaged ({newest}) and so is the previous one "
            f"({err}); {_START_AGAIN}"
        ) from err
    warnings.warn(
        f"{newest}; resuming from the previous state {previous_path} (step {state['step']}) instead",
        RuntimeWarning,
        stacklevel=2,
    )
    return tensors, state, previous_path


def optimizer_tensors(optimizer: torch.optim.Optimizer, names: list[str]) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """An optimiser's state for :func:`save_state`: per-parameter tensors as
    ``adam/<name>/<field>`` (parameter i named ``names[i]``) and its param_groups (JSON).
    Inverse: :func:`load_optimizer_tensors`."""
    optim = optimizer.state_dict()
    tensors = {}
    for i, name in enumerate(names):
        tensors.update({f"adam/{name}/{field}": v for field, v in optim["state"].get(i, {}).items()})
    return tensors, optim["param_groups"]


def load_optimizer_tensors(
    optimizer: torch.optim.Optimizer, names: list[str], tensors: dict[str, torch.Tensor], param_groups: list[dict]
) -> None:
    """Load what :func:`optimizer_tensors` returned into ``optimizer``.

    Raises:
        KeyError, TypeError, ValueError: malformed ``param_groups`` (keys the optimiser does
            not know, or without params, lr or its betas) or state; the optimiser is unchanged.
    """
    state = {}
    for i, name in enumerate(names):
        prefix = f"adam/{name}/"
        entry = {key.removeprefix(prefix): t for key, t in tensors.items() if key.startswith(prefix)}
        if entry:
            state[i] = entry
    current = optimizer.state_dict()["param_groups"]
    # a group saved by an older torch may lack options added since (torch fills their defaults)
    required = [{"params", "lr", *({"betas"} & set(c))} for c in current]
    if len(param_groups) != len(current) or any(
        not (need <= set(g) <= set(c)) for g, c, need in zip(param_groups, current, required)
    ):
        raise ValueError(f"param_groups {param_groups} do not match the optimiser's ({current})")
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in param_groups]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def rng_tensors(device: torch.device) -> dict[str, torch.Tensor]:
    """torch's RNG state (``rng/torch``), and the CUDA one of ``device`` (``rng/cuda``) when it is a GPU."""
    tensors = {"rng/torch": torch.get_rng_state()}
    if device.type == "cuda":
        tensors["rng/cuda"] = torch.cuda.get_rng_state(device)
    return tensors


def checked_rng_state(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """The ``rng/torch`` entry of :func:`rng_tensors`' output, checked to be a torch RNG state
    (and ``rng/cuda``, when present, a uint8 vector).

    Raises:
        KeyError: missing; ValueError: not a uint8 tensor of torch's RNG state shape.
    """
    state = tensors["rng/torch"]
    if state.dtype != torch.uint8 or state.shape != torch.get_rng_state().shape:
        raise ValueError(f"rng/torch is {state.dtype} {tuple(state.shape)}, not a torch RNG state")
    cuda = tensors.get("rng/cuda")
    if cuda is not None and (cuda.dtype != torch.uint8 or cuda.dim() != 1):
        raise ValueError(f"rng/cuda is {cuda.dtype} {tuple(cuda.shape)}, not a CUDA RNG state")
    return state


def set_rng_tensors(tensors: dict[str, torch.Tensor], device: torch.device) -> None:
    """Restore the RNG states of :func:`rng_tensors` (the CUDA one only on a GPU ``device``)."""
    torch.set_rng_state(checked_rng_state(tensors))
    if "rng/cuda" in tensors and device.type == "cuda":
        torch.cuda.set_rng_state(tensors["rng/cuda"], device)


def save_trainer_state(
    folder: str | os.PathLike,
    theta: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    best: dict[str, torch.Tensor] | None,
    state: dict[str, Any],
) -> Path:
    """A meta-training run's state as a training state (:func:`save_state`) at step
    ``len(state["history"])``: theta (``theta/<name>``), the optimiser of theta
    (:func:`optimizer_tensors`), the RNG states (:func:`rng_tensors`), the best prior so far
    (``best/<name>``, when given) and ``state`` (JSON: history, validation, sampler, config).
    Inverse: :func:`load_trainer_state`."""
    tensors = {f"theta/{k}": v for k, v in theta.items()}
    adam, groups = optimizer_tensors(optimizer, list(theta))
    tensors.update({**adam, **rng_tensors(next(iter(theta.values())).device)})
    tensors.update({f"best/{k}": v for k, v in (best or {}).items()})
    return save_state(folder, len(state["history"]), tensors, {"adam_param_groups": groups, **state})


def load_trainer_state(
    folder: str | os.PathLike, shapes: dict[str, tuple], changes: Callable[[dict], list[str]] | None = None
) -> tuple[dict[str, torch.Tensor], dict, Path]:
    """Load and check the state written by :func:`save_trainer_state` before anything uses it:
    the newest intact one (:func:`load_latest_state`: the previous one, with a warning, when
    the newest is damaged).

    Args:
        shapes: name -> shape of the trainer's theta; the saved theta and best prior must match.
        changes: called with the saved config, returns the differences that forbid resuming
            (e.g. ``lambda saved: abmll.train.config_changes(saved, config)``).
    Returns:
        (tensors, state, json_path): ``state["history"]`` holds ``state["step"]`` entries; the
        RNG state is a torch RNG state; ``state["validation"]`` is a list of dicts with an
        ``nll``; ``json_path`` is the state JSON loaded.
    Raises:
        CheckpointError: naming the file: missing, damaged (both the newest and the previous
            state), unreadable or inconsistent state, a config with ``changes``, or tensors
            that do not match ``shapes``.
    """
    tensors, state, where = load_latest_state(folder)
    changed = changes(state.get("config", {})) if changes is not None else []
    if changed:
        raise CheckpointError(
            f"{where}: saved with a different config ({'; '.join(changed)}); resume with the same settings or start a new run"
        )
    saved = {k.removeprefix("theta/"): tuple(v.shape) for k, v in tensors.items() if k.startswith("theta/")}
    if saved != shapes:
        diff = sorted(set(saved.items()) ^ set(shapes.items()))[:3]
        raise CheckpointError(f"{where}: adapter tensors do not match this model's (e.g. {diff})")
    if not isinstance(state.get("history"), list) or len(state["history"]) != state["step"]:
        raise CheckpointError(f"{where}: the history does not hold the {state['step']} steps done")
    try:
        checked_rng_state(tensors)
        best = {k.removeprefix("best/"): tuple(v.shape) for k, v in tensors.items() if k.startswith("best/")}
        if best and best != shapes:
            raise ValueError("the best prior's tensors do not match theta's")
        state["validation"] = list(state.get("validation", []))
        for v in state["validation"]:
            if not isinstance(v["nll"], (int, float)) or isinstance(v["nll"], bool):
                raise ValueError(f"validation at step {v.get('step')} has NLL {v['nll']!r}, not a number")
            float(v["nll"])  # OverflowError: an integer beyond float range
    except (KeyError, TypeError, ValueError, OverflowError) as err:
        raise CheckpointError(f"{where}: incomplete or invalid trainer state ({err!r})") from err
    return tensors, state, where
