"""Adapters and training states on disk: safetensors tensors + JSON, written atomically.

A saved adapter (a prior theta or a task posterior lambda) is a folder with
``adapter.safetensors`` (the flat dict of adapter tensors, see :mod:`abmll.bayes_lora`) and
``abmll_config.json`` (everything needed to rebuild the model it belongs to). Both carry the
same random ``bundle`` id (the tensors in their safetensors metadata), and loading refuses a
pair whose ids differ: files of two saves (one interrupted half-way) are never mixed.
A folder that is only an adapter can also be written whole (:func:`atomic_folder`).

Files get the permissions the user's umask gives (as ``open`` would), not ``mkstemp``'s 0600.

A training state (see :func:`save_state`) is a folder with ``state-<step>.safetensors`` and
``state.json``; the JSON file is written last and names the tensor file, so replacing it is
the single atomic step that commits a new state: a crash at any moment leaves the previous
state or the new one, never a mix.

Nothing is ever loaded with pickle: safetensors holds raw tensors only, everything else is JSON.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import stat
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

TENSORS = "adapter.safetensors"
CONFIG = "abmll_config.json"
STATE = "state.json"
STATE_FORMAT = "abmll-state"
_STATE_TENSORS = re.compile(r"state-(\d+)\.safetensors")


class CheckpointError(ValueError):
    """An adapter or state folder is missing, truncated, tampered with or not safetensors /
    JSON, or inconsistent; the message names the file."""


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


def save_adapter(folder: str | os.PathLike, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> Path:
    """Save adapter ``tensors`` (flat dict, any shapes) and its JSON-serialisable ``config``
    into ``folder`` (created if needed), each file atomically, both with one new bundle id
    (an interrupted save is detected by :func:`load_adapter`). Returns the folder."""
    folder = Path(folder)
    bundle = new_bundle_id()
    write_tensors(folder / TENSORS, tensors, {"format": "abmll", BUNDLE: bundle})
    write_json(folder / CONFIG, {**config, BUNDLE: bundle})
    return folder


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Atomically write ``tensors`` (moved to the CPU, made contiguous) as a safetensors file
    with ``metadata``."""
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(cpu, tmp, metadata=metadata))


def read_tensors(path: Path, device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of a safetensors file; CheckpointError naming ``path`` otherwise."""
    if not path.is_file():
        raise CheckpointError(f"{path}: not found")
    try:
        with safe_open(path, framework="pt", device=str(device)) as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from err


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
        CheckpointError: the folder or a file is missing, the tensor file is not valid
            safetensors (a pickle, truncated, a tampered header), the config is not JSON, or
            the two files come from different saves (their bundle ids differ).
    """
    folder = Path(folder)
    tensor_path, config_path = folder / TENSORS, folder / CONFIG
    for p in (tensor_path, config_path):
        if not p.is_file():
            raise CheckpointError(f"{p}: not found (an abmll adapter folder holds {TENSORS} and {CONFIG})")
    config = _read_json(config_path)
    tensors, metadata = read_tensors(tensor_path, device)
    check_bundle(config_path, config, metadata, tensor_path)
    return tensors, without_bundle(config)


def without_bundle(config):
    """``config`` without its bundle id (not part of the adapter's settings)."""
    return {k: v for k, v in config.items() if k != BUNDLE} if isinstance(config, dict) else config


def save_state(folder: str | os.PathLike, step: int, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> Path:
    """Save a training state at ``step`` into ``folder`` (created if needed), atomically as a pair.

    ``tensors`` (flat dict, any shapes and dtypes) go to ``state-<step>.safetensors`` (with
    ``step`` in its metadata), then ``state.json`` = ``state`` (JSON-serialisable) plus
    ``step``, ``format`` and the tensor file's name replaces the previous one: that rename is
    the commit. Tensor files of older states are removed afterwards. Returns the folder.
    """
    folder = Path(folder)
    name = f"state-{step:08d}.safetensors"
    write_tensors(folder / name, tensors, {"format": STATE_FORMAT, "step": str(step)})
    write_json(folder / STATE, {**state, "format": STATE_FORMAT, "step": step, "tensors": name})
    for old in folder.iterdir():
        stale_tmp = old.name.startswith(".state") and old.name.endswith(".tmp")
        if old.name != name and (_STATE_TENSORS.fullmatch(old.name) or stale_tmp):
            old.unlink(missing_ok=True)
    return folder


def load_state(folder: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """Load ``(tensors, state)`` written by :func:`save_state`; ``state["step"]`` is the step.

    Raises:
        CheckpointError: ``state.json`` or the tensor file it names is missing, not valid JSON /
            safetensors (a pickle, truncated, a tampered header), or the two disagree on the step.
    """
    folder = Path(folder)
    json_path = folder / STATE
    state = _read_json(json_path)
    if not (
        isinstance(state, dict)
        and state.get("format") == STATE_FORMAT
        and isinstance(state.get("step"), int)
        and isinstance(state.get("tensors"), str)
        and _STATE_TENSORS.fullmatch(state["tensors"])
    ):
        raise CheckpointError(f"{json_path}: not an abmll training state (format, step and tensors fields)")
    tensor_path = folder / state["tensors"]
    tensors, metadata = read_tensors(tensor_path, device)
    if metadata.get("format") != STATE_FORMAT or metadata.get("step") != str(state["step"]):
        raise CheckpointError(f"{tensor_path}: metadata {metadata} does not match step {state['step']} of {json_path}")
    return tensors, state


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
) -> tuple[dict[str, torch.Tensor], dict]:
    """Load and check the state written by :func:`save_trainer_state` before anything uses it.

    Args:
        shapes: name -> shape of the trainer's theta; the saved theta and best prior must match.
        changes: called with the saved config, returns the differences that forbid resuming
            (e.g. ``lambda saved: abmll.train.config_changes(saved, config)``).
    Returns:
        (tensors, state): ``state["history"]`` holds ``state["step"]`` entries; the RNG state
        is a torch RNG state; ``state["validation"]`` is a list of dicts with an ``nll``.
    Raises:
        CheckpointError: naming the file: missing, unreadable or inconsistent state, a
            config with ``changes``, or tensors that do not match ``shapes``.
    """
    tensors, state = load_state(folder)
    where = Path(folder) / STATE
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
    return tensors, state
