"""Evaluation on held-out tasks: adapt from a prior on each task's support set, predict its
test set, and report accuracy, macro-F1, ECE, NLL and Brier per task and seed, and their
means (docs/method.md, "Prediction and metrics").

Every method runs through :func:`run_method` with the same per-task budget (``steps`` SGD
steps at ``meta.inner_lr``); methods differ only in the prior they start from, the inner-loop
KL weight and weight samples (deterministic LoRA: 0 and 0), and the prediction samples.
The baselines of docs/method.md are built by :mod:`abmll.methods`.
"""

from __future__ import annotations

import math
import statistics
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial

import torch
from torch import Tensor

from abmll.bayes_lora import BayesLoraModel, Params
from abmll.config import EvalArgs, TaskArgs
from abmll.episodes import episode_batches
from abmll.laplace import ggn_diagonal, laplace_draw, laplace_offset, linearised_scores, posterior_std, prior_precision
from abmll.mc_dropout import lora_dropout
from abmll.meta import MetaConfig, NonFiniteLossError, TaskBatches, adapt, predict_samples
from abmll.metrics import compute_metrics
from abmll.plots import pool_predictions
from abmll.scoring import ScoringConfig, merge_truncation, truncation_summary
from abmll.temperature import apply_temperature, fit_temperature
from abmll.uncertainty import decompose

UNCERTAINTY_PARTS = ("total", "aleatoric", "epistemic")
"""The parts of :func:`abmll.uncertainty.decompose` averaged into every result's metrics."""


@dataclass
class Method:
    """How a prediction is made on a new task: adapt ``steps`` SGD steps from ``prior`` on the
    support set (0: no adaptation), then average ``samples`` weight samples (0: posterior mean).
    Zero-shot is ``Method("zero_shot", model.init_params(), steps=0, samples=0)``.

    Attributes:
        beta: KL weight of the adaptation loss; None: ``meta.beta``. 0 with
            ``adapt_samples`` = 0 is plain deterministic LoRA fine-tuning of the mean pair.
        adapt_samples: weight samples per adaptation step; None: ``meta.n_samples``.
        lr: adaptation learning rate; None: ``meta.inner_lr``.
        optimizer: "sgd" or "adamw" (see :func:`abmll.meta.adapt`).
        members: deep ensemble: adapt this many members, member m from ``prior`` with its
            mean pair's A matrices redrawn (:func:`member_prior`), and pool their draws.
        dropout: MC dropout: LoRA dropout of this rate on the input of every LoRA path
            (:func:`abmll.mc_dropout.lora_dropout`) during adaptation and prediction, which
            averages ``samples`` dropout draws (0: off).
        laplace: Laplace-LoRA: after adapting, a diagonal Laplace posterior over the mean
            pair (:mod:`abmll.laplace`), predicting with ``samples`` draws from it of the
            network ("sampled") or of the network linearised at the adapted weights
            ("linearised"); "" off.
        temperature: divide the log predictive mean by this (:mod:`abmll.temperature`).
        support_folds: fit that temperature per task on the support only: adapt on each of
            this many k-fold splits of the support (the episode's ``folds``), predict its
            held-out fold, fit T on the pooled held-out predictions (0: off).
        base: a tempered method's untempered twin: when a method of that name runs on the same
            episode in the same :func:`evaluate`, its predictions are tempered instead of
            adapting again (the same result: each method is seeded alike).

    ``prior`` may also be a function returning the tensors, called when the method first
    runs (a benchmark trains a prior only when a result needs it).
    """

    name: str
    prior: Params
    steps: int
    samples: int
    beta: float | None = None
    adapt_samples: int | None = None
    lr: float | None = None
    optimizer: str = "sgd"
    members: int = 1
    dropout: float = 0.0
    laplace: str = ""
    temperature: float | None = None
    support_folds: int = 0
    base: str = ""


@dataclass
class Result:
    """One method's result on one (task, seed): :func:`run_method`'s metrics, probs (N, C) and
    labels (N,), and the seconds it took (a tempered one: its base's seconds included)."""

    metrics: dict
    probs: Tensor
    labels: Tensor
    seconds: float = 0.0


