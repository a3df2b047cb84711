"""The baselines of docs/method.md and ABMLL, as one registry over one code path.

Every method is a prior (how theta is obtained) plus a way to adapt and predict on a new
task; all share the model, data, LoRA rank and targets, and the per-task budget
(``eval.test_steps`` steps of ``eval.test_optimizer`` at ``eval.test_lr``, default SGD at
``meta.inner_lr``, on the k-shot support set; the quality benchmark can set them per method):

=================  ==========================  ====================================  ===========
name               prior (theta)               adaptation on the new task            prediction
=================  ==========================  ====================================  ===========
zero_shot          untrained (M = 0)           none                                  mean
lora               untrained (M = 0)           deterministic LoRA (beta 0, 0 samp.)  mean
multitask_lora     ``multitask`` (see below)   deterministic LoRA                    mean
reptile            ``reptile`` (see below)     deterministic LoRA                    mean
bayes_lora         untrained (S = c std(W0))   ABMLL inner loop (beta, n_samples)    eval_samples
abmll              ``abmll`` (meta-trained)    ABMLL inner loop (beta, n_samples)    eval_samples
lora_ensemble      M redrawn inits             deterministic LoRA, each member       M members
lora_mc_dropout    untrained (M = 0)           deterministic LoRA, LoRA dropout      eval_samples
laplace_lora       untrained (M = 0)           deterministic LoRA + diag. Laplace    eval_samples
laplace_lora_lin   untrained (M = 0)           deterministic LoRA + diag. Laplace    eval_samples
                                                                                     (linearised)
=================  ==========================  ====================================  ===========

and temperature scaling of a method's predictive mean (:mod:`abmll.temperature`), its
temperature fitted either on the meta-validation tasks' dev data (``lora_ts``,
``multitask_lora_ts``, ``abmll_ts``: one T per method, never fitted on test tasks; see
``benchmarks/harness.py``) or per task on k-fold splits of the support only
(``lora_ts_support``, ``abmll_ts_support``; ``eval.support_folds``). A calibrated or
ensembled method adapts with the recipe of the entry it builds on (``MethodSpec.recipe``).

The trained priors all come from :class:`abmll.train.MetaTrainer` (same tasks, episodes,
meta-batch size, number of meta-steps, Adam at ``meta.outer_lr``), with the meta-config
changed as :func:`prior_meta_config` says:

- ``abmll``: the meta-config as given (first-order ABMLL, or the exact ``second_order`` rule when asked for).
- ``multitask``: K = 0, no samples, beta = gamma = 0: each meta-step is then a gradient step
  on the mean query NLL over the meta-batch at theta, i.e. one deterministic LoRA trained on
  the union of the meta-train tasks.
- ``reptile``: no samples, beta = gamma = 0, ``outer_update="reptile"``: K deterministic
  LoRA steps on each episode, theta moved towards the adapted weights (Nichol et al. 2018).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from abmll.bayes_lora import BayesLoraModel, Params
from abmll.config import EvalArgs, TaskArgs
from abmll.evaluate import Method
from abmll.gaussian_lora import HyperpriorConfig
from abmll.meta import MetaConfig
from abmll.scoring import ScoringConfig
from abmll.train import CHECKPOINT_DIR, MetaTrainer

PRIOR_KINDS = ("init", "abmll", "multitask", "reptile")
"""How a method's prior is obtained: the untrained init, or meta-trained by one rule."""

ADAPTING_METHOD = {"abmll": "abmll", "multitask": "multitask_lora", "reptile": "reptile"}
"""The registry entry whose recipe adapts each trained prior kind (used to validate it)."""


