"""ABMLL inner loop (amortised inference), first-order outer loop, and prediction.

Method doc sections "Amortised inference", "Meta-objective" and "Prediction and metrics"
(Zhang, Snell & Griffiths 2025, arXiv 2508.14285; Ravi & Beatson 2019).

    inner:  lambda^(0) = theta;  lambda^(k+1) = lambda^(k) - lr_in * grad L_S(lambda^(k)),
            L_S(lambda) = NLL(support; lambda) + beta * KL(q_lambda || p_theta), theta fixed.
    outer:  L(theta) = 1/B sum_i [NLL(query_i; lambda_i^(K)) + beta * KL(q_lambda_i^(K) || p_theta)]
                       + gamma * (-log p(theta)),
            first-order: d lambda^(K) / d theta is taken as the identity (straight-through).

Every adapter set (theta, lambda) is a flat dict of tensors (see :mod:`abmll.bayes_lora`).
Each inner step builds and frees its own graph, and the straight-through gradient is the
gradient at lambda^(K) added to theta's, so memory does not grow with K.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from abmll.bayes_lora import BayesLoraModel, Params
from abmll.checks import at_least, one_of, seeds
from abmll.gaussian_lora import HyperpriorConfig
from abmll.roles import OUTER, setting
from abmll.scoring import OptionBatch, option_nll, option_scores, training_loss


@dataclass
class MetaConfig:
    """Hyperparameters of the inner and outer loops.

    Attributes:
        inner_steps: K, SGD steps from the prior on the support set (meta-training).
        inner_lr: SGD learning rate of the inner loop (and of test-time SGD unless --test_lr).
        outer_lr: Adam learning rate on theta.
        beta: weight of KL(q || p_theta), a sum over all weight entries (nats).
        gamma: weight of the hyperprior -log p(theta), a sum over all weight entries (nats).
        n_samples: Monte Carlo weight samples per loss evaluation in training; 0 = posterior mean.
        meta_batch_size: B, tasks per meta-step.
        meta_steps: number of outer steps.
        seed: seeds task sampling and weight noise.
        outer_update: "abmll" (the meta-gradient above) or "reptile" (first-order Reptile,
            Nichol et al. 2018: K inner steps on the episode's support and query sets, then
            the pseudo-gradient theta - lambda^(K) is given to the optimizer, so SGD(lr=eps)
            does theta <- theta + eps * (lambda^(K) - theta)); or "second_order" (the exact
            ABML meta-gradient through the K inner steps: a reference for small models, its
            memory grows with K); see :func:`meta_step`.
        inner_grad_clip: clip the global norm of each inner-loop (and test-time) gradient to
            this value (0: plain SGD). Not in the paper: without it SGD at a useful learning
            rate diverges on tasks where the pretrained model is confidently wrong (seen on
            tweet_eval-hate, zero-shot NLL 4.6, support NLL 6.5 -> 16 in 4 steps at lr 0.3).
        outer_warmup_steps: linear warm-up of the outer learning rate: meta-step t (counted
            from 0) uses outer_lr * min(1, (t + 1) / outer_warmup_steps); 0: constant outer_lr.
        outer_grad_clip: clip the global L2 norm of theta's meta-gradient (the meta-batch
            mean, with the hyperprior term) to this value before the Adam step (0: no
            clipping); the norm before clipping is logged as meta_grad_norm.
    """

    inner_steps: int = setting(3, role=OUTER)
    inner_lr: float = 0.5
    outer_lr: float = setting(2e-3, role=OUTER)
    beta: float = 1e-6
    gamma: float = setting(1e-9, role=OUTER)
    n_samples: int = 1
    meta_batch_size: int = setting(2, role=OUTER)
    meta_steps: int = setting(20, role=OUTER, resumable=True)
    seed: int = 0
    outer_update: Literal["abmll", "reptile", "second_order"] = setting("abmll", role=OUTER)
    inner_grad_clip: float = 1.0
    outer_warmup_steps: int = setting(0, role=OUTER, added=True)
    outer_grad_clip: float = setting(0.0, role=OUTER, added=True)

    def __post_init__(self) -> None:
        one_of(self, "outer_update", OUTER_UPDATES)
        at_least(self, ("inner_steps", "n_samples", "meta_steps", "outer_warmup_steps"), 0)
        seeds(self, ("seed",))
        at_least(self, ("meta_batch_size",), 1)
        at_least(self, ("inner_lr", "outer_lr", "beta", "gamma", "inner_grad_clip", "outer_grad_clip"), 0)

    def adaptation_lr(self, lr: float | None) -> float:
        """The learning rate of a test-time adaptation given ``lr`` (e.g. ``--test_lr``):
        ``lr``, else the inner loop's ``inner_lr`` (the one place this fallback lives)."""
        return self.inner_lr if lr is None else lr


