"""Accuracy and calibration metrics for multiple-choice / classification predictions.

Every function takes

* ``probs``: float tensor of shape ``(N, C)`` with predictive probabilities. Each row sums to 1.
  An example with fewer than ``C`` options has probability 0 in its padded columns; padded
  columns change none of the metrics (they can never be the arg-max, add nothing to the
  Brier score and are never a label).
* ``labels``: integer tensor of shape ``(N,)`` with the index of the correct option.

and returns plain Python floats. The prediction of an example is ``argmax_c probs[n, c]``
(ties go to the lowest index) and its confidence is ``max_c probs[n, c]``.

Inputs are checked by :func:`_validate`; anything malformed raises :class:`ValueError`.

The expected calibration error is Guo et al.'s, computed here (torchmetrics' binning differs
at a confidence of 1.0; :func:`expected_calibration_error_torchmetrics` keeps it for
comparison); :data:`ECE_SCHEME` names the scheme results files record. Macro-F1 is computed by
``torchmetrics.functional.classification.multiclass_f1_score`` with ``average="macro"``, whose
macro average leaves out classes with ``tp + fp + fn == 0``, i.e. classes that occur neither
as a label nor as a prediction.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor
from torchmetrics.functional.classification import (
    multiclass_calibration_error,
    multiclass_f1_score,
)

from abmll.uncertainty import aurc, entropy

__all__ = [
    "accuracy",
    "bootstrap_mean_ci",
    "brier_score",
    "compute_metrics",
    "expected_calibration_error",
    "expected_calibration_error_torchmetrics",
    "macro_f1",
    "negative_log_likelihood",
    "plot_reliability_diagram",
    "reliability_diagram_data",
]

ECE_SCHEME = {
    "binning": "equal_width",
    "n_bins": 15,
    "bins": "right-closed ((m-1)/M, m/M] on the max probability",
    "definition": "Guo et al. 2017 eq. 3",
}
"""How ``compute_metrics``' "ece" is binned, recorded beside results."""

# How far a row of ``probs`` may sum from 1 (computed in float64).
_ROW_SUM_ATOL = 1e-3


def _validate(probs: Any, labels: Any) -> tuple[Tensor, Tensor]:
    """Return ``(probs, labels)`` as tensors after checking shapes, dtypes and values.

    Raises:
        ValueError: if ``probs`` is not a 2-D floating tensor with at least 2 columns, ``labels``
            is not a 1-D integer tensor, their lengths differ, ``N == 0``, a label is outside
            ``[0, C)``, or a probability is NaN, outside ``[0, 1]``, or a row does not sum to 1.
    """
    probs = torch.as_tensor(probs)
    labels = torch.as_tensor(labels, device=probs.device)
    if probs.ndim != 2:
        raise ValueError(f"probs must have shape (N, C), got shape {tuple(probs.shape)}")
    if labels.ndim != 1:
        raise ValueError(f"labels must have shape (N,), got shape {tuple(labels.shape)}")
    if not probs.is_floating_point():
        raise ValueError(f"probs must be a floating-point tensor, got dtype {probs.dtype}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got dtype {labels.dtype}")
    n, c = probs.shape
    if labels.shape[0] != n:
        raise ValueError(f"probs has {n} rows but labels has {labels.shape[0]} entries")
    if n == 0:
        raise ValueError("empty input: probs and labels have no examples")
    if c < 2:
        raise ValueError(f"probs must have at least 2 columns (options), got {c}")
    if torch.isnan(probs).any():
        raise ValueError("probs contains NaN")
    if ((probs < 0) | (probs > 1)).any():
        raise ValueError("probs must lie in [0, 1] (got values outside; pass probabilities, not logits)")
    row_sums = probs.double().sum(dim=1)
    worst = (row_sums - 1).abs().max().item()
    if worst > _ROW_SUM_ATOL:
        raise ValueError(f"every row of probs must sum to 1; the worst row is off by {worst:.3g}")
    if ((labels < 0) | (labels >= c)).any():
        bad = labels[(labels < 0) | (labels >= c)][0].item()
        raise ValueError(f"labels must lie in [0, {c}) (C = probs.shape[1]), got {bad}")
    return probs, labels.long()


