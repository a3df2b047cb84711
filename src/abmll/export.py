"""Gaussian LoRA adapters as standard PEFT LoRA folders, and back.

An exported folder is a plain PEFT LoRA adapter plus an abmll sidecar:

- ``adapter_config.json``: a :class:`peft.LoraConfig` built by
  :func:`abmll.targets.peft_lora_config` (r, lora_alpha, fan_in_fan_out,
  base_model_name_or_path: what the base loads by, see :func:`export_peft`; task_type ``CAUSAL_LM``), whose target_modules,
  layers_to_transform and layers_pattern are read off the tensors written
  (:func:`adapter_layout`): peft builds a LoRA module exactly where the file has weights;
- ``adapter_model.safetensors``: the mean pair (``lora_A`` = A_mu, ``lora_B`` = B_mu) under the
  names peft saves them with (``get_peft_model_state_dict``: no adapter name), so
  ``PeftModel.from_pretrained(base, folder)`` is the posterior-mean model W0 + M (the
  method's n_samples = 0 prediction) and works with any peft / transformers tooling;
- ``abmll_scale.safetensors``: the scale pair (``bayes_scale_A`` / ``bayes_scale_B``, abmll's
  flat-dict keys), which peft ignores;
- ``abmll_config.json``: the abmll config (as in an abmll adapter folder) with
  ``"format": "peft"``, so :func:`load_adapter_folder` rebuilds the full Gaussian, and the
  sha256 of both tensor files (``"sha256": {file name: hex}``), which :func:`load_peft_export`
  checks (an export of older abmll, without them, still loads).

:func:`load_adapter_folder` reads both this layout and abmll's own
(:func:`abmll.checkpoint.save_adapter`), returning the same flat dict of all four matrices.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from functools import partial
from pathlib import Path
from typing import Any

import torch

from abmll.bayes_lora import LORA_A, LORA_B, SCALE_A, SCALE_B, BayesLoraModel
from abmll.checkpoint import (
    BUNDLE,
    CONFIG,
    SHA256,
    TENSORS,
    CheckpointError,
    atomic_folder,
    check_bundle,
    encode_tensors,
    load_adapter,
    new_bundle_id,
    read_tensors,
    recorded_sha256,
    without_bundle,
    write_bytes,
    write_json,
    write_tensors,
)
from abmll.models import portable_name
from abmll.targets import peft_lora_config

PEFT_CONFIG = "adapter_config.json"
PEFT_TENSORS = "adapter_model.safetensors"
SCALE_TENSORS = "abmll_scale.safetensors"
EXPORT_FORMAT = "peft"
EXPORT_REMEDY = "; write the adapter again (abmll export / abmll adapt), or download or copy it again from where it came from"
"""What to do about a damaged file of an exported adapter (appended to the CheckpointError)."""

_MEAN_SUFFIXES = {f".{LORA_A}": ".lora_A.weight", f".{LORA_B}": ".lora_B.weight"}
_SCALE_SUFFIXES = (f".{SCALE_A}", f".{SCALE_B}")


def _split(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(mean pair under peft's saved names, scale pair under abmll's keys).

    Raises:
        ValueError: a key is neither a mean nor a scale matrix, or a layer lacks one of its four.
    """
    mean, scale, layers = {}, {}, {}
    for key, value in tensors.items():
        for ours, theirs in _MEAN_SUFFIXES.items():
            if key.endswith(ours):
                mean[key.removesuffix(ours) + theirs] = value
                layers.setdefault(key.removesuffix(ours), set()).add(ours)
                break
        else:
            suffix = next((s for s in _SCALE_SUFFIXES if key.endswith(s)), None)
            if suffix is None:
                raise ValueError(
                    f"{key!r} is not a Gaussian LoRA tensor (expected *.{LORA_A}, *.{LORA_B}, *.{SCALE_A} or *.{SCALE_B})"
                )
            scale[key] = value
            layers.setdefault(key.removesuffix(suffix), set()).add(suffix)
    incomplete = [name for name, parts in layers.items() if len(parts) != 4]
    if incomplete:
        raise ValueError(f"layer {incomplete[0]!r} lacks some of its four matrices (mean A/B, scale A/B)")
    return mean, scale