def run_method(
    model: BayesLoraModel, method: Method, episode: TaskBatches, meta: MetaConfig, seed: int
) -> tuple[dict, Tensor, Tensor]:
    """One method on one episode: ``torch.manual_seed(seed)``, adapt (``method.steps`` steps at
    ``meta.inner_lr``) on the support set, predict the query set.

    Seeding per method makes a result independent of which other methods ran before it (so a
    benchmark can resume), and gives every stochastic method the same noise draws.

    Returns:
        (metrics, probs (N, C), labels (N,)): :func:`abmll.metrics.compute_metrics` plus the
        mean over the query examples of each part of the uncertainty (``mean_total``,
        ``mean_aleatoric``, ``mean_epistemic``, nats; :func:`abmll.uncertainty.decompose`, of
        the draws before any temperature), the temperature when one is applied, and the
        predictive probabilities (the mean over draws, then tempered).
    Raises:
        NonFiniteLossError: naming the method and the task.
        ValueError: ``method.support_folds`` but the episode has no folds.
    """
    samples, labels = predict_method(model, method, episode, meta, seed)
    probs = samples.mean(0)
    temperature = support_temperature(model, method, episode, meta, seed) if method.support_folds else method.temperature
    if temperature is not None:
        probs = apply_temperature(probs, temperature)
    parts = decompose(samples)
    metrics = compute_metrics(probs, labels)
    metrics.update({f"mean_{kind}": float(parts[kind].mean()) for kind in UNCERTAINTY_PARTS})
    if temperature is not None:
        metrics["temperature"] = temperature
    return metrics, probs, labels


def predict_method(
    model: BayesLoraModel, method: Method, episode: TaskBatches, meta: MetaConfig, seed: int
) -> tuple[Tensor, Tensor]:
    """``method``'s adaptation(s) on the episode's support and its draws on the query, before
    any temperature: (samples (D, N, C), labels (N,)), D = members x max(samples, 1)."""
    draws = []
    with lora_dropout(model, method.dropout):
        for m in range(method.members):
            start = member_prior(model, method.prior, m)
            posterior = adapt_method(model, replace(method, prior=start), episode, meta, seed)
            draw = draw_scores = None
            if method.laplace:
                std = laplace_std(model, posterior, episode.support, start)
                if method.laplace == "linearised":
                    draw_scores = partial(linearised_predictive, model, posterior, std)
                else:
                    draw = partial(laplace_draw, posterior, std)
            elif method.dropout or method.adapt_samples == 0:  # deterministic LoRA: no weight noise
                draw = lambda posterior=posterior: posterior  # noqa: E731 (dropout draws differ by their masks)
            samples, labels = predict_samples(model, posterior, episode.query, method.samples, draw, draw_scores)
            draws.append(samples)
    width = max(d.shape[-1] for d in draws)
    return torch.cat([torch.nn.functional.pad(d, (0, width - d.shape[-1])) for d in draws]), labels


def member_prior(model: BayesLoraModel, prior: Params, member: int) -> Params:
    """Deep-ensemble member ``member``'s starting point: ``prior`` itself for member 0, else
    ``prior`` with each mean-pair A matrix redrawn as peft draws it (Kaiming-uniform, bound
    1 / sqrt(d_in)) from ``torch.Generator().manual_seed(lora.init_seed + member)``. B is
    untouched, so with B = 0 (an untrained prior) every member starts from the same function."""
    if member == 0:
        return prior
    generator = torch.Generator().manual_seed(model.config.init_seed + member)
    out = dict(prior)
    for layer in model.layers:
        a = prior[layer.mean_A]
        fresh = torch.nn.init.kaiming_uniform_(torch.empty(a.shape), a=math.sqrt(5), generator=generator)
        out[layer.mean_A] = fresh.to(dtype=a.dtype, device=a.device)
    return out


def laplace_std(model: BayesLoraModel, posterior: Params, support, start: Params) -> Params:
    """The std of each mean-pair weight under the diagonal Laplace posterior at ``posterior``,
    fitted on the ``support`` batches, its isotropic prior centred at ``start`` (where the
    adaptation began) with the precision chosen by marginal likelihood (:mod:`abmll.laplace`)."""
    fisher = ggn_diagonal(model, posterior, support, model.mean_keys())
    return posterior_std(fisher, prior_precision(fisher, posterior, start))


def linearised_predictive(model: BayesLoraModel, posterior: Params, std: Params, batch, draws: int) -> Tensor:
    """(draws, N, C_max) option scores of ``batch`` under the linearised Laplace predictive:
    :func:`abmll.laplace.linearised_scores` at ``draws`` offsets drawn with ``std``."""
    return linearised_scores(model, posterior, batch, [laplace_offset(posterior, std) for _ in range(draws)])


