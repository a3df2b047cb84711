"""abmll: Amortized Bayesian Meta-Learning of LoRA adapters for large language models.

The public API is importable from here (``from abmll import MetaTrainer, adapt``); names are
loaded on first use, so ``import abmll`` (and ``abmll --version``) does not import torch.
The method and its design choices: docs/method.md.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_API = {
    "abmll.bayes_lora": ("BayesLoraConfig", "BayesLoraModel", "HyperpriorConfig"),
    "abmll.config": ("EvalArgs", "ModelArgs", "RunConfig", "TaskArgs", "from_dict"),
    "abmll.data": ("DataError", "Example", "load_episode", "read_jsonl"),
    "abmll.evaluate": ("Method", "Result", "evaluate_with_predictions", "run_method"),
    "abmll.export": ("export_peft", "load_adapter_folder"),
    "abmll.loading": ("load_prior",),
    "abmll.meta": ("MetaConfig", "NonFiniteLossError", "adapt", "meta_step", "predict_batches", "predict_samples"),
    "abmll.methods": ("METHODS", "train_prior"),
    "abmll.metrics": ("compute_metrics", "expected_calibration_error"),
    "abmll.models": ("load_base_model",),
    "abmll.priors": ("resolve_adapter", "shipped_priors"),
    "abmll.scoring": ("ScoringConfig", "make_batches"),
    "abmll.train": ("MetaTrainer", "episode_batches"),
    "abmll.uncertainty": ("aurc", "decompose"),
}
_WHERE = {name: module for module, names in _API.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'abmll' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value
    return value