def outer_lr_at(config: MetaConfig, step: int) -> float:
    """The outer learning rate of meta-step ``step`` (counted from 0): ``outer_lr`` times
    min(1, (step + 1) / outer_warmup_steps), or ``outer_lr`` without warm-up."""
    if config.outer_warmup_steps == 0:
        return config.outer_lr
    return config.outer_lr * min(1.0, (step + 1) / config.outer_warmup_steps)


class NonFiniteLossError(FloatingPointError):
    """A loss or gradient is NaN/inf; the message names the meta-step and the tasks."""


@dataclass
class TaskBatches:
    """One task's pre-tokenised support and query sets (lists of :class:`OptionBatch`).

    ``noise_seed``: when set, :func:`meta_step` seeds torch's RNG with it before this task, so
    the task's weight noise does not depend on the tasks before it or on which process runs it.
    ``folds``: the support's k-fold splits, each a TaskBatches whose support is the rest of the
    support and whose query is the fold (for a temperature fitted on the support only;
    :func:`abmll.episodes.episode_batches`); empty unless asked for.
    """

    task: str
    support: list[OptionBatch]
    query: list[OptionBatch]
    noise_seed: int | None = None
    folds: list[TaskBatches] = field(default_factory=list)


def _logits_fn(model: BayesLoraModel, params: Params, sample: bool):
    return lambda groups=None, **kw: model(params, sample=sample, groups=groups, **kw).logits


def nll_backward(
    model: BayesLoraModel,
    params: Params,
    batches: Sequence[OptionBatch],
    n_samples: int,
    weight: float = 1.0,
) -> float:
    """Mean NLL (the batches' :func:`abmll.scoring.training_loss`) over all examples of
    ``batches`` (and over ``n_samples`` weight samples; 0 = posterior mean); ``weight`` times
    it is back-propagated batch by batch into the ``.grad`` of the leaves of ``params``, so
    only one batch's graph is alive at a time.
    Returns the (unweighted) NLL in nats."""
    n_examples = sum(b.num_examples for b in batches)
    draws = max(n_samples, 1)
    total = 0.0
    for batch in batches:
        for _ in range(draws):
            scores = option_scores(_logits_fn(model, params, n_samples > 0), batch)
            loss = training_loss(scores, batch).sum() / (n_examples * draws)
            (weight * loss).backward()
            total += loss.item()
    return total


@torch.no_grad()
def mean_nll(model: BayesLoraModel, params: Params, batches: Sequence[OptionBatch], n_samples: int = 0) -> float:
    """Mean NLL (nats) of ``batches`` without gradients; ``n_samples`` = 0: posterior mean."""
    probs, labels = predict_batches(model, params, batches, n_samples)
    return option_nll(probs.clamp_min(1e-30).log(), labels).mean().item()


ADAPT_OPTIMIZERS = ("sgd", "adamw")
"""Optimisers of :func:`adapt` (test-time adaptation; the meta-training inner loop is SGD)."""


def _leaves(params: Params) -> Params:
    return {k: v.detach().clone().requires_grad_() for k, v in params.items()}


