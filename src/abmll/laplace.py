"""Laplace-LoRA, diagonal (Yang et al. 2024, "Bayesian low-rank adaptation for large language
models"; Daxberger et al. 2021 for the library it builds on): a post-hoc Gaussian over the
LoRA weights theta = (A, B of every adapted layer) of a LoRA fine-tuned on the task's support.

    q(theta) = N(theta*, diag(F + lambda)^-1)

- theta*: the fine-tuned LoRA (the mean pair after deterministic adaptation).
- F: the diagonal of the generalised Gauss-Newton matrix of the support NLL at theta*, which
  for a softmax over options equals the diagonal of the Fisher:
  F = sum_n sum_c p_nc (d log p_nc / d theta)^2  (:func:`ggn_diagonal`).
- lambda: an isotropic prior N(theta0, 1 / lambda) on theta, its precision chosen by
  maximising the Laplace approximation of the log marginal likelihood, as Laplace-LoRA does
  (laplace-torch's ``optimize_prior_precision(method="marglik")``; :func:`prior_precision`):

      log Z(lambda) = log p(D | theta*) + P/2 log lambda - lambda/2 |theta* - theta0|^2
                      - 1/2 sum_i log(F_i + lambda)

  theta0 is laplace-torch's ``prior_mean``: 0 by default there; the evaluation centres it at
  the LoRA initialisation the fine-tuning started from (:func:`abmll.evaluate.laplace_sampler`:
  with 0, the norm of the random A matrices sets lambda so low that the draws swamp the
  fine-tuned function).

- prediction: the sampled ("nn") predictive, the average over S draws of theta of the class
  probabilities (:func:`laplace_draw`); Laplace-LoRA's paper prefers the linearised one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from abmll.bayes_lora import BayesLoraModel, Params
from abmll.scoring import OptionBatch, option_scores

LAMBDA_RANGE = (1e-8, 1e8)
"""The prior precisions :func:`prior_precision` searches."""


def ggn_diagonal(model: BayesLoraModel, params: Params, batches: Sequence[OptionBatch], keys: Sequence[str]) -> Params:
    """The diagonal of the GGN (= Fisher) of the NLL of ``batches`` w.r.t. ``params[keys]``:
    F = sum_n sum_c p_nc g_nc^2, g_nc = d log p_nc / d theta, p_nc = softmax over example n's
    option scores at ``params`` (posterior mean, no weight noise). One backward pass per
    (example, option): its cost is about that many adaptation steps on one batch.

    Returns: {key: (same shape as params[key]) float32 tensor >= 0}.
    """
    leaves = {k: params[k].detach().clone().requires_grad_() for k in keys}
    full = {**params, **leaves}
    fisher = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in leaves.items()}
    logits_fn = lambda groups=None, **kw: model(full, groups=groups, **kw).logits  # noqa: E731
    for batch in batches:
        logp = torch.log_softmax(option_scores(logits_fn, batch), -1)  # (N, C), -inf past the options
        p = logp.detach().exp()
        for n in range(batch.num_examples):
            for c in range(int(batch.num_options[n])):
                grads = torch.autograd.grad(logp[n, c], list(leaves.values()), retain_graph=True, allow_unused=True)
                for k, g in zip(leaves, grads, strict=True):
                    if g is not None:
                        fisher[k] += p[n, c].float() * g.float() ** 2
    return fisher


def _flat(tensors: Params) -> Tensor:
    return torch.cat([t.detach().float().reshape(-1) for t in tensors.values()])


def _offset(fisher: Params, theta: Params, prior_mean: Params | None) -> Tensor:
    """theta* - theta0 over ``fisher``'s keys, flat, float64 (theta0 = 0 when None)."""
    th = _flat({k: theta[k] for k in fisher}).double()
    return th if prior_mean is None else th - _flat({k: prior_mean[k] for k in fisher}).double()


def log_marginal_likelihood(log_lik: float, fisher: Params, theta: Params, lam: float, prior_mean: Params | None = None) -> float:
    """log Z(lambda) of the module docstring (nats); ``log_lik`` = log p(D | theta*) (nats),
    ``fisher``, ``theta`` and ``prior_mean`` (theta0; None: 0) with the same keys."""
    F, th = _flat(fisher).double(), _offset(fisher, theta, prior_mean)
    P = F.numel()
    return float(log_lik + 0.5 * P * math.log(lam) - 0.5 * lam * th.pow(2).sum() - 0.5 * torch.log(F + lam).sum())


def prior_precision(fisher: Params, theta: Params, prior_mean: Params | None = None) -> float:
    """The lambda in :data:`LAMBDA_RANGE` maximising :func:`log_marginal_likelihood`.

    Its derivative, 1/2 (sum_i F_i / (lambda (F_i + lambda)) - |theta* - theta0|^2),
    decreases strictly in lambda, so the maximum is its one root, found by bisection on log
    lambda (an end of the range when there is none there: e.g. lambda's lower end when F = 0).
    """
    F, th = _flat(fisher).double(), _offset(fisher, theta, prior_mean)
    sq = float(th.pow(2).sum())

    def slope(log_lam: float) -> float:
        lam = math.exp(log_lam)
        return float((F / (lam * (F + lam))).sum()) - sq

    lo, hi = math.log(LAMBDA_RANGE[0]), math.log(LAMBDA_RANGE[1])
    if slope(lo) <= 0:
        return LAMBDA_RANGE[0]
    if slope(hi) >= 0:
        return LAMBDA_RANGE[1]
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if slope(mid) > 0 else (lo, mid)
    return math.exp((lo + hi) / 2)


def posterior_std(fisher: Params, lam: float) -> Params:
    """(F + lambda)^-1/2 per entry: the Laplace posterior's std of each LoRA weight."""
    return {k: (f + lam).rsqrt() for k, f in fisher.items()}


def laplace_draw(theta: Params, std: Params) -> Params:
    """One draw theta* + std * eps, eps ~ N(0, 1), of the entries in ``std``; the other
    entries of ``theta`` as they are. Uses torch's global RNG."""
    return {**theta, **{k: theta[k] + s.to(theta[k].dtype) * torch.randn_like(theta[k]) for k, s in std.items()}}
