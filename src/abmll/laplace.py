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
  the LoRA initialisation the fine-tuning started from (:func:`abmll.evaluate.laplace_std`:
  with 0, the norm of the random A matrices sets lambda so low that the draws swamp the
  fine-tuned function).

- prediction, one of laplace-torch's two predictives:
  - sampled ("nn"): the average over S draws theta_s ~ q of the class probabilities
    softmax(s(x; theta_s)) (:func:`laplace_draw`);
  - linearised ("glm", what Laplace-LoRA's paper reports): the option scores of the model
    linearised at theta*, s_lin(x; theta) = s(x; theta*) + J(x) (theta - theta*), J = d s / d
    theta at theta*, so they are Gaussian, N(s(x; theta*), J diag(F + lambda)^-1 J^T), and the
    predictive is their softmax averaged over S draws (:func:`linearised_scores`, J times a
    draw's offset by forward-mode autodiff: no Jacobian is stored).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor
from torch.autograd import forward_ad

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


def laplace_offset(theta: Params, std: Params) -> Params:
    """One draw of theta - theta* under the Laplace posterior: std * eps, eps ~ N(0, 1), for the
    entries in ``std`` (dtype and device of ``theta``'s). Uses torch's global RNG."""
    return {k: s.to(theta[k].dtype) * torch.randn_like(theta[k]) for k, s in std.items()}


def laplace_draw(theta: Params, std: Params) -> Params:
    """One draw theta* + :func:`laplace_offset` of the entries in ``std``; the other entries of
    ``theta`` as they are."""
    return {**theta, **{k: theta[k] + d for k, d in laplace_offset(theta, std).items()}}


@contextmanager
def eager_attention(model: BayesLoraModel) -> Iterator[None]:
    """Run the base model with transformers' "eager" attention inside the block (its fused
    SDPA kernels have no forward-mode derivative), restoring its implementation after."""
    base = model.peft_model.get_base_model()
    before = base.config._attn_implementation
    base.set_attn_implementation("eager")
    try:
        yield
    finally:
        base.set_attn_implementation(before)


def linearised_scores(model: BayesLoraModel, theta: Params, batch: OptionBatch, offsets: Sequence[Params]) -> Tensor:
    """The option scores of the model linearised at ``theta``, at theta + each of ``offsets``:
    s(x; theta) + J(x) offset_d, J = d s / d theta, by forward-mode autodiff
    (dual tensors of ``torch.autograd.forward_ad``; one forward pass with tangents per
    offset, eager attention).

    Args:
        theta: the linearisation point (all adapter tensors; no weight noise is used).
        batch: the examples, :func:`abmll.scoring.encode_options`.
        offsets: D dicts theta - theta* over some of ``theta``'s keys (e.g.
            :func:`laplace_offset`); the same keys in each.
    Returns:
        (D, N, C_max) float scores, -inf past an example's number of options.
    Raises:
        ValueError: no offsets.
    """
    if not offsets:
        raise ValueError("linearised_scores: no offsets (draws) given")
    keys = list(offsets[0])
    rest = {k: v for k, v in theta.items() if k not in offsets[0]}

    def scores(leaves: Params) -> Tensor:
        return option_scores(lambda groups=None, **kw: model({**rest, **leaves}, groups=groups, **kw).logits, batch)

    out = []
    with eager_attention(model), torch.no_grad():
        for offset in offsets:
            with forward_ad.dual_level():
                s = scores({k: forward_ad.make_dual(theta[k].detach(), offset[k].detach()) for k in keys})
                primal, jv = forward_ad.unpack_dual(s)
            out.append(primal + jv)
    return torch.stack(out)