def adapt(
    model: BayesLoraModel,
    prior: Params,
    support: Sequence[OptionBatch],
    steps: int,
    lr: float,
    beta: float,
    n_samples: int = 1,
    grad_clip: float = 0.0,
    optimizer: str = "sgd",
) -> tuple[Params, list[float]]:
    """Amortised inference: ``steps`` SGD steps on NLL(support) + beta * KL(q || prior),
    starting from the prior, prior held fixed (docs/method.md, "Amortised inference").
    ``optimizer="adamw"`` takes AdamW steps instead (test-time adaptation as LoRA users run
    it; meta-training's inner loop is SGD).

    Args:
        prior: flat dict of the prior's adapter tensors (theta); not modified.
        support: tokenised support set, on the model's device.
        steps: number of optimiser steps (K, or K_test at test time); 0 returns the prior.
        lr: learning rate (inner_lr, or the test-time one).
        beta: weight of KL(q || prior), a sum over all weight entries in nats (0: no KL).
        n_samples: weight samples per step (0: posterior mean, i.e. deterministic LoRA).
        grad_clip: clip each step's gradient to this global L2 norm (0: no clipping).
        optimizer: one of :data:`ADAPT_OPTIMIZERS`: "sgd" (plain SGD, the method's inner
            loop) or "adamw" (``torch.optim.AdamW`` with its default betas and eps and no
            weight decay, the default of Hugging Face's Trainer; fresh state per call).
    Returns:
        (posterior, support_nll): the posterior's detached tensors lambda^(K), and the
        support NLL at each step's start (nats, ``steps`` values).
    Raises:
        NonFiniteLossError: the support loss or the adapted tensors became NaN/inf.
        ValueError: unknown ``optimizer``.
    """
    if optimizer not in ADAPT_OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(ADAPT_OPTIMIZERS)}; got {optimizer!r}")
    prior = {k: v.detach() for k, v in prior.items()}
    lam = _leaves(prior)
    # an entry the loss does not reach (the scale pair of deterministic LoRA: n_samples = 0
    # and beta = 0) has no gradient, and both optimisers leave it where it is
    adamw = torch.optim.AdamW(lam.values(), lr, weight_decay=0.0) if optimizer == "adamw" else None
    history = []
    for step in range(steps):
        nll = nll_backward(model, lam, support, n_samples)
        kl = model.kl(lam, prior) if beta else None
        if kl is not None:
            (beta * kl).backward()
        _check_finite(f"inner step {step}", ("support NLL", nll), ("KL(q || prior)", kl))
        history.append(nll)
        if grad_clip:
            torch.nn.utils.clip_grad_norm_([v for v in lam.values() if v.grad is not None], grad_clip)
        if adamw is not None:
            adamw.step()
            adamw.zero_grad(set_to_none=True)
            continue
        with torch.no_grad():  # SGD written out (lambda - lr * grad: torch.optim.SGD's fused add rounds differently)
            lam = {k: (v if v.grad is None else v - lr * v.grad).detach().requires_grad_() for k, v in lam.items()}
    bad = [k for k, v in lam.items() if not torch.isfinite(v).all()]
    if bad:
        raise NonFiniteLossError(f"adaptation diverged after {steps} steps (lr {lr}): non-finite {bad[0]}")
    return {k: v.detach() for k, v in lam.items()}, history


def _check_finite(where: str, *terms: tuple[str, float | Tensor | None]) -> None:
    """Raises NonFiniteLossError naming ``where`` and the first of ``terms`` ((name, value);
    None values skipped) that is NaN or infinite, so a stopped run says which loss term broke."""
    for name, value in terms:
        value = value.detach() if isinstance(value, Tensor) else value
        if value is not None and not math.isfinite(float(value)):
            raise NonFiniteLossError(f"{where}: {name} {float(value)} (not finite)")