def _check_n_bins(n_bins: Any) -> None:
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive int, got {n_bins!r}")


def accuracy(probs: Tensor, labels: Tensor) -> float:
    """Fraction of examples whose arg-max option equals the label.

    Args:
        probs: ``(N, C)`` float probabilities, rows summing to 1.
        labels: ``(N,)`` integer answer indices in ``[0, C)``.

    Returns:
        Top-1 accuracy in ``[0, 1]``. Ties in ``probs`` go to the lowest option index.

    Raises:
        ValueError: for malformed inputs (see module docstring).
    """
    probs, labels = _validate(probs, labels)
    return (probs.argmax(dim=1) == labels).double().mean().item()


def macro_f1(probs: Tensor, labels: Tensor, num_classes: int | None = None) -> float:
    """Macro-averaged F1 over classes = option indices.

    For each class ``k``, ``F1_k = 2 tp / (2 tp + fp + fn)`` (0 when the class is never
    predicted correctly). The macro-F1 is the unweighted mean of ``F1_k`` over the classes
    that occur as a label or as a prediction; classes seen in neither are excluded. This equals
    ``sklearn.metrics.f1_score(y, y_hat, average="macro", labels=<classes present>)`` and is
    computed with ``torchmetrics.functional.classification.multiclass_f1_score``.

    Note: MetaICL's ``evaluate`` (Min et al. 2022) averages over the classes present in the
    labels only, so a class that is predicted but never a label (F1 = 0 here) is left out
    there. The two agree whenever every predicted class also occurs as a label.

    Args:
        probs: ``(N, C)`` float probabilities, rows summing to 1.
        labels: ``(N,)`` integer answer indices in ``[0, C)``.
        num_classes: number of class indices; defaults to ``C``. Must be an int ``>= 2`` and
            larger than every label and every prediction.

    Returns:
        Macro-F1 in ``[0, 1]``.

    Raises:
        ValueError: for malformed inputs, or an invalid ``num_classes``.
    """
    probs, labels = _validate(probs, labels)
    preds = probs.argmax(dim=1)
    if num_classes is None:
        num_classes = probs.shape[1]
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    top = max(labels.max().item(), preds.max().item())
    if top >= num_classes:
        raise ValueError(f"num_classes={num_classes} but a label or prediction equals {top}")
    score = multiclass_f1_score(preds, labels, num_classes=num_classes, average="macro")
    return score.item()


ECE_BINNINGS = ("equal_width", "equal_mass")


def _check_binning(binning: Any) -> None:
    if binning not in ECE_BINNINGS:
        raise ValueError(f"binning must be one of {ECE_BINNINGS}, got {binning!r}")


def expected_calibration_error(probs: Tensor, labels: Tensor, n_bins: int = 15, binning: str = "equal_width") -> float:
    """Expected calibration error (top-label, L1) of Guo et al. (2017), "On Calibration of
    Modern Neural Networks", ICML, eq. 3:

        ECE = sum_m (|B_m| / N) * |acc(B_m) - conf(B_m)|

    with ``B_m`` the examples whose confidence ``max_c p_c`` falls in bin ``m``, ``acc`` their
    top-1 accuracy and ``conf`` their mean confidence. ``binning="equal_width"`` (the paper's):
    ``n_bins`` right-closed bins ``((m-1)/M, m/M]``, so a confidence of exactly 1.0 is in the
    top bin. ``binning="equal_mass"`` (adaptive ECE, Nguyen & O'Connor 2015): the examples
    sorted by confidence, split into ``n_bins`` groups of equal size (sizes differ by at most
    one; fewer bins when N < n_bins). Computed in float64 from
    :func:`reliability_diagram_data`, so it always equals what the reliability diagram shows.

    torchmetrics' ``multiclass_calibration_error`` (the metric BLoB reports) puts a confidence
    of exactly 1.0 in a bin of its own (an open torchmetrics issue) and so can differ; it is
    :func:`expected_calibration_error_torchmetrics`, kept for comparison with such tables.

    Args:
        probs: ``(N, C)`` float probabilities, rows summing to 1.
        labels: ``(N,)`` integer answer indices in ``[0, C)``.
        n_bins: number of bins.
        binning: "equal_width" or "equal_mass".

    Returns:
        ECE in ``[0, 1]`` (a probability gap, no unit).

    Raises:
        ValueError: for malformed inputs, ``n_bins < 1`` or an unknown ``binning``.
    """
    data = reliability_diagram_data(probs, labels, n_bins, binning)
    n = sum(data["count"])
    return sum(c / n * abs(a - f) for c, a, f in zip(data["count"], data["accuracy"], data["confidence"]))