def adapter_layout(tensors: dict[str, torch.Tensor]) -> tuple[list[str], list[int] | None, str | None]:
    """What an adapter holds, read off its tensor keys: (target module suffixes, sorted
    decoder-layer indices or None when the keys carry no layer index, the name of the layer
    list holding them, e.g. ``layers`` or ``h``).

    Raises:
        ValueError: the adapted modules sit in more than one layer list.
    """
    names = {k.removesuffix(f".{LORA_A}") for k in tensors if k.endswith(f".{LORA_A}")}
    targets = sorted({n.rsplit(".", 1)[-1] for n in names})
    positions = [re.search(r"(?:^|\.)([^.]+)\.(\d+)\.", n) for n in names]
    if not names or any(p is None for p in positions):
        return targets, None, None
    patterns = {p.group(1) for p in positions}
    if len(patterns) != 1:
        raise ValueError(f"adapted modules in more than one layer list ({sorted(patterns)})")
    return targets, sorted({int(p.group(2)) for p in positions}), patterns.pop()


def export_peft(
    folder: str | os.PathLike,
    tensors: dict[str, torch.Tensor],
    config: dict[str, Any],
    model: BayesLoraModel | None = None,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Write adapter ``tensors`` (a prior theta or a posterior lambda) as a PEFT LoRA folder
    with the abmll sidecar (see the module docstring). The folder is written as a unit
    (:func:`abmll.checkpoint.atomic_folder`: an existing export there is replaced whole), its
    files sharing one bundle id that :func:`load_peft_export` checks.

    Args:
        folder: output folder (created if needed).
        tensors: flat dict of all four matrices per adapted layer, keyed as in
            :class:`~abmll.bayes_lora.BayesLoraModel` (``...q_proj.lora_A.default.weight``:
            A_mu (r, d_in), ``lora_B``: B_mu (d_out, r), ``bayes_scale_A`` (r, d_in),
            ``bayes_scale_B`` (d_out, r)).
        config: the abmll config of the adapter (``{group: fields}`` plus e.g. ``kind``,
            ``rho0``); its ``lora`` group gives r, alpha and target_modules when ``model`` is None.
        model: the model the tensors belong to; when given, the LoRA config (resolved target
            modules, fan_in_fan_out for Conv1D layers) and the base model's name are taken
            from it.
        base_model_name_or_path: recorded in adapter_config.json; default: what another
            folder or machine loads the base by, :func:`abmll.models.portable_name` of
            ``config["model"]["model"]`` (the hub id of the embedded default, the absolute
            path of a local folder or ``.gguf`` file), else the ``model``'s ``name_or_path``.
    Returns: the folder.
    Raises:
        ValueError: a tensor key is not one of the four Gaussian LoRA matrices, a layer is
            incomplete, ``model`` is given and the keys are not exactly its adapter keys, or
            ``folder`` is not empty and not an export (its other files would be lost).

    Without ``model``, ``fan_in_fan_out`` is written as False; for GPT-2 style Conv1D layers
    peft sets it to True itself when loading (with a warning), the weights being the same.
    """
    folder = Path(folder)
    if folder.is_dir() and any(folder.iterdir()) and not is_peft_export(folder):
        raise ValueError(
            f"{folder} is not empty and not an exported adapter; export into a new or empty folder (the whole folder is replaced)"
        )
    mean, scale = _split(tensors)
    if model is not None:
        expected = set(model.init_params())
        if set(tensors) != expected:
            missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
            raise ValueError(f"tensors do not match the model's adapter (missing {missing[:2]}, unexpected {extra[:2]})")
        rank, alpha = model.config.rank, model.config.alpha
        fan_in_fan_out = any(L.fan_in_fan_out for L in model.layers)
        base_name = getattr(model.peft_model.get_base_model(), "name_or_path", None)
    else:
        group = config.get("lora", {})
        if "rank" not in group or "alpha" not in group:
            raise ValueError("config['lora'] must give rank and alpha (or pass the model)")
        rank, alpha, fan_in_fan_out = int(group["rank"]), group["alpha"], False
        base_name = None
    given = config.get("model", {}).get("model")
    targets, layers, pattern = adapter_layout(tensors)
    lora = peft_lora_config(rank, alpha, targets, layers, pattern, fan_in_fan_out, task_type="CAUSAL_LM")
    lora.base_model_name_or_path = base_model_name_or_path or (portable_name(given) if given else base_name)
    lora.inference_mode = True

    bundle = new_bundle_id()
    peft_dict = lora.to_dict()
    peft_dict = {k: sorted(v) if isinstance(v, set) else v for k, v in peft_dict.items()}
    mean_file = encode_tensors(mean, {"format": "pt", BUNDLE: bundle})  # its sha256 goes into the config first
    with atomic_folder(folder) as tmp:
        sums = {SCALE_TENSORS: write_tensors(tmp / SCALE_TENSORS, scale, {"format": "abmll", BUNDLE: bundle})}
        sums[PEFT_TENSORS] = hashlib.sha256(mean_file).hexdigest()
        write_json(tmp / CONFIG, {**config, "format": EXPORT_FORMAT, BUNDLE: bundle, SHA256: sums})
        write_bytes(tmp / PEFT_TENSORS, mean_file)
        write_json(tmp / PEFT_CONFIG, peft_dict)
    return folder


def is_peft_export(folder: str | os.PathLike) -> bool:
    """True when ``folder`` holds a PEFT adapter with the abmll scale sidecar."""
    folder = Path(folder)
    return (folder / PEFT_TENSORS).is_file() and (folder / SCALE_TENSORS).is_file()


def load_peft_export(folder: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """Read a folder written by :func:`export_peft` back into abmll's flat dict of all four
    matrices per layer (exactly the exported values) and its abmll config.

    Raises:
        CheckpointError: a file is missing, empty or unreadable, a tensor file is not the bytes
            written (its sha256 differs from the one abmll_config.json records; an export of
            older abmll, without them, is not checked), the files come from different saves
            (bundle ids), or the mean and scale pairs do not cover the same layers; the message
            names the folder or file and what to do.
    """
    folder = Path(folder)
    config_path = folder / CONFIG
    if not config_path.is_file():
        raise CheckpointError(
            f"{config_path}: not found (an exported abmll adapter holds {PEFT_TENSORS}, {SCALE_TENSORS} and {CONFIG})"
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{config_path}: not valid JSON ({err})") from err
    read = {}
    for name in (PEFT_TENSORS, SCALE_TENSORS):
        digest = recorded_sha256(config, name, config_path)
        same_save = partial(check_bundle, config_path, config, tensor_path=folder / name)  # before the checksum
        read[name], _ = read_tensors(folder / name, device, digest, config_path, EXPORT_REMEDY, same_save)
    mean, scale = read[PEFT_TENSORS], read[SCALE_TENSORS]
    tensors = {}
    for key, value in mean.items():
        theirs = next((t for t in _MEAN_SUFFIXES.values() if key.endswith(t)), None)
        if theirs is None:
            raise CheckpointError(f"{folder / PEFT_TENSORS}: unexpected tensor {key!r} (only LoRA A/B matrices)")
        ours = next(o for o, t in _MEAN_SUFFIXES.items() if t == theirs)
        tensors[key.removesuffix(theirs) + ours] = value
    tensors.update(scale)
    try:
        _split(tensors)
    except ValueError as err:
        raise CheckpointError(f"{folder}: mean and scale pairs do not match ({err})") from err
    return tensors, without_bundle(config)


def load_adapter_folder(folder: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """``(tensors, config)`` of an adapter folder in either layout: abmll's own
    (``adapter.safetensors``) or an export (:func:`export_peft`).

    Raises:
        CheckpointError: neither layout is there, or its files are missing / unreadable.
    """
    folder = Path(folder)
    if (folder / TENSORS).is_file():
        return load_adapter(folder, device)
    if is_peft_export(folder):
        return load_peft_export(folder, device)
    if (folder / PEFT_TENSORS).is_file():
        raise CheckpointError(
            f"{folder}: a plain PEFT adapter without {SCALE_TENSORS}; abmll needs the Gaussian's "
            f"scale pair too (folders written by `abmll export` / `abmll adapt` have it)"
        )
    raise CheckpointError(
        f"{folder}: not an abmll adapter folder (expected {TENSORS} or {PEFT_TENSORS} + {SCALE_TENSORS}, with {CONFIG})"
    )