def meta_step(
    model: BayesLoraModel,
    theta: Params,
    optimizer: torch.optim.Optimizer,
    tasks: Sequence[TaskBatches],
    config: MetaConfig,
    hyper: HyperpriorConfig,
    step: int = 0,
    *,
    total_tasks: int | None = None,
    reduce: Callable[[Params, dict], dict] | None = None,
    log_support_after: bool = False,
) -> dict[str, float]:
    """One ABMLL outer step on a meta-batch (docs/method.md, "Meta-objective"), each task's
    share by the rule ``config.outer_update`` (:data:`OUTER_UPDATES`).

    The first-order rule ("abmll"), for each task: lambda^(K) = adapt(theta, support); then the query objective
    NLL(query; lambda) + beta * KL(q_lambda || p_theta) is differentiated at lambda = lambda^(K)
    and at theta (through p_theta); the lambda-gradient is added to theta's gradient
    (straight-through). Then gamma * (-log p(theta)) is added, the meta-gradient is clipped to
    ``config.outer_grad_clip`` (when set) and the optimizer steps (at :func:`outer_lr_at` when
    ``config.outer_warmup_steps`` is set).

    Args:
        theta: leaf tensors with requires_grad, updated in place by ``optimizer``.
        total_tasks: B of the 1/B weights (default ``len(tasks)``); a process that runs its
            share of a larger meta-batch passes that meta-batch's size.
        reduce: called as ``logs = reduce(theta, logs)`` once the tasks' gradients (in
            ``theta[k].grad``, None when ``tasks`` is empty) and logs (sums of per-task values
            times 1/B) are accumulated, before the hyperprior term, the finiteness check, the
            meta-gradient clipping and the optimizer step: e.g. a sum over processes
            (:mod:`abmll.distributed`).
        log_support_after: also run the support set once more, without gradients, at the
            posterior mean of lambda^(K), to log support_nll_after: one extra forward per
            task, about 6% of a meta-step at 16 + 16 examples (benchmarks/efficiency.py).
    Returns:
        logs: query_nll, kl, hyperprior (= -log p(theta), unweighted), support_nll_before
        (the first inner step's sampled NLL), support_nll_after (only with
        ``log_support_after``; always for Reptile), as means over the meta-batch in nats, and
        loss (the meta-objective); with ``outer_grad_clip``, meta_grad_norm (before clipping).
    Raises:
        NonFiniteLossError: naming ``step`` and the tasks; theta is left unchanged.
    """
    if config.outer_update not in OUTER_UPDATES:
        raise ValueError(f"outer_update must be one of {tuple(OUTER_UPDATES)}, got {config.outer_update!r}")
    task_update = OUTER_UPDATES[config.outer_update]
    optimizer.zero_grad(set_to_none=True)
    B = len(tasks) if total_tasks is None else total_tasks
    logs = dict(query_nll=0.0, kl=0.0, support_nll_before=0.0)
    if log_support_after or config.outer_update == "reptile":
        logs["support_nll_after"] = 0.0
    for task in tasks:
        if task.noise_seed is not None:
            torch.manual_seed(task.noise_seed)
        try:
            task_update(model, theta, task, config, B, logs)
        except NonFiniteLossError as err:
            optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(f"meta-step {step}, task {task.task!r}: {err}") from err
    if reduce is not None:
        logs = reduce(theta, logs)
    hyperprior = model.neg_log_hyperprior(theta, hyper)
    (config.gamma * hyperprior).backward()
    logs["hyperprior"] = hyperprior.item()
    logs["loss"] = logs["query_nll"] + config.beta * logs["kl"] + config.gamma * logs["hyperprior"]
    terms = [(name, logs[key]) for name, key in (("query NLL", "query_nll"), ("KL", "kl"), ("hyperprior", "hyperprior"))]
    bad_grad = next((k for k, t in theta.items() if not torch.isfinite(t.grad).all()), None)
    try:
        _check_finite(f"meta-step {step}", *terms, ("loss", logs["loss"]))
        if bad_grad is not None:
            raise NonFiniteLossError(f"meta-step {step}: non-finite meta-gradient of {bad_grad} (logs {logs})")
    except NonFiniteLossError as err:
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLossError(f"{err} on tasks {[t.task for t in tasks]}") from None
    if config.outer_grad_clip:
        logs["meta_grad_norm"] = torch.nn.utils.clip_grad_norm_(list(theta.values()), config.outer_grad_clip).item()
    if config.outer_warmup_steps:  # else the optimizer's own lr (MetaTrainer's is outer_lr)
        for group in optimizer.param_groups:
            group["lr"] = outer_lr_at(config, step)
    optimizer.step()
    return logs


