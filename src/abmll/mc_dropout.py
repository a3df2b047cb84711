"""MC dropout on the LoRA path (Gal & Ghahramani 2016, as LoRA users run it): peft's
``lora_dropout``, dropout on the input of every adapter's A matrix, kept on at test time, and
the prediction averaged over S dropout draws. The frozen base model runs without dropout."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from abmll.bayes_lora import BayesLoraModel


@contextmanager
def lora_dropout(model: BayesLoraModel, rate: float) -> Iterator[None]:
    """Within the block, every adapted layer's LoRA path sees its input through
    ``nn.Dropout(rate)`` (active: a fresh mask per forward, per token and feature, inputs kept
    scaled by 1 / (1 - rate)); the layers' own dropout modules are restored on exit. Rate 0
    changes nothing.

    Raises:
        ValueError: ``rate`` not in [0, 1).
    """
    if not 0 <= rate < 1:
        raise ValueError(f"LoRA dropout rate must be in [0, 1), got {rate}")
    if not rate:
        yield
        return
    saved = []
    for layer in model.layers:
        module = model.peft_model.get_submodule(layer.name)
        saved.append((module, module.lora_dropout["default"]))
        module.lora_dropout["default"] = nn.Dropout(rate)
    try:
        yield
    finally:
        for module, original in saved:
            module.lora_dropout["default"] = original
