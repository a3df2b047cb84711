"""Which modules of a base model get LoRA adapters: the per-architecture presets, resolving and
checking ``target_modules``, the top-layers restriction, and the peft :class:`~peft.LoraConfig`
built from them (for injecting and for exporting alike)."""

from __future__ import annotations

import re
from collections.abc import Sequence

from peft import LoraConfig
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn

AUTO_TARGETS = "auto"
"""``target_modules=["auto"]`` (or an empty list): use the preset of the model's architecture."""


TARGET_MODULE_PRESETS: dict[str, list[str]] = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],  # fused q,k,v projection, a transformers Conv1D (W0 stored d_in x d_out)
}
"""Attention projections adapted by default, per ``config.model_type``; architectures not listed
fall back to peft's own LoRA table (list-valued entries only)."""


def preset_target_modules(model_type: str) -> list[str]:
    """The default ``target_modules`` of an architecture (``config.model_type`` of a Hugging
    Face model): :data:`TARGET_MODULE_PRESETS`, else peft's LoRA default for it.

    Raises:
        ValueError: no preset is known for ``model_type`` (the message lists the known ones).
    """
    if model_type in TARGET_MODULE_PRESETS:
        return list(TARGET_MODULE_PRESETS[model_type])
    peft_default = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type)
    if isinstance(peft_default, list):
        return list(peft_default)
    raise ValueError(
        f"no target_modules preset for model_type {model_type!r} (known: {', '.join(sorted(TARGET_MODULE_PRESETS))}); "
        "pass target_modules explicitly (module-name suffixes such as q_proj, v_proj)"
    )


def resolve_target_modules(base_model: nn.Module, target_modules: list[str]) -> list[str]:
    """``target_modules`` itself, or the architecture's preset when it is empty or ``["auto"]``.

    Raises:
        ValueError: "auto" is asked for and the model has no ``config.model_type`` with a preset.
    """
    if list(target_modules) not in ([], [AUTO_TARGETS]):
        return list(target_modules)
    model_type = getattr(getattr(base_model, "config", None), "model_type", None)
    if model_type is None:
        raise ValueError("target_modules='auto' needs a Hugging Face model with config.model_type")
    return preset_target_modules(model_type)


def _dense_kind(module: nn.Module) -> str | None:
    """ "linear" for torch.nn.Linear, "conv1d" for transformers' GPT-2 style Conv1D, else None."""
    if isinstance(module, nn.Linear):
        return "linear"
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    return "conv1d" if isinstance(module, Conv1D) else None


def check_target_layers(base_model: nn.Module, lora_config: LoraConfig) -> list[tuple[str, str]]:
    """The modules of ``base_model`` that ``lora_config.target_modules`` matches (peft's own
    matching rule), as ``(name, "linear" | "conv1d")``.

    Raises:
        ValueError: a matched module is not a dense layer with a weight W0 (d_out x d_in), e.g.
            an nn.Embedding, a Conv2d, a norm or a whole attention block (the message names
            the module and its type); or nothing matches (the message gives the preset of
            the model's architecture when there is one).
    """
    found = []
    for name, module in base_model.named_modules():
        if not name or check_target_module_exists(lora_config, name) in (False, None):
            continue
        kind = _dense_kind(module)
        if kind is None:
            raise ValueError(
                f"target module {name!r} is a {type(module).__name__}, which abmll cannot adapt: only dense "
                "layers (torch.nn.Linear and GPT-2 style transformers Conv1D) are supported; "
                f"change target_modules={sorted(lora_config.target_modules)}"
            )
        found.append((name, kind))
    if not found:
        model_type = getattr(getattr(base_model, "config", None), "model_type", None)
        hint = ""
        try:
            hint = f"; the preset for {model_type} is {preset_target_modules(model_type)} (or target_modules=['auto'])"
        except ValueError:
            pass
        raise ValueError(
            f"no module of the {model_type or 'base'} model matches target_modules={sorted(lora_config.target_modules)}{hint}"
        )
    return found


def peft_lora_config(
    rank: int,
    alpha: float,
    target_modules: Sequence[str],
    layers_to_transform: Sequence[int] | None = None,
    layers_pattern: str | None = None,
    fan_in_fan_out: bool = False,
    task_type: str | None = None,
) -> LoraConfig:
    """The peft :class:`~peft.LoraConfig` of a Gaussian LoRA adapter's mean pair: the one place
    abmll builds it, for injecting adapters (:class:`BayesLoraModel`) and for exporting them
    (:func:`abmll.export.export_peft`), so a saved adapter's config names exactly the modules
    it was built on. No dropout, no bias.

    Args:
        rank, alpha: LoRA r and lora_alpha (scaling alpha / r).
        target_modules: module-name suffixes (q_proj, v_proj, c_attn, ...).
        layers_to_transform: indices of the decoder layers adapted (None: every layer).
        layers_pattern: the name of the decoder-layer list holding those indices (``layers``,
            ``h``); None lets peft match the first numbered name component.
        fan_in_fan_out: True for GPT-2 style Conv1D layers, which store W0 as (d_in, d_out).
        task_type: peft's task type (``CAUSAL_LM`` in an exported adapter; None when
            injecting, so the model stays a plain ``PeftModel``).
    """
    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=sorted(target_modules),
        lora_dropout=0.0,
        bias="none",
        layers_to_transform=None if layers_to_transform is None else sorted(layers_to_transform),
        layers_pattern=layers_pattern if layers_to_transform is not None else None,
        fan_in_fan_out=fan_in_fan_out,
        task_type=task_type,
    )


def top_layer_indices(base_model: nn.Module, top_layers: int) -> list[int] | None:
    """peft ``layers_to_transform`` for the top ``top_layers`` decoder layers (None: all).

    Raises:
        ValueError: the model has no ``config.num_hidden_layers``, or fewer layers than asked.
    """
    if not top_layers:
        return None
    n = getattr(getattr(base_model, "config", None), "num_hidden_layers", None)
    if not isinstance(n, int):
        raise ValueError("top_layers needs a Hugging Face model with config.num_hidden_layers")
    if top_layers > n:
        raise ValueError(f"top_layers={top_layers} but the model has {n} decoder layers")
    return list(range(n - top_layers, n))


def decoder_position(module_name: str) -> tuple[str, int]:
    """("path.to.layers", index) of the decoder layer holding ``module_name``
    (e.g. "base_model.model.model.layers.27.self_attn.q_proj" -> ("base_model.model.model.layers", 27))."""
    match = re.search(r"^(.*?)\.(\d+)\.", module_name)
    if match is None:
        raise ValueError(f"cannot tell which decoder layer holds {module_name!r}")
    return match.group(1), int(match.group(2))
