"""Meta-training states on disk: a folder with ``state-<step>.safetensors`` and ``state.json``
(:func:`save_state`); the JSON file is written last and names the tensor file, so replacing it
is the single atomic step that commits a new state: a crash at any moment leaves the previous
state or the new one, never a mix. The state before the newest is kept too
(``state.previous.json`` and its tensor file), and :func:`load_latest_state` falls back to it,
with a warning, when the newest one is damaged. The trainer's state (theta, Adam moments, RNG
states) goes through :func:`save_trainer_state` / :func:`load_trainer_state`. Files are written
and checked as :mod:`abmll.checkpoint` writes and checks adapters.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from abmll.checkpoint import (
    SHA256,
    CheckpointError,
    file_sha256,
    read_json,
    read_tensors,
    recorded_sha256,
    write_json,
    write_tensors,
)

STATE = "state.json"


PREVIOUS_STATE = "state.previous.json"


STATE_FORMAT = "abmll-state"


_STATE_TENSORS = re.compile(r"state-(\d+)\.safetensors")


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
    state = read_json(json_path)
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
