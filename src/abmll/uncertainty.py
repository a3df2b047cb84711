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
"""The parts of the uncertainty that rank examples (selective prediction abstains on the
highest first; the OOD check scores each)."""

ABSTAIN_SCORES = (*UNCERTAINTY_KINDS, "normalised")
"""What ``abmll predict`` can abstain on: "normalised" is the total entropy over log(number
of options), in [0, 1] whatever the number of classes (:func:`normalised_entropy`)."""


def entropy(probs: Tensor) -> Tensor:
    """Shannon entropy in nats along the last axis; 0 log 0 = 0. probs (..., C) -> (...)."""
    return -(probs * probs.clamp_min(1e-30).log()).sum(-1)


def normalised_entropy(total: Tensor, num_options: Tensor) -> Tensor:
    """H[p] / log C per example: 0 for a certain prediction, 1 for the uniform one over its C
    options (0 when C = 1). total (N,) nats, num_options (N,) ints -> (N,) float."""
    return total / num_options.double().log().clamp_min(1e-12).to(total.dtype) * (num_options > 1)


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


def choose_threshold(
    uncertainty: Tensor, correct: Tensor, target_accuracy: float | None = None, target_coverage: float | None = None
) -> dict[str, float]:
    """The abstention threshold t (abstain when uncertainty > t) that meets a target on
    labelled rows, e.g. the task's dev rows: the largest t whose kept rows (uncertainty <= t)
    are right at least ``target_accuracy`` of the time (the most coverage that still meets
    it), or the smallest t keeping at least ``target_coverage`` of the rows. Ties are kept or
    abstained on together.

    Args:
        uncertainty: (N,) the score abstention uses (e.g. normalised entropy).
        correct: (N,) bool, whether each row's prediction is right.
        target_accuracy / target_coverage: exactly one, in (0, 1].
    Returns:
        ``{"threshold", "coverage", "selective_accuracy", "rows"}`` on these rows.
    Raises:
        ValueError: not exactly one target, a target outside (0, 1], no rows, or no threshold
            reaches ``target_accuracy`` (the message gives the best selective accuracy).
    """
    if (target_accuracy is None) == (target_coverage is None):
        raise ValueError("choose_threshold: give exactly one of target_accuracy and target_coverage")
    target = target_accuracy if target_coverage is None else target_coverage
    if not 0 < target <= 1:
        raise ValueError(f"choose_threshold: the target must be in (0, 1], got {target}")
    n = len(uncertainty)
    if n == 0:
        raise ValueError("choose_threshold: no labelled rows to choose the threshold on")
    u = uncertainty.double()
    candidates = torch.unique(u)  # ascending; keeping u <= c for each c
    kept = (u.unsqueeze(0) <= candidates.unsqueeze(1)).double()  # (T, N)
    coverage = kept.sum(1) / n
    accuracy = (kept * correct.double()).sum(1) / kept.sum(1)
    if target_coverage is not None:
        i = int(torch.nonzero(coverage >= target_coverage - 1e-12)[0])
    else:
        ok = torch.nonzero(accuracy >= target_accuracy - 1e-12)
        if len(ok) == 0:
            best = int(accuracy.argmax())
            raise ValueError(
                f"no abstention threshold reaches selective accuracy {target_accuracy} on the {n} labelled rows: "
                f"the best is {float(accuracy[best]):.3f}, keeping {float(coverage[best]):.1%} of them; lower the target"
            )
        i = int(ok[-1])
    return {
        "threshold": float(candidates[i]),
        "coverage": float(coverage[i]),
        "selective_accuracy": float(accuracy[i]),
        "rows": n,
    }