def support_temperature(model: BayesLoraModel, method: Method, episode: TaskBatches, meta: MetaConfig, seed: int) -> float:
    """The temperature of ``method`` fitted on its support only: ``method`` (without a
    temperature) adapted on the rest of the support and predicting each held-out fold of
    ``episode.folds``, T fitted on the pooled held-out predictions (:func:`fit_temperature`).

    Raises:
        ValueError: the episode has no folds (build it with ``folds``).
    """
    if not episode.folds:
        raise ValueError(
            f"{method.name}: a temperature fitted on the support needs the episode's k-fold splits "
            f"(episode_batches(..., folds={method.support_folds}))"
        )
    plain = replace(method, support_folds=0, temperature=None)
    held_out = []
    for fold in episode.folds:
        samples, fold_labels = predict_method(model, plain, fold, meta, seed)
        held_out.append((samples.mean(0), fold_labels))
    return fit_temperature(*pool_predictions(held_out))


def adapt_method(model: BayesLoraModel, method: Method, episode: TaskBatches, meta: MetaConfig, seed: int) -> Params:
    """``torch.manual_seed(seed)``, then ``method``'s adaptation on the episode's support set
    (``method.steps`` steps of ``method.optimizer`` at ``method.lr``, default ``meta.inner_lr``;
    its prior as it is when ``method.steps`` is 0). Returns the posterior tensors.

    Raises:
        NonFiniteLossError: naming the method and the task.
    """
    torch.manual_seed(seed)
    if not method.steps:
        return method.prior
    beta = meta.beta if method.beta is None else method.beta
    n_samples = meta.n_samples if method.adapt_samples is None else method.adapt_samples
    lr = meta.adaptation_lr(method.lr)
    try:
        posterior, _ = adapt(
            model, method.prior, episode.support, method.steps, lr, beta, n_samples, meta.inner_grad_clip, method.optimizer
        )
    except NonFiniteLossError as err:
        raise NonFiniteLossError(f"{method.name} on task {episode.task}, seed {seed}: {err}") from err
    return posterior


def evaluate(
    model: BayesLoraModel,
    tokenizer,
    methods: Sequence[Method],
    task_names: Sequence[str],
    seeds: Sequence[int],
    tasks: TaskArgs,
    scoring: ScoringConfig,
    meta: MetaConfig,
    eval_args: EvalArgs,
    on_result: Callable[[str, str, int, Result, bool], None] | None = None,
    query_split: str = "test",
    done: Mapping[tuple[str, str, int], Result] | None = None,
) -> dict:
    """Run every method on every (task, seed): support = the task's k-shot train file of that
    seed, query = up to ``eval_args.max_test`` examples of its ``query_split`` split ("test";
    "dev" for tuning on dev data), each method seeded with ``seed`` (see :func:`run_method`).
    The one evaluation loop: the CLI and the benchmarks (a cache around it) both run it.

    Returns:
        ``{"tasks", "seeds", "methods": {name: {"per_task": {task: {"seeds": {seed: metrics},
        "mean": metrics}}, "mean": metrics averaged over tasks (each task's mean over seeds),
        "std_over_seeds": metric -> std over seeds of the task-averaged metric}}}``.
        ``on_result(method, task, seed, result, cached)`` is called as each :class:`Result`
        is ready (e.g. to save it, or pool predictions for reliability diagrams). ``done``
        maps (method, task, seed) to results already computed (read back after an interrupt,
        or a benchmark's cache): they are reported through ``on_result`` with ``cached``
        True, not run again. ``"truncation"``: per task, :func:`abmll.scoring.merge_truncation`
        of its support and test examples over the seeds (how many inputs were cut to
        ``max_length``, by how much); a task with cut inputs is also warned about
        (UserWarning), once.
    Raises:
        NonFiniteLossError: naming the method and the task.
    """
    per = {m.name: {t: {} for t in task_names} for m in methods}
    truncation = {}
    for task in task_names:
        summaries = []
        for seed in seeds:
            folds = max(m.support_folds for m in methods)
            ep = episode_batches(model, tokenizer, task, seed, tasks, scoring, query_split, eval_args.max_test, folds)
            summaries.append(truncation_summary([*ep.support, *ep.query]))
            ran: dict[str, Result] = {}
            for m in methods:
                cached = done is not None and (m.name, task, seed) in done
                result = done[m.name, task, seed] if cached else _run(model, m, ep, meta, seed, ran.get(m.base))
                ran[m.name] = result
                per[m.name][task][seed] = result.metrics
                if on_result:
                    on_result(m.name, task, seed, result, cached)
        truncation[task] = merge_truncation(summaries)
        warn_truncated(task, truncation[task], scoring.max_length)
    return {
        "tasks": list(task_names),
        "seeds": list(seeds),
        "methods": {name: summarise(results) for name, results in per.items()},
        "truncation": truncation,
    }


