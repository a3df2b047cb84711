"""Meta-validation: score a prior on tasks that are neither meta-trained on nor test tasks.

Each validation episode is a held-out *train* task of the split at one data seed: support = its
k-shot train file, query = its dev file (at most ``max_query`` examples). A prior is scored as
it would be used on a new task: adapted on the support set by the method's recipe
(:func:`abmll.evaluate.run_method`), then its query predictions give NLL, ECE, accuracy,
macro-F1 and Brier. The meta-trainer calls it every ``validate_every`` meta-steps to draw the
learning curve and keep the best prior (:class:`abmll.train.MetaTrainer`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from abmll.bayes_lora import BayesLoraModel, Params
from abmll.config import EvalArgs, TaskArgs
from abmll.episodes import episode_batches
from abmll.evaluate import run_method
from abmll.meta import MetaConfig, TaskBatches
from abmll.methods import make_method
from abmll.scoring import ScoringConfig

VAL_METRICS = ("nll", "ece", "accuracy", "macro_f1", "brier")


@dataclass
class Validator:
    """Scores priors on fixed, pre-tokenised validation episodes.

    Attributes:
        model: the Bayesian-LoRA model the priors belong to.
        episodes: (episode, data seed) pairs; the seed also seeds the weight noise of the
            episode's adaptation and prediction, so two calls on one prior agree exactly.
        meta: inner-loop settings (inner_lr, beta, n_samples, inner_grad_clip) of adaptation.
        eval: test_steps and eval_samples of adaptation and prediction.
        method: the registry entry (:data:`abmll.methods.METHODS`) whose recipe adapts the
            prior: "abmll" for an ABMLL prior, "multitask_lora" / "reptile" for theirs.
    """

    model: BayesLoraModel
    episodes: list[tuple[TaskBatches, int]]
    meta: MetaConfig
    eval: EvalArgs
    method: str = "abmll"

    def __call__(self, theta: Params) -> dict[str, float]:
        """Mean of each of :data:`VAL_METRICS` over the episodes (unweighted; NLL in nats).

        Raises:
            abmll.meta.NonFiniteLossError: adaptation diverged (names the task and seed).
        """
        method = make_method(self.method, {k: v.detach() for k, v in theta.items()}, self.eval)
        rows = [run_method(self.model, method, ep, self.meta, seed)[0] for ep, seed in self.episodes]
        return {m: sum(r[m] for r in rows) / len(rows) for m in VAL_METRICS}


def make_validator(
    model: BayesLoraModel,
    tokenizer,
    val_tasks: Sequence[str],
    seeds: Sequence[int],
    tasks: TaskArgs,
    scoring: ScoringConfig,
    meta: MetaConfig,
    ev: EvalArgs,
    method: str = "abmll",
) -> Validator:
    """A :class:`Validator` on every (task, seed) of ``val_tasks`` x ``seeds``: support = the
    k-shot train file, query = the dev file (at most ``tasks.max_query`` examples).

    Raises:
        ValueError: no validation task or seed.
        abmll.data.DataError: a missing or malformed task file (the message names it).
    """
    if not val_tasks or not seeds:
        raise ValueError("meta-validation needs at least one task and one data seed")
    episodes = [
        (episode_batches(model, tokenizer, t, s, tasks, scoring, "dev", tasks.max_query), s) for t in val_tasks for s in seeds
    ]
    return Validator(model, episodes, meta, ev, method)