@dataclass(frozen=True)
class MethodSpec:
    """One method of the benchmark.

    Attributes:
        name: registry name.
        prior: one of :data:`PRIOR_KINDS`.
        adapt: adapt on the support set (``eval.test_steps`` steps; see :func:`make_method`).
        bayesian: adapt with ``meta.beta`` and ``meta.n_samples`` and predict with
            ``eval.eval_samples`` weight samples; False: deterministic LoRA (KL weight 0,
            no samples, the mean pair only) predicting with the posterior mean.
        description: one line for tables.
        recipe: the entry whose adaptation settings (``--adaptation``, tuning) it uses; ""
            is itself.
        ensemble: a deep ensemble of ``eval.ensemble_members`` members.
        mc_dropout: LoRA dropout at ``eval.lora_dropout``, ``eval.eval_samples`` draws.
        laplace: a diagonal Laplace posterior after adapting, ``eval.eval_samples`` draws of
            the network ("sampled") or of the network linearised at the adapted weights
            ("linearised"); "" none.
        calibrate: temperature scaling of the ``recipe`` entry's predictions: "dev" (fitted
            on the meta-validation tasks' dev data) or "support" (per task, on k-fold splits
            of the support); "" none.
    """

    name: str
    prior: str
    adapt: bool
    bayesian: bool
    description: str
    recipe: str = ""
    ensemble: bool = False
    mc_dropout: bool = False
    laplace: str = ""
    calibrate: str = ""

    @property
    def base(self) -> str:
        """The entry whose adaptation settings this one uses."""
        return self.recipe or self.name

    @property
    def samples_draws(self) -> bool:
        """Predicts by averaging ``eval.eval_samples`` stochastic draws."""
        return self.bayesian or self.mc_dropout or self.laplace


METHODS: dict[str, MethodSpec] = {
    s.name: s
    for s in [
        MethodSpec("zero_shot", "init", False, False, "pretrained model, no adaptation"),
        MethodSpec("lora", "init", True, False, "LoRA fine-tuned per task from the pretrained model"),
        MethodSpec(
            "multitask_lora",
            "multitask",
            True,
            False,
            "one LoRA trained on the union of the meta-train tasks, then fine-tuned per task",
        ),
        MethodSpec("reptile", "reptile", True, False, "Reptile on deterministic LoRA, then fine-tuned per task"),
        MethodSpec(
            "bayes_lora", "init", True, True, "Bayesian LoRA without meta-learning: the ABMLL inner loop from the untrained prior"
        ),
        MethodSpec("abmll", "abmll", True, True, "ABMLL: the inner loop from the meta-learned prior"),
        MethodSpec(
            "lora_ts", "init", True, False, "LoRA + a temperature fitted on meta-validation dev data", "lora", calibrate="dev"
        ),
        MethodSpec(
            "multitask_lora_ts",
            "multitask",
            True,
            False,
            "multi-task LoRA + a temperature fitted on meta-validation dev data",
            "multitask_lora",
            calibrate="dev",
        ),
        MethodSpec(
            "abmll_ts", "abmll", True, True, "ABMLL + a temperature fitted on meta-validation dev data", "abmll", calibrate="dev"
        ),
        MethodSpec(
            "lora_ts_support",
            "init",
            True,
            False,
            "LoRA + a temperature fitted per task on k-fold splits of the support",
            "lora",
            calibrate="support",
        ),
        MethodSpec(
            "abmll_ts_support",
            "abmll",
            True,
            True,
            "ABMLL + a temperature fitted per task on k-fold splits of the support",
            "abmll",
            calibrate="support",
        ),
        MethodSpec(
            "lora_ensemble", "init", True, False, "deep ensemble of M LoRAs from independent inits", "lora", ensemble=True
        ),
        MethodSpec(
            "lora_mc_dropout",
            "init",
            True,
            False,
            "LoRA with LoRA dropout, kept on for S prediction draws",
            "lora",
            mc_dropout=True,
        ),
        MethodSpec(
            "laplace_lora",
            "init",
            True,
            False,
            "LoRA + a diagonal Laplace posterior (Laplace-LoRA), S draws of the network",
            "lora",
            laplace="sampled",
        ),
        MethodSpec(
            "laplace_lora_lin",
            "init",
            True,
            False,
            "LoRA + a diagonal Laplace posterior (Laplace-LoRA), S draws of the linearised network",
            "lora",
            laplace="linearised",
        ),
    ]
}
"""The registry: name -> :class:`MethodSpec`."""


def get_spec(name: str) -> MethodSpec:
    """The registry entry ``name``.

    Raises:
        ValueError: unknown name (the message lists the known ones).
    """
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(METHODS)}")
    return METHODS[name]