def _abmll_task(model: BayesLoraModel, theta: Params, task: TaskBatches, config: MetaConfig, B: int, logs: dict) -> None:
    """ABMLL's share of one task in :func:`meta_step`: lambda^(K) = adapt(theta, support), then
    the gradient of (NLL(query; lambda) + beta * KL(q_lambda || p_theta)) / B at lambda = lambda^(K)
    is added to theta's (straight-through), beside the KL's own gradient through p_theta.
    Logs: query_nll, kl, support_nll_before, and support_nll_after when ``logs`` has it."""
    lam_k, history = adapt(
        model, theta, task.support, config.inner_steps, config.inner_lr, config.beta, config.n_samples, config.inner_grad_clip
    )
    lam = _leaves(lam_k)
    query_nll = nll_backward(model, lam, task.query, config.n_samples, weight=1 / B)
    kl = model.kl(lam, theta)
    _check_finite("outer loss", ("query NLL", query_nll), ("KL(q || p_theta)", kl))
    (config.beta / B * kl).backward()
    with torch.no_grad():  # straight-through: d lambda^(K) / d theta = identity
        for k, t in theta.items():
            t.grad = lam[k].grad.clone() if t.grad is None else t.grad + lam[k].grad
    logs["query_nll"] += query_nll / B
    logs["kl"] += kl.item() / B
    before = history[0] if history else mean_nll(model, theta, task.support)
    logs["support_nll_before"] += before / B
    if "support_nll_after" in logs:
        after = mean_nll(model, lam_k, task.support) if history else before  # K = 0: lambda = theta
        logs["support_nll_after"] += after / B


def _reptile_task(model: BayesLoraModel, theta: Params, task: TaskBatches, config: MetaConfig, B: int, logs: dict) -> None:
    """Reptile's share of one task in :func:`meta_step`: lambda^(K) = K inner steps from theta
    on the task's support and query sets together (Reptile has no held-out set), then
    (theta - lambda^(K)) / B is added to theta's gradient. Logs (no gradient): query_nll and
    support_nll_after at lambda^(K), support_nll_before at theta, kl = KL(q_lambda || p_theta)."""
    lam_k, _ = adapt(
        model,
        theta,
        list(task.support) + list(task.query),
        config.inner_steps,
        config.inner_lr,
        config.beta,
        config.n_samples,
        config.inner_grad_clip,
    )
    with torch.no_grad():
        for k, t in theta.items():
            g = (t.detach() - lam_k[k]) / B
            t.grad = g if t.grad is None else t.grad + g
        logs["kl"] += model.kl(lam_k, theta).item() / B
    logs["query_nll"] += mean_nll(model, lam_k, task.query) / B
    logs["support_nll_before"] += mean_nll(model, theta, task.support) / B
    logs["support_nll_after"] += mean_nll(model, lam_k, task.support) / B


@torch.no_grad()
def predict_batches(
    model: BayesLoraModel,
    params: Params,
    batches: Sequence[OptionBatch],
    n_samples: int = 0,
) -> tuple[Tensor, Tensor]:
    """Predictive probabilities p(y | x) = mean over ``n_samples`` weight samples of
    softmax(option scores); ``n_samples`` = 0 uses the posterior mean (docs/method.md,
    "Prediction and metrics").

    Returns:
        probs (N, C_max) float32, zero past an example's number of options; labels (N,) long.
        Rows are in the original example order (``OptionBatch.example_index``).
    Raises:
        ValueError: ``batches`` is empty.
    """
    samples, labels = predict_samples(model, params, batches, n_samples)
    return samples.mean(0), labels