def expected_calibration_error_torchmetrics(probs: Tensor, labels: Tensor, n_bins: int = 15) -> float:
    """The ECE as ``torchmetrics.functional.classification.multiclass_calibration_error``
    (norm "l1") computes it, the number BLoB-style tables report: float32 confidences,
    left-closed bins ``[m/M, (m+1)/M)`` and a confidence of exactly 1.0 in a bin of its own.
    Equal to :func:`expected_calibration_error` when no confidence is exactly 1.0 or on a bin
    edge; otherwise not Guo et al.'s definition (e.g. probs [[0.95, 0.05], [1.0, 0.0]], labels
    [0, 1], 15 bins: 0.525 here, 0.475 by the definition).

    Raises:
        ValueError: for malformed inputs or ``n_bins < 1``.
    """
    probs, labels = _validate(probs, labels)
    _check_n_bins(n_bins)
    return multiclass_calibration_error(probs.float(), labels, num_classes=probs.shape[1], n_bins=n_bins, norm="l1").item()


def negative_log_likelihood(probs: Tensor, labels: Tensor, eps: float = 1e-12) -> float:
    """Mean negative log-likelihood of the labels, ``-(1/N) sum_n log max(p_n[y_n], eps)``.

    Args:
        probs: ``(N, C)`` float probabilities, rows summing to 1.
        labels: ``(N,)`` integer answer indices in ``[0, C)``.
        eps: floor on the label probability, so a zero probability costs ``-log(eps)``
            (27.63 nats for the default) instead of infinity.

    Returns:
        NLL in nats (natural log), ``>= 0``.

    Raises:
        ValueError: for malformed inputs.
    """
    probs, labels = _validate(probs, labels)
    p_label = probs.double().gather(1, labels[:, None]).squeeze(1)
    return (-p_label.clamp_min(eps).log()).mean().item()


def brier_score(probs: Tensor, labels: Tensor) -> float:
    """Multi-class Brier score (Brier 1950, "Verification of forecasts expressed in terms of
    probability", Monthly Weather Review): ``(1/N) sum_n sum_c (p_nc - 1[c == y_n])^2``.

    Padded columns (probability 0, never the label) add 0.

    Args:
        probs: ``(N, C)`` float probabilities, rows summing to 1.
        labels: ``(N,)`` integer answer indices in ``[0, C)``.

    Returns:
        Brier score in ``[0, 2]`` (squared probability, no unit); lower is better.

    Raises:
        ValueError: for malformed inputs.
    """
    probs, labels = _validate(probs, labels)
    onehot = torch.nn.functional.one_hot(labels, num_classes=probs.shape[1]).double()
    return (probs.double() - onehot).pow(2).sum(dim=1).mean().item()