def _run(model: BayesLoraModel, method: Method, episode: TaskBatches, meta: MetaConfig, seed: int, base: Result | None):
    """``method`` on the episode, its prior resolved; a tempered method with its ``base``'s
    result at hand tempers those predictions (run_method's result, without adapting again)."""
    start = time.perf_counter()
    if callable(method.prior):
        method = replace(method, prior=method.prior())
    if base is None or (method.temperature is None and not method.support_folds):
        return Result(*run_method(model, method, episode, meta, seed), time.perf_counter() - start)
    t = support_temperature(model, method, episode, meta, seed) if method.support_folds else method.temperature
    probs = apply_temperature(base.probs, t)
    metrics = {**base.metrics, **compute_metrics(probs, base.labels), "temperature": t}
    return Result(metrics, probs, base.labels, time.perf_counter() - start + base.seconds)


def warn_truncated(name: str, summary: dict, max_length: int) -> None:
    """A UserWarning saying how many inputs of ``name`` (a task or file) were cut and by how
    much (see :func:`abmll.scoring.truncation_summary`); nothing when none was."""
    if summary["truncated"]:
        warnings.warn(
            f"{name}: {summary['truncated']} of {summary['examples']} inputs cut from the left to fit "
            f"max_length={max_length} tokens (on average {summary['mean_dropped_fraction']:.0%} of each "
            f"cut input dropped, at most {summary['max_dropped_fraction']:.0%}); raise --max_length to "
            "keep more",
            UserWarning,
            stacklevel=2,
        )


def _mean(dicts: Sequence[dict]) -> dict:
    return {k: statistics.fmean(d[k] for d in dicts) for k in dicts[0]}


def summarise(per_task: dict[str, dict[int, dict]]) -> dict:
    """Means over seeds per task, the mean over tasks, and the std over seeds of task means.

    Every task must have a result for the same seeds (the first task's)."""
    tasks = list(per_task)
    seeds = list(per_task[tasks[0]])
    out = {"per_task": {t: {"seeds": per_task[t], "mean": _mean(list(per_task[t].values()))} for t in tasks}}
    out["mean"] = _mean([out["per_task"][t]["mean"] for t in tasks])
    by_seed = [_mean([per_task[t][s] for t in tasks]) for s in seeds]
    out["std_over_seeds"] = {k: statistics.pstdev(d[k] for d in by_seed) for k in by_seed[0]}
    return out


def evaluate_with_predictions(
    model, tokenizer, methods, task_names_, seeds, tasks, scoring, meta, ev, on_result=None, done=None
) -> tuple[dict, dict]:
    """:func:`abmll.evaluate.evaluate`, also keeping each run's predictions: returns (results,
    {method: [(probs (N, C), labels (N,)), ...]}) for the pooled reliability diagrams.
    Raises what ``evaluate`` raises."""
    predictions = {m.name: [] for m in methods}

    def keep(method, task, seed, result, cached):
        predictions[method].append((result.probs, result.labels))
        if on_result is not None:
            on_result(method, task, seed, result, cached)

    results = evaluate(model, tokenizer, methods, task_names_, seeds, tasks, scoring, meta, ev, on_result=keep, done=done)
    return results, predictions


def format_table(results: dict) -> str:
    """Per task (mean over seeds): accuracy, macro-F1, ECE and NLL of every method, then the
    task mean. Macro-F1 beside accuracy shows collapse to the majority class (accuracy at the
    majority rate, macro-F1 near 1 / C)."""
    methods = list(results["methods"])
    head = f"{'task':28s}" + "".join(f" | {m + ' acc':>14s} {'F1':>5s} {'ECE':>5s} {'NLL':>5s}" for m in methods)
    lines = [head, "-" * len(head)]
    rows = [(t, {m: results["methods"][m]["per_task"][t]["mean"] for m in methods}) for t in results["tasks"]]
    rows.append(("mean over tasks", {m: results["methods"][m]["mean"] for m in methods}))
    for name, by_method in rows:
        lines.append(
            f"{name:28s}"
            + "".join(
                f" | {r['accuracy']:14.3f} {r['macro_f1']:5.3f} {r['ece']:5.3f} {r['nll']:5.3f}" for r in by_method.values()
            )
        )
    return "\n".join(lines)
