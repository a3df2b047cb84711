"""Evaluation on held-out tasks: adapt from a prior on each task's support set, predict its
test set, and report accuracy, macro-F1, ECE, NLL and Brier per task and seed, and their
means (method doc, "Prediction and metrics").
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from abmll.bayes_lora import BayesLoraModel, Params
from abmll.config import EvalArgs, TaskArgs
from abmll.meta import MetaConfig, NonFiniteLossError, adapt, predict_batches
from abmll.metrics import compute_metrics
from abmll.scoring import ScoringConfig
from abmll.train import episode_batches


@dataclass
class Method:
    """How a prediction is made on a new task: adapt ``steps`` SGD steps from ``prior`` on the
    support set (0: no adaptation), then average ``samples`` weight samples (0: posterior mean).
    Zero-shot is ``Method("zero_shot", model.init_params(), steps=0, samples=0)``."""

    name: str
    prior: Params
    steps: int
    samples: int


def evaluate(
    model: BayesLoraModel, tokenizer, methods: Sequence[Method], task_names: Sequence[str],
    seeds: Sequence[int], tasks: TaskArgs, scoring: ScoringConfig, meta: MetaConfig, eval_args: EvalArgs,
    on_result: Callable[[str, str, int, dict], None] | None = None,
) -> dict:
    """Run every method on every (task, seed): support = the task's k-shot train file of that
    seed, query = up to ``eval_args.max_test`` examples of its test split.

    Returns:
        ``{"tasks", "seeds", "methods": {name: {"per_task": {task: {"seeds": {seed: metrics},
        "mean": metrics}}, "mean": metrics averaged over tasks (each task's mean over seeds),
        "std_over_seeds": metric -> std over seeds of the task-averaged metric}}}``.
        ``on_result(method, task, seed, metrics)`` is called as each result is ready.
    """
    per = {m.name: {t: {} for t in task_names} for m in methods}
    for task in task_names:
        for seed in seeds:
            torch.manual_seed(seed)
            ep = episode_batches(model, tokenizer, task, seed, tasks, scoring, "test", eval_args.max_test)
            for m in methods:
                posterior = m.prior
                if m.steps:
                    try:
                        posterior, _ = adapt(model, m.prior, ep.support, m.steps, meta.inner_lr, meta.beta,
                                             meta.n_samples)
                    except NonFiniteLossError as err:
                        raise NonFiniteLossError(f"{m.name} on task {task}, seed {seed}: {err}") from err
                probs, labels = predict_batches(model, posterior, ep.query, m.samples)
                metrics = compute_metrics(probs, labels)
                per[m.name][task][seed] = metrics
                if on_result:
                    on_result(m.name, task, seed, metrics)
    return {"tasks": list(task_names), "seeds": list(seeds),
            "methods": {name: summarise(results) for name, results in per.items()}}


def _mean(dicts: Sequence[dict]) -> dict:
    return {k: statistics.fmean(d[k] for d in dicts) for k in dicts[0]}


def summarise(per_task: dict[str, dict[int, dict]]) -> dict:
    """Means over seeds per task, the mean over tasks, and the std over seeds of task means."""
    tasks = list(per_task)
    seeds = list(per_task[tasks[0]])
    out = {"per_task": {t: {"seeds": per_task[t], "mean": _mean(list(per_task[t].values()))} for t in tasks}}
    out["mean"] = _mean([out["per_task"][t]["mean"] for t in tasks])
    by_seed = [_mean([per_task[t][s] for t in tasks]) for s in seeds]
    out["std_over_seeds"] = {k: statistics.pstdev(d[k] for d in by_seed) for k in by_seed[0]}
    return out
