"""Temperature scaling (Guo et al. 2017): one scalar T > 0 that divides a method's log
predictive probabilities, fitted by minimising the NLL on held-out predictions.

Applied to a method's predictive mean p (N, C) (for a Bayesian method or an ensemble, the
average over its draws: pool, then calibrate):

    p_T(c) = p(c)^(1/T) / sum_c' p(c')^(1/T)  =  softmax(log p / T)

T > 1 flattens the predictions, T < 1 sharpens them; T = 1 leaves them as they are, and the
argmax (so accuracy and macro-F1) never changes. Entries past an example's number of options
hold probability 0 and stay 0.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

T_RANGE = (1e-2, 1e2)
"""The temperatures searched by :func:`fit_temperature`; a fit at an end says the held-out set
is (almost) separable or carries no signal."""


def apply_temperature(probs: Tensor, temperature: float) -> Tensor:
    """softmax(log p / T) per row. probs: (N, C), rows summing to 1, zeros past an example's
    options (they stay 0: the zeros after a row's last non-zero entry are read as padding). Returns
    (N, C) float32 (float64 for float64 input).

    Raises:
        ValueError: ``temperature`` is not a finite number > 0.
    """
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    p = probs if probs.dtype == torch.float64 else probs.float()
    # padding: the zeros after an example's last non-zero option; a real option whose
    # probability underflowed to 0 before that is floored at the smallest normal float
    cols = torch.arange(p.shape[-1], device=p.device)
    last = torch.where(p > 0, cols, -1).amax(-1, keepdim=True)
    logp = torch.log(p.clamp_min(torch.finfo(p.dtype).tiny)).masked_fill(cols > last, float("-inf"))
    return torch.softmax(logp / temperature, dim=-1)


def tempered_nll(probs: Tensor, labels: Tensor, temperature: float) -> float:
    """Mean NLL (nats) of ``labels`` (N,) under :func:`apply_temperature` (probs (N, C), T)."""
    p = apply_temperature(probs, temperature)
    return float(-torch.log(p.gather(1, labels.view(-1, 1)).clamp_min(1e-12)).mean())


def fit_temperature(probs: Tensor, labels: Tensor, iters: int = 60) -> float:
    """The T in :data:`T_RANGE` minimising :func:`tempered_nll` on held-out (probs, labels).

    The NLL is convex in 1 / T (a log-sum-exp of terms linear in 1 / T, minus a linear term),
    so a golden-section search on log T finds its minimum over the range (to about 1e-6
    relative after the default 60 iterations).

    Args:
        probs: (N, C) predictive probabilities, zeros past an example's options.
        labels: (N,) long true option indices.
    Returns: T (float).
    Raises:
        ValueError: no examples, or a label outside an example's options.
    """
    if probs.shape[0] == 0:
        raise ValueError("fit_temperature: no held-out examples to fit a temperature on")
    if (labels < 0).any() or (labels >= probs.shape[1]).any():
        raise ValueError("fit_temperature: a label is not among its example's options")
    probs = probs.double()  # the NLL is flat near its minimum: float32 rounding would move it
    lo, hi = math.log(T_RANGE[0]), math.log(T_RANGE[1])
    g = (math.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = tempered_nll(probs, labels, math.exp(a)), tempered_nll(probs, labels, math.exp(b))
    for _ in range(iters):
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = tempered_nll(probs, labels, math.exp(a))
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = tempered_nll(probs, labels, math.exp(b))
    return math.exp((lo + hi) / 2)