def prior_meta_config(kind: str, meta: MetaConfig) -> MetaConfig:
    """The meta-training config of prior ``kind`` derived from ABMLL's ``meta`` (same steps,
    meta-batch size, learning rates, inner steps and seed).

    Raises:
        ValueError: ``kind`` is "init" (not trained) or unknown.
    """
    if kind == "abmll":  # first order, or the exact reference when asked for
        return meta if meta.outer_update == "second_order" else replace(meta, outer_update="abmll")
    if kind == "multitask":
        return replace(meta, inner_steps=0, n_samples=0, beta=0.0, gamma=0.0, outer_update="abmll")
    if kind == "reptile":
        return replace(meta, n_samples=0, beta=0.0, gamma=0.0, outer_update="reptile")
    raise ValueError(f"prior kind {kind!r} is not meta-trained (trained kinds: abmll, multitask, reptile)")


def train_prior(
    kind: str,
    model: BayesLoraModel,
    tokenizer,
    train_tasks: list[str],
    tasks: TaskArgs,
    meta: MetaConfig,
    hyper: HyperpriorConfig,
    scoring: ScoringConfig,
    out_dir: str | Path | None = None,
    config: dict | None = None,
    save_every: int = 0,
    on_step: Callable[[dict], None] | None = None,
    validator: Callable[[Params], dict] | None = None,
    validate_every: int = 0,
) -> tuple[Params, list[dict]]:
    """The prior of ``kind``: the untrained init for "init", else meta-trained.

    With ``out_dir``, a finished prior saved there with the same ``config`` is loaded instead
    of retrained, an unfinished run is resumed exactly (:meth:`MetaTrainer.resume`), and the
    prior, its history and the trainer state are saved there. With a ``validator`` (see
    :class:`MetaTrainer`), the prior returned is the one with the lowest validation NLL.

    Returns:
        (theta, history): detached tensors on the model's device, and the per-step logs ([] for init).
    Raises:
        CheckpointError: ``out_dir`` holds a run with a different config.
    """
    if kind == "init":
        return model.init_params(), []
    meta = prior_meta_config(kind, meta)
    trainer = MetaTrainer(
        model, tokenizer, list(train_tasks), tasks, meta, hyper, scoring, validator=validator, validate_every=validate_every
    )
    config = {**(config or {}), "meta": asdict(trainer.meta), "prior_kind": kind}
    if out_dir is not None and (Path(out_dir) / CHECKPOINT_DIR).is_dir():
        trainer.resume(out_dir, config)  # run() below then continues, or returns at once when done
    theta = trainer.run(out_dir, config, save_every, on_step)
    if trainer.best_prior is not None:
        theta = trainer.best_prior
    return theta, trainer.history


def make_method(name: str, prior: Params | Callable[[], Params], ev: EvalArgs, temperature: float | None = None) -> Method:
    """The :class:`abmll.evaluate.Method` of registry entry ``name`` with its ``prior``:
    ``ev.test_steps`` steps of ``ev.test_optimizer`` at ``ev.test_lr`` when it adapts,
    ``ev.eval_samples`` prediction samples when it is Bayesian; deterministic methods adapt
    with beta 0 and 0 samples and predict with the mean (or ``ev.eval_samples`` dropout or
    Laplace draws). ``temperature``: the one a "dev"-calibrated entry applies.

    Raises:
        ValueError: a "dev"-calibrated entry without ``temperature``.
    """
    spec = get_spec(name)
    if spec.calibrate == "dev" and temperature is None:
        raise ValueError(f"{name} needs its temperature, fitted on the meta-validation tasks' dev data")
    steps = ev.test_steps if spec.adapt else 0
    how = dict(
        lr=ev.test_lr,
        optimizer=ev.test_optimizer,
        members=ev.ensemble_members if spec.ensemble else 1,
        dropout=ev.lora_dropout if spec.mc_dropout else 0.0,
        laplace=spec.laplace,
        temperature=temperature,
        support_folds=ev.support_folds if spec.calibrate == "support" else 0,
        base=spec.base if spec.calibrate else "",
    )
    if spec.bayesian:
        return Method(name, prior, steps, ev.eval_samples, **how)
    return Method(name, prior, steps, ev.eval_samples if spec.samples_draws else 0, beta=0.0, adapt_samples=0, **how)


def prior_kinds(names: list[str]) -> list[str]:
    """The distinct prior kinds ``names`` need, in registry order of first use."""
    kinds: list[str] = []
    for n in names:
        k = get_spec(n).prior
        if k not in kinds:
            kinds.append(k)
    return kinds