def reliability_diagram_data(
    probs: Tensor, labels: Tensor, n_bins: int = 15, binning: str = "equal_width"
) -> dict[str, list[float]]:
    """Per-bin statistics for a reliability diagram (Guo et al. 2017, Fig. 1), with the bins of
    :func:`expected_calibration_error` (which is computed from them): equal-width right-closed
    bins ``((m-1)/M, m/M]`` on the confidence, or equal-mass bins. Confidences in float64.

    Args:
        probs: ``(N, C)`` float probabilities, rows summing to 1.
        labels: ``(N,)`` integer answer indices in ``[0, C)``.
        n_bins: number of bins.
        binning: "equal_width" or "equal_mass" (``min(n_bins, N)`` bins of equal count, by
            increasing confidence; a bin's edges are the lowest and highest confidence in it).

    Returns:
        Dict of lists, one entry per bin in increasing order: ``"bin_lower"``, ``"bin_upper"``
        (edges), ``"confidence"`` (mean max probability in the bin), ``"accuracy"`` (top-1
        accuracy in the bin), ``"count"`` (number of examples, as float). Empty bins have
        confidence and accuracy 0.0 and count 0.0.

    Raises:
        ValueError: for malformed inputs, ``n_bins < 1`` or an unknown ``binning``.
    """
    probs, labels = _validate(probs, labels)
    _check_n_bins(n_bins)
    _check_binning(binning)
    conf, preds = probs.double().max(dim=1)
    correct = (preds == labels).double()
    if binning == "equal_mass":
        order = conf.argsort(stable=True)
        groups = [g for g in torch.tensor_split(order, min(n_bins, len(order))) if len(g)]
        return {
            "bin_lower": [conf[g].min().item() for g in groups],
            "bin_upper": [conf[g].max().item() for g in groups],
            "confidence": [conf[g].mean().item() for g in groups],
            "accuracy": [correct[g].mean().item() for g in groups],
            "count": [float(len(g)) for g in groups],
        }
    edges = torch.arange(n_bins + 1, dtype=torch.float64, device=conf.device) / n_bins  # exact m / M (linspace is not)
    idx = (torch.bucketize(conf, edges, right=False) - 1).clamp(0, n_bins - 1)  # edges[m] < conf <= edges[m+1]
    count = torch.zeros(n_bins, dtype=torch.float64, device=conf.device)
    conf_sum = torch.zeros_like(count)
    acc_sum = torch.zeros_like(count)
    count.index_add_(0, idx, torch.ones_like(conf))
    conf_sum.index_add_(0, idx, conf)
    acc_sum.index_add_(0, idx, correct)
    denom = count.clamp_min(1)
    return {
        "bin_lower": [m / n_bins for m in range(n_bins)],
        "bin_upper": [(m + 1) / n_bins for m in range(n_bins)],
        "confidence": (conf_sum / denom).tolist(),
        "accuracy": (acc_sum / denom).tolist(),
        "count": count.tolist(),
    }


def bootstrap_mean_ci(
    values: Any, n_boot: int = 2000, level: float = 0.95, seed: int = 0, clusters: Any = None
) -> tuple[float, float, float]:
    """Mean of ``values`` and its percentile-bootstrap confidence interval (Efron & Tibshirani
    1993, ch. 13): resample with replacement ``n_boot`` times, take the ``(1 - level) / 2`` and
    ``(1 + level) / 2`` quantiles of the resampled means. With ``clusters`` (e.g. the task of
    each (task, seed) unit) whole clusters are resampled (the cluster bootstrap), so units that
    are correlated within a cluster do not make the interval too narrow; clusters must then
    have equal sizes. For a paired comparison pass the per-unit differences.

    Args:
        values: 1-D sequence or tensor of floats (one per unit).
        n_boot: bootstrap resamples (>= 1).
        level: coverage of the interval, in (0, 1).
        seed: seeds the resampling (the interval is reproducible).
        clusters: optional 1-D sequence of hashable cluster ids, one per value.
    Returns:
        (mean, lower, upper).
    Raises:
        ValueError: no values, a non-finite value, ``level`` outside (0, 1), ``n_boot`` < 1,
            or clusters that do not match the values or differ in size.
    """
    x = torch.as_tensor(values, dtype=torch.float64).flatten()
    if x.numel() == 0 or not torch.isfinite(x).all():
        raise ValueError(f"bootstrap needs finite values, got {x.tolist()[:5]}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    g = torch.Generator().manual_seed(seed)
    if clusters is not None:
        ids = list(clusters)
        if len(ids) != x.numel():
            raise ValueError(f"{len(ids)} cluster ids for {x.numel()} values")
        groups = {}
        for i, c in enumerate(ids):
            groups.setdefault(c, []).append(i)
        if len({len(v) for v in groups.values()}) != 1:
            raise ValueError("clusters must have equal sizes")
        x_by = torch.stack([x[v] for v in groups.values()])  # (clusters, size)
        pick = torch.randint(0, len(groups), (n_boot, len(groups)), generator=g)
        means = x_by[pick].mean(dim=(1, 2))
    else:
        means = x[torch.randint(0, x.numel(), (n_boot, x.numel()), generator=g)].mean(1)
    lo, hi = torch.quantile(means, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)).tolist()
    return x.mean().item(), lo, hi


