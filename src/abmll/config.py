"""Dataclass configs shared by the Python API and the CLI (each field is also a ``--flag``).

The method's own configs live beside the code they configure: :class:`BayesLoraConfig` and
:class:`HyperpriorConfig` (bayes_lora), :class:`ScoringConfig` (scoring), :class:`MetaConfig`
(meta). This module holds the run-level ones and the grouping used to save and reload a run.
"""

from __future__ import annotations

from dataclasses import Field, asdict, dataclass, field, fields
from pathlib import Path
from typing import Literal

from abmll.bayes_lora import BayesLoraConfig
from abmll.checks import above, at_least, distinct, non_empty, one_of, seeds
from abmll.gaussian_lora import HyperpriorConfig
from abmll.meta import ADAPT_OPTIMIZERS, MetaConfig
from abmll.models import DEFAULT_MODEL, check_device
from abmll.roles import (
    ADAPTATION,
    BASELINE,
    EVALUATION,
    MACHINE,
    OUTER,
    PREDICTION,
    added_at_default,
    is_added,
    names,
    role,
    setting,
)
from abmll.scoring import ScoringConfig

DATA_SEEDS = [100, 13, 21, 42, 87]

DEMO_CONFIG = Path(__file__).with_name("demo.yaml")
"""The settings tuned on dev data for the embedded SmolLM2 (``abmll demo``, the benchmarks)."""


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
    device: str = setting("auto", role=MACHINE)

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

    data_dir: str | None = setting(None, resumable=True, inherited=False)
    split: str = "class_to_class"
    train_tasks: list[str] = setting(factory=list, role=OUTER, inherited=False)
    test_tasks: list[str] = field(default_factory=list)
    val_tasks: list[str] = setting(factory=list, role=OUTER, inherited=False)
    skip_missing: bool = False
    k: int = 16
    data_seeds: list[int] = field(default_factory=lambda: list(DATA_SEEDS))
    max_query: int = setting(16, role=OUTER)

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

    test_steps: int = setting(5, role=ADAPTATION)
    test_lr: float | None = setting(None, role=ADAPTATION, added=True)
    test_optimizer: Literal["sgd", "adamw"] = setting("sgd", role=ADAPTATION, added=True)
    eval_samples: int = setting(4, role=PREDICTION)
    max_test: int = setting(64, role=EVALUATION)
    compare_priors: list[str] = setting(factory=list, role=EVALUATION, resumable=True)
    ood_tasks: list[str] = setting(factory=list, role=EVALUATION, resumable=True)
    ensemble_members: int = setting(4, role=BASELINE, added=True)
    lora_dropout: float = setting(0.1, role=BASELINE, added=True)
    support_folds: int = setting(4, role=BASELINE, added=True)

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
        return meta.adaptation_lr(self.test_lr)


CONFIG_GROUPS = {
    "model": ModelArgs,
    "lora": BayesLoraConfig,
    "hyperprior": HyperpriorConfig,
    "scoring": ScoringConfig,
    "meta": MetaConfig,
    "tasks": TaskArgs,
    "eval": EvalArgs,
}


@dataclass
class RunConfig:
    """One run's resolved configuration: a config per group (:data:`CONFIG_GROUPS`), ``None``
    for a group the command does not take. What ``parse_args`` returns, what the commands,
    loaders and benchmarks read (``cfg.meta.inner_lr``), and what is saved beside a prior
    (:meth:`to_dict`).

    Attributes:
        model: which base model, where it runs.
        lora: the Gaussian LoRA adapter (rank, alpha, target_modules, prior scale).
        hyperprior: the hyperprior on the prior's scales.
        scoring: prompts, options and scoring (direct / channel, demonstrations).
        meta: inner and outer loop.
        tasks: tasks and data files.
        eval: test-time adaptation, prediction and the baselines' settings.
    """

    model: ModelArgs | None = None
    lora: BayesLoraConfig | None = None
    hyperprior: HyperpriorConfig | None = None
    scoring: ScoringConfig | None = None
    meta: MetaConfig | None = None
    tasks: TaskArgs | None = None
    eval: EvalArgs | None = None

    def groups(self) -> dict[str, object]:
        """``{group: config}`` of the groups this run has, in :data:`CONFIG_GROUPS` order."""
        return {name: getattr(self, name) for name in CONFIG_GROUPS if getattr(self, name) is not None}

    def to_dict(self) -> dict:
        """``{group: asdict(config)}`` for saving beside checkpoints and results."""
        return {name: asdict(cfg) for name, cfg in self.groups().items()}

    def only(self, *names: str) -> RunConfig:
        """This configuration kept to the groups ``names`` (the others ``None``)."""
        return RunConfig(**{name: getattr(self, name) for name in names})


def config_fields() -> dict[str, Field]:
    """Every field of the config groups by its entry name ``"group.field"`` (how
    :meth:`RunConfig.to_dict` output reads when flattened one level)."""
    return {f"{group}.{f.name}": f for group, cls in CONFIG_GROUPS.items() for f in fields(cls)}


def from_dict(saved: dict, name: str, source: str = "saved config"):
    """Rebuild config group ``name`` from :meth:`RunConfig.to_dict` output, ignoring unknown keys and
    machine fields (:data:`abmll.roles.MACHINE`: a prior meta-trained on a GPU loads on a
    CPU-only machine).

    Raises:
        ValueError: a value the config refuses (e.g. ``sampling: "bogus"``); the message names
            ``source`` (e.g. the abmll_config.json path), the group and the field.
    """
    cls = CONFIG_GROUPS[name]
    known = {f.name for f in fields(cls) if role(f) != MACHINE}
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


def changed_added_fields(config) -> dict:
    """The ``added`` fields (:mod:`abmll.roles`) of config ``config`` not at their default
    (what a key records of them)."""
    at_default = added_at_default(config)
    return {f.name: getattr(config, f.name) for f in fields(config) if is_added(f) and f.name not in at_default}


def group_dict(config) -> dict:
    """``vars(config)`` without its ``added`` fields at their defaults: a key or record that
    does not change when a field is added."""
    at_default = added_at_default(config)
    return {k: v for k, v in vars(config).items() if k not in at_default}


def key_dict(config) -> dict:
    """:func:`group_dict` without machine fields: what a result or prior depends on."""
    machine = set(names(type(config), MACHINE))
    return {k: v for k, v in group_dict(config).items() if k not in machine}


def result_config(cfg: RunConfig) -> dict:
    """The resolved config ``{group: config}`` as :meth:`RunConfig.to_dict` gives it, each
    group kept to its :func:`key_dict` fields: results do not depend on the machine, and a
    field added since results were saved does not change their key while at its default."""
    out = cfg.to_dict()
    for name, config in cfg.groups().items():
        keep = key_dict(config)
        out[name] = {k: v for k, v in out[name].items() if k in keep}
    return out
