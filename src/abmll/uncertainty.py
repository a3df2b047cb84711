"""What the weight posterior says about each prediction: the decomposition of predictive
uncertainty into aleatoric and epistemic parts (Depeweg et al. 2018, "Decomposition of
uncertainty in Bayesian deep learning"; as Bayesian LoRA papers report it), and selective
prediction (abstaining on the most uncertain examples; Geifman & El-Yaniv 2017).

With S weight samples w_s ~ q and p_s = p(y | x, w_s), p = mean_s p_s:

    total       H[p]                          predictive entropy (nats)
    aleatoric   mean_s H[p_s]                 expected entropy: what the data leaves open
    epistemic   H[p] - mean_s H[p_s]          mutual information I(y; w | x): what the
                                              posterior does not know (>= 0, Jensen)

With one sample (or the posterior mean) epistemic is 0 and aleatoric equals total.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

UNCERTAINTY_KINDS = ("total", "epistemic")
"""Scores selective prediction can rank examples by (abstaining on the highest first)."""


def entropy(probs: Tensor) -> Tensor:
    """Shannon entropy in nats along the last axis; 0 log 0 = 0. probs (..., C) -> (...)."""
    return -(probs * probs.clamp_min(1e-30).log()).sum(-1)


def decompose(sample_probs: Tensor) -> dict[str, Tensor]:
    """Per-example uncertainty from the class probabilities of S weight samples.

    Args:
        sample_probs: (S, N, C), each row a distribution over C options (padding columns 0).
    Returns:
        ``{"total", "aleatoric", "epistemic", "top_prob_std"}``, each (N,) float: the entropies
        of the module docstring (nats; epistemic clamped at 0 against rounding), and the
        standard deviation over samples (population, /S) of the probability each sample gives
        the mean prediction's top class.
    Raises:
        ValueError: ``sample_probs`` is not 3-D or has no samples.
    """
    if sample_probs.dim() != 3 or sample_probs.shape[0] == 0:
        raise ValueError(f"sample_probs must be (S >= 1, N, C), got shape {tuple(sample_probs.shape)}")
    p = sample_probs.double()
    mean = p.mean(0)
    total = entropy(mean)
    aleatoric = entropy(p).mean(0)
    top = mean.argmax(-1)
    top_probs = p.gather(2, top.expand(p.shape[0], -1).unsqueeze(-1)).squeeze(-1)  # (S, N)
    return {
        "total": total.float(),
        "aleatoric": aleatoric.float(),
        "epistemic": (total - aleatoric).clamp_min(0).float(),
        "top_prob_std": top_probs.std(0, unbiased=False).float(),
    }


def risk_coverage(probs: Tensor, labels: Tensor, uncertainty: Tensor) -> tuple[Tensor, Tensor]:
    """The risk-coverage curve of abstaining on the most uncertain examples first.

    Args:
        probs: (N, C) predictive probabilities (the prediction is the argmax, ties to the lowest index).
        labels: (N,) true option indices.
        uncertainty: (N,) score, higher = less trusted; ties keep input order.
    Returns:
        (coverage, risk), each (N,): after answering the k least uncertain examples,
        coverage k / N and risk = the error rate among them, for k = 1..N.
    """
    errors = (probs.argmax(-1) != labels).double()
    order = torch.sort(uncertainty.double(), stable=True).indices
    answered = torch.arange(1, len(labels) + 1, dtype=torch.float64)
    return answered / len(labels), errors[order].cumsum(0) / answered


def aurc(probs: Tensor, labels: Tensor, uncertainty: Tensor) -> float:
    """Area under the risk-coverage curve (Geifman et al. 2019): the mean of the risk over
    the coverages k / N, k = 1..N (lower is better; the error rate when the ranking is
    random, less when uncertain examples are the wrong ones)."""
    _, risk = risk_coverage(probs, labels, uncertainty)
    return float(risk.mean())


def accuracy_at_coverage(
    probs: Tensor, labels: Tensor, uncertainty: Tensor, coverages: tuple[float, ...] = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)
) -> dict[str, float]:
    """Accuracy on the ``ceil(c N)`` least uncertain examples for each coverage c in (0, 1]."""
    coverage, risk = risk_coverage(probs, labels, uncertainty)
    n = len(labels)
    out = {}
    for c in coverages:
        k = max(1, math.ceil(round(c * n, 9)))
        out[f"{c:.2f}"] = float(1 - risk[k - 1])
    return out