@torch.no_grad()
def predict_samples(
    model: BayesLoraModel,
    params: Params,
    batches: Sequence[OptionBatch],
    n_samples: int = 0,
    draw: Callable[[], Params] | None = None,
    draw_scores: Callable[[OptionBatch, int], Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """The class probabilities of each weight sample, for :func:`abmll.uncertainty.decompose`.

    ``draw``: a function returning the adapter tensors of one draw (e.g. a Laplace sample, or
    ``params`` itself under MC dropout); each of the max(``n_samples``, 1) draws per batch then
    runs its own tensors without the Gaussian-LoRA weight noise. None: ``params`` with that
    noise when ``n_samples`` > 0. ``draw_scores(batch, draws)``: instead, the (draws, N, C_max)
    option scores of a batch's draws (e.g. the linearised Laplace predictive).

    Returns:
        sample_probs (max(n_samples, 1), N, C_max) float32 (one row of the posterior mean when
        ``n_samples`` = 0), zero past an example's number of options; labels (N,) long; rows
        in the original example order.
    Raises:
        ValueError: ``batches`` is empty.
    """
    if not batches:
        raise ValueError("predict_batches: no batches to predict (empty example list?)")
    n = sum(b.num_examples for b in batches)
    c = max(int(b.num_options.max()) for b in batches)
    draws = max(n_samples, 1)
    probs = torch.zeros(draws, n, c, dtype=torch.float32)
    labels = torch.zeros(n, dtype=torch.long)
    for batch in batches:
        if draw_scores is not None:
            scores = draw_scores(batch, draws)
        else:
            fns = (
                [_logits_fn(model, params, n_samples > 0)] * draws
                if draw is None
                else [_logits_fn(model, draw(), False) for _ in range(draws)]
            )
            scores = torch.stack([option_scores(fn, batch) for fn in fns])
        p = torch.softmax(scores, -1).float().cpu()
        idx = batch.example_index.cpu()
        probs[:, idx, : p.shape[2]] = p
        labels[idx] = batch.labels.cpu()
    return probs, labels


def _mean_nll_graph(model: BayesLoraModel, params: Params, batches: Sequence[OptionBatch], n_samples: int) -> Tensor:
    """Mean NLL over ``batches`` (and ``n_samples`` weight samples) as one differentiable scalar."""
    draws = max(n_samples, 1)
    losses = [training_loss(option_scores(_logits_fn(model, params, n_samples > 0), b), b) for b in batches for _ in range(draws)]
    return torch.cat(losses).sum() / (sum(b.num_examples for b in batches) * draws)


def _second_order_task(model: BayesLoraModel, theta: Params, task: TaskBatches, config: MetaConfig, B: int, logs: dict) -> None:
    """The exact (second-order) ABML share of one task in :func:`meta_step`: back-propagates
    (NLL(query; lambda^(K)) + beta * KL(q_lambda || p_theta)) / B through all K plain SGD inner
    steps (``create_graph=True``), including the prior's role in the inner KL. A reference for
    the first-order rule on small models and for memory comparisons: its graph, and so its
    memory, grows linearly with K. ``inner_grad_clip`` is not applied; the outer step is
    :func:`meta_step`'s (warm-up, meta-gradient clipping). Runs attention on the math SDPA
    kernel (the fused CPU kernels have no double backward). Logs: query_nll, kl,
    support_nll_before (the first inner step's NLL), and support_nll_after (at the posterior
    mean of lambda^(K), no gradient) when ``logs`` has it."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        lam, before = dict(theta), None
        for _ in range(config.inner_steps):
            nll = _mean_nll_graph(model, lam, task.support, config.n_samples)
            before = nll.item() if before is None else before
            loss = nll + config.beta * model.kl(lam, theta, twice_differentiable=True) if config.beta else nll
            grads = torch.autograd.grad(loss, list(lam.values()), create_graph=True)
            lam = {k: v - config.inner_lr * g for (k, v), g in zip(lam.items(), grads)}
        if before is None:  # K = 0: lambda = theta
            before = mean_nll(model, theta, task.support)
        query_nll = _mean_nll_graph(model, lam, task.query, config.n_samples)
        kl = model.kl(lam, theta)
        _check_finite("outer loss", ("query NLL", query_nll), ("KL(q || p_theta)", kl))
        ((query_nll + config.beta * kl) / B).backward()
    logs["query_nll"] += query_nll.item() / B
    logs["kl"] += kl.item() / B
    logs["support_nll_before"] += before / B
    if "support_nll_after" in logs:
        after = mean_nll(model, {k: v.detach() for k, v in lam.items()}, task.support) if config.inner_steps else before
        logs["support_nll_after"] += after / B


OUTER_UPDATES: dict[str, Callable[..., None]] = {
    "abmll": _abmll_task,
    "reptile": _reptile_task,
    "second_order": _second_order_task,
}
"""The outer update rules of :func:`meta_step`: each adds one task's share (1/B) of theta's
gradient and of the logs, as ``rule(model, theta, task, config, B, logs)``."""
