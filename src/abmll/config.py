"""Dataclass configs shared by the Python API and the CLI (each field is also a ``--flag``).

The method's own configs live beside the code they configure: :class:`BayesLoraConfig` and
:class:`HyperpriorConfig` (bayes_lora), :class:`ScoringConfig` (scoring), :class:`MetaConfig`
(meta). This module holds the run-level ones and the grouping used to save and reload a run.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Literal

from abmll.bayes_lora import BayesLoraConfig
from abmll.checks import above, at_least, distinct, non_empty, one_of, seeds
from abmll.gaussian_lora import HyperpriorConfig
from abmll.meta import ADAPT_OPTIMIZERS, MetaConfig
from abmll.models import DEFAULT_MODEL, check_device
from abmll.scoring import ScoringConfig

DATA_SEEDS = [100, 13, 21, 42, 87]

DEMO_CONFIG = Path(__file__).with_name("demo.yaml")
"""The settings tuned on dev data for the embedded SmolLM2 (``abmll demo``, the benchmarks)."""

OUTER_LOOP = tuple("inner_steps outer_lr outer_warmup_steps outer_grad_clip gamma meta_batch_size meta_steps".split())
OUTER_LOOP += tuple("outer_update mean_std a0 b0 train_tasks val_tasks max_query".split())
"""Fields only meta-training uses (the outer loop, the hyperprior, the meta-train tasks)."""

BASELINES = ("ensemble_members", "lora_dropout", "support_folds")
"""Fields only the calibration baselines use (``abmll evaluate --methods``, the benchmarks)."""


@dataclass
class ModelArgs:
    """Which frozen base model, and where it runs.

    Attributes:
        model: hub id, local Hugging Face folder, .gguf file, or the embedded default.
        dtype: float32 | bfloat16 | float16 (or fp32 | bf16 | fp16) for the base weights
            (adapters stay float32).
        device: cpu | cuda | cuda:N; "auto" picks cuda when available.
    """

    model: str = DEFAULT_MODEL
    dtype: Literal["float32", "bfloat16", "float16", "fp32", "bf16", "fp16"] = "float32"
    device: str = "auto"

    def __post_init__(self) -> None:
        one_of(self, "dtype", ("float32", "bfloat16", "float16", "fp32", "bf16", "fp16"))
        check_device(self.device)


@dataclass
class TaskArgs:
    """Which tasks and data files.

    Attributes:
        data_dir: MetaICL data folder (default: $ABMLL_DATA_DIR, else ../shared/data/metaicl).
        split: meta-learning split name (splits/<split>.json).
        train_tasks: explicit meta-training tasks; overrides the split's "train" list.
        test_tasks: explicit held-out tasks; overrides the split's "test" list.
        val_tasks: meta-validation tasks, removed from the meta-train tasks: each is adapted
            on its k-shot train file and scored on its dev file (``--validate_every``).
        skip_missing: continue without tasks absent from data_dir (they are listed) instead of failing.
        k: shots per task (the k of <task>_<k>_<seed>_train.jsonl).
        data_seeds: data seeds (the seed of <task>_<k>_<seed>_*.jsonl) to sample episodes from.
        max_query: at most this many query examples per episode.
    """

    data_dir: str | None = None
    split: str = "class_to_class"
    train_tasks: list[str] = field(default_factory=list)
    test_tasks: list[str] = field(default_factory=list)
    val_tasks: list[str] = field(default_factory=list)
    skip_missing: bool = False
    k: int = 16
    data_seeds: list[int] = field(default_factory=lambda: list(DATA_SEEDS))
    max_query: int = 16

    def __post_init__(self) -> None:
        at_least(self, ("k", "max_query"), 1)
        non_empty(self, ("data_seeds",))
        distinct(self, ("test_tasks", "train_tasks", "val_tasks"))
        seeds(self, ("data_seeds",))


@dataclass
class EvalArgs:
    """Test-time adaptation and prediction.

    Attributes:
        test_steps: K_test, optimiser steps from the prior on the task's support set.
        test_lr: learning rate of those steps; unset: meta.inner_lr (SGD only: adamw needs
            its own, e.g. 0.01 as chosen on dev data for SmolLM2).
        test_optimizer: sgd (the method's inner loop) or adamw (no weight decay; as LoRA
            users fine-tune; needs --test_lr).
        eval_samples: weight samples averaged in prediction (0: posterior mean).
        max_test: at most this many test examples per task and seed.
        compare_priors: other priors to evaluate beside zero-shot and the run's own ABMLL prior
            (folders, or names of shipped priors such as ``smollm2-135m-class_to_class``),
            adapted and predicted the same way; each must fit the model's adapter shape.
        ood_tasks: out-of-distribution check: each method adapted on each test task also
            predicts these tasks' test examples, and the AUROC of telling them from the
            task's own by predictive entropy and by epistemic uncertainty is reported
            (results.json ``ood``; :mod:`abmll.ood`).
        ensemble_members: M, the LoRAs of the deep-ensemble baseline (``lora_ensemble``),
            each from its own initialisation, adapted on the same support.
        lora_dropout: the LoRA dropout rate of the MC-dropout baseline (``lora_mc_dropout``),
            on during its adaptation and its eval_samples prediction draws.
        support_folds: the k-fold splits of the support that the per-task temperature
            baselines (``*_ts_support``) fit their temperature on.
    """

    test_steps: int = 5
    test_lr: float | None = None
    test_optimizer: Literal["sgd", "adamw"] = "sgd"
    eval_samples: int = 4
    max_test: int = 64
    compare_priors: list[str] = field(default_factory=list)
    ood_tasks: list[str] = field(default_factory=list)
    ensemble_members: int = 4
    lora_dropout: float = 0.1
    support_folds: int = 4

    def __post_init__(self) -> None:
        at_least(self, ("test_steps", "eval_samples"), 0)
        at_least(self, ("max_test", "ensemble_members"), 1)
        at_least(self, ("support_folds",), 2)
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}")
        one_of(self, "test_optimizer", ADAPT_OPTIMIZERS)
        if self.test_lr is not None:
            above(self, ("test_lr",), 0.0)
        elif self.test_optimizer == "adamw":  # the inner loop's SGD rate (e.g. 0.3) makes AdamW diverge
            raise ValueError("--test_optimizer adamw needs --test_lr (the SGD --inner_lr does not carry over)")

    def adapt_lr(self, meta: MetaConfig) -> float:
        """The learning rate of test-time adaptation: ``test_lr``, else ``meta.inner_lr``."""
        return meta.inner_lr if self.test_lr is None else self.test_lr


CONFIG_GROUPS = {
    "model": ModelArgs,
    "lora": BayesLoraConfig,
    "hyperprior": HyperpriorConfig,
    "scoring": ScoringConfig,
    "meta": MetaConfig,
    "tasks": TaskArgs,
    "eval": EvalArgs,
}


def to_dict(**groups) -> dict:
    """``{group: asdict(config)}`` for saving beside checkpoints and results."""
    return {name: asdict(cfg) for name, cfg in groups.items()}


MACHINE_FIELDS = {"model": {"device"}}
"""Fields that describe the machine a run used, not the run: never taken from a saved config
(a prior meta-trained on a GPU loads on a CPU-only machine)."""


def from_dict(saved: dict, name: str, source: str = "saved config"):
    """Rebuild config group ``name`` from :func:`to_dict` output, ignoring unknown keys and
    :data:`MACHINE_FIELDS`.

    Raises:
        ValueError: a value the config refuses (e.g. ``sampling: "bogus"``); the message names
            ``source`` (e.g. the abmll_config.json path), the group and the field.
    """
    cls = CONFIG_GROUPS[name]
    known = {f.name for f in fields(cls)} - MACHINE_FIELDS.get(name, set())
    values = {k: v for k, v in (saved.get(name) or {}).items() if k in known}
    try:
        return cls(**values)
    except (TypeError, ValueError) as err:
        for key, value in values.items():  # name the first field that is refused on its own
            try:
                cls(**{key: value})
            except (TypeError, ValueError) as own:
                raise ValueError(f"{source}: invalid {name}.{key} = {value!r} ({own})") from None
        raise ValueError(f"{source}: invalid {name} config ({err})") from None


ADDED_FIELDS = {
    "eval": {"test_lr": None, "test_optimizer": "sgd", "ensemble_members": 4, "lora_dropout": 0.1, "support_folds": 4},
    "meta": {"outer_warmup_steps": 0, "outer_grad_clip": 0.0},
    "scoring": {"channel": False, "channel_template": "{option}\n{input}", "channel_loss": "generative", "demonstrations": 0},
}
"""Fields added after results were first saved, with their defaults: :func:`result_config`
leaves them out while at the default, so the resume key of results saved before them holds."""


def changed_added_fields(group: str, config) -> dict:
    """The :data:`ADDED_FIELDS` of ``group`` whose value in ``config`` is not their default
    (what a resume key records of them)."""
    return {
        name: getattr(config, name) for name, default in ADDED_FIELDS.get(group, {}).items() if getattr(config, name) != default
    }


def group_dict(group: str, config) -> dict:
    """``vars(config)`` of config group ``group`` without its :data:`ADDED_FIELDS` at their
    defaults: a cache key or record that does not change when a field is added."""
    added = ADDED_FIELDS.get(group, {})
    return {k: v for k, v in vars(config).items() if k not in added or v != added[k]}


def result_config(cfg: dict) -> dict:
    """The resolved config without machine fields (results do not depend on them), and
    without :data:`ADDED_FIELDS` at their defaults."""
    config = to_dict(**cfg)
    for group, names in MACHINE_FIELDS.items():
        for name in names:
            config.get(group, {}).pop(name, None)
    for group, defaults in ADDED_FIELDS.items():
        for name, default in defaults.items():
            if config.get(group, {}).get(name, default) == default:
                config.get(group, {}).pop(name, None)
    config.get("lora", {}).pop("frozen_cache_mb", None)  # a runtime setting
    return config