def compute_metrics(probs: Tensor, labels: Tensor, n_bins: int = 15) -> dict[str, float]:
    """All scalar metrics at once.

    Args:
        probs: ``(N, C)`` float probabilities, rows summing to 1.
        labels: ``(N,)`` integer answer indices in ``[0, C)``.
        n_bins: number of ECE bins.

    Returns:
        ``{"accuracy", "macro_f1", "ece", "nll", "brier", "aurc"}`` as computed by
        :func:`accuracy`, :func:`macro_f1`, :func:`expected_calibration_error`,
        :func:`negative_log_likelihood` (nats), :func:`brier_score` and
        :func:`abmll.uncertainty.aurc` (abstaining by predictive entropy first).

    Raises:
        ValueError: for malformed inputs or ``n_bins < 1``.
    """
    return {
        "accuracy": accuracy(probs, labels),
        "macro_f1": macro_f1(probs, labels),
        "ece": expected_calibration_error(probs, labels, n_bins),
        "nll": negative_log_likelihood(probs, labels),
        "brier": brier_score(probs, labels),
        "aurc": aurc(probs, labels, entropy(probs)),
    }


def plot_reliability_diagram(
    probs: Tensor,
    labels: Tensor,
    path: str | os.PathLike[str],
    title: str = "",
    n_bins: int = 15,
):
    """Write a reliability diagram as a PNG file (Guo et al. 2017, Fig. 1 style).

    One bar per non-empty bin with height = accuracy in the bin, a hatched bar for the gap to
    the bin's mean confidence, the diagonal of perfect calibration, and the ECE
    (:func:`expected_calibration_error`) in the title; under it, a histogram of how many
    examples each bin holds (its bars are the second axes' patches, in bin order). Rendered
    with matplotlib's Agg canvas without touching pyplot's global state; parent folders of
    ``path`` are created. Returns the matplotlib Figure.

    Args:
        probs: ``(N, C)`` float probabilities, rows summing to 1.
        labels: ``(N,)`` integer answer indices in ``[0, C)``.
        path: output file; always written in PNG format.
        title: text put before the ECE in the title.
        n_bins: number of equal-width confidence bins.

    Raises:
        ValueError: for malformed inputs or ``n_bins < 1``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    data = reliability_diagram_data(probs, labels, n_bins)
    ece = expected_calibration_error(probs, labels, n_bins)
    width = 1.0 / n_bins

    fig = Figure(figsize=(5, 6.2), dpi=100)
    FigureCanvasAgg(fig)
    ax, hist = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    for lo, acc, conf, count in zip(data["bin_lower"], data["accuracy"], data["confidence"], data["count"]):
        if count == 0:
            continue
        ax.bar(lo, acc, width=width, align="edge", color="tab:blue", edgecolor="black")
        ax.bar(
            lo,
            abs(conf - acc),
            bottom=min(acc, conf),
            width=width,
            align="edge",
            color="tab:red",
            alpha=0.3,
            edgecolor="tab:red",
            hatch="//",
        )
    ax.plot([0, 1], [0, 1], linestyle="--", color="gray")
    ax.bar([0], [0], color="tab:blue", label="accuracy")  # legend handles only
    ax.bar([0], [0], color="tab:red", alpha=0.3, hatch="//", label="gap to confidence")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.legend(loc="upper left")
    prefix = f"{title}\n" if title else ""
    ax.set_title(f"{prefix}ECE = {ece:.4f}, N = {int(sum(data['count']))}", fontsize="medium")
    hist.bar(data["bin_lower"], data["count"], width=width, align="edge", color="gray", edgecolor="black")
    hist.set_xlabel("confidence (max probability)")
    hist.set_ylabel("examples")
    fig.tight_layout()

    parent = os.path.dirname(os.fspath(path))
    if parent:
        os.makedirs(parent, exist_ok=True)
    fig.savefig(path, format="png")
    return fig
