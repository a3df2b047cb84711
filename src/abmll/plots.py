"""PNG plots of a run: meta-training curves and reliability diagrams pooled over tasks.

Rendered with matplotlib's Agg canvas on :class:`matplotlib.figure.Figure` objects, never
through pyplot's global state, so plotting is safe in scripts, tests and threads.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

from abmll.metrics import plot_reliability_diagram

CURVES = "training_curves.png"


def load_history(path: str | os.PathLike) -> list[dict]:
    """Read a ``history.json`` written by meta-training (a list of per-step log dicts).

    Raises:
        ValueError: the file is not a JSON list of objects (names the file).
        OSError: the file cannot be read.
    """
    history = json.loads(Path(path).read_text())
    if not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
        raise ValueError(f"{path}: expected a JSON list of per-step log objects")
    return history


def _series(history: Sequence[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the finite values of ``key`` (skipped steps have none)."""
    steps, values = [], []
    for i, logs in enumerate(history):
        value = logs.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            steps.append(int(logs.get("step", i)))
            values.append(float(value))
    return steps, values


def _save(fig, path: str | os.PathLike, title: str) -> Path:
    """Title, lay out and write ``fig`` as a PNG at ``path`` (parent folders created)."""
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def plot_training_curves(history: Sequence[dict], path: str | os.PathLike, title: str = "") -> Path:
    """Write the meta-training curves as a PNG with three panels against the meta-step: the
    query NLL, the support NLL before (and, when logged, after) the inner loop (nats), and KL(q || p_theta)
    (nats, log scale when positive). Steps without a value (skipped steps) are left out.

    Args:
        history: per-step logs (``query_nll``, ``kl``, ``support_nll_before``,
            ``support_nll_after``, ``step``), as in ``history.json``.
        path: output PNG file (parent folders are created).
    Returns: the path written.
    Raises:
        ValueError: ``history`` has no step with a finite ``query_nll``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    if not _series(history, "query_nll")[0]:
        raise ValueError("history has no step with a finite query_nll to plot")
    fig = Figure(figsize=(12, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    panels = fig.subplots(1, 3)
    ax = panels[0]
    ax.plot(*_series(history, "query_nll"), marker=".", color="tab:blue", label="query NLL")
    ax.set_title("query NLL (meta-objective)")
    ax = panels[1]
    ax.plot(*_series(history, "support_nll_before"), marker=".", color="tab:gray", label="before inner loop")
    after = _series(history, "support_nll_after")
    if after[0]:  # logged only with --log_support_after
        ax.plot(*after, marker=".", color="tab:green", label="after inner loop")
    ax.set_title("support NLL")
    ax.legend(loc="best")
    ax = panels[2]
    steps, kl = _series(history, "kl")
    ax.plot(steps, kl, marker=".", color="tab:red")
    if kl and min(kl) > 0:
        ax.set_yscale("log")
    ax.set_title("KL(q || p_theta)")
    for ax, unit in zip(panels, ("nats", "nats", "nats")):
        ax.set_xlabel("meta-step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(unit)
        ax.grid(alpha=0.3)
    return _save(fig, path, title)


VALIDATION_CURVE = "validation_curve.png"


def plot_validation_curve(validation: Sequence[dict], path: str | os.PathLike, title: str = "") -> Path:
    """Write the meta-validation learning curve as a PNG: validation NLL (nats) and ECE against
    the meta-step, the untrained prior (the entry at step 0) as a flat dashed line, and the
    best step (lowest NLL) marked.

    Args:
        validation: ``[{"step", "nll", "ece", ...}, ...]`` as in ``validation.json``.
        path: output PNG file (parent folders are created).
    Returns: the path written.
    Raises:
        ValueError: no entry with a finite NLL.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    steps, nll = _series(validation, "nll")
    if not steps:
        raise ValueError("validation has no entry with a finite nll to plot")
    fig = Figure(figsize=(9, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    untrained = {k: next((float(v[k]) for v in validation if v.get("step") == 0), None) for k in ("nll", "ece")}
    best = steps[nll.index(min(nll))]
    for ax, key, unit in zip(fig.subplots(1, 2), ("nll", "ece"), ("nats", "")):
        ax.plot(*_series(validation, key), marker=".", color="tab:blue", label="meta-trained prior")
        if untrained[key] is not None:
            ax.axhline(untrained[key], color="tab:gray", linestyle="--", label="untrained prior")
        ax.axvline(best, color="tab:green", alpha=0.4, label=f"best NLL (step {best})")
        ax.set_title(f"validation {key.upper()}")
        ax.set_xlabel("meta-step")
        ax.set_ylabel(unit)
        ax.grid(alpha=0.3)
        ax.legend(loc="best")
    return _save(fig, path, title)


def pool_predictions(parts: Sequence[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Concatenate per-task predictions with different option counts.

    Args:
        parts: ``(probs (N_i, C_i), labels (N_i,))`` pairs.
    Returns:
        ``(probs (sum N_i, max C_i), labels (sum N_i,))``, probabilities zero-padded on the
        right (padding changes no metric, see :mod:`abmll.metrics`).
    Raises:
        ValueError: ``parts`` is empty.
    """
    if not parts:
        raise ValueError("no predictions to pool")
    width = max(int(p.shape[1]) for p, _ in parts)
    probs = torch.cat([torch.nn.functional.pad(p.float(), (0, width - p.shape[1])) for p, _ in parts])
    return probs, torch.cat([lab.long() for _, lab in parts])


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def plot_reliability_per_method(
    predictions: Mapping[str, Sequence[tuple[Tensor, Tensor]]],
    folder: str | os.PathLike,
    n_bins: int = 15,
) -> dict[str, Path]:
    """One reliability diagram per method, over its predictions pooled across tasks and seeds
    (:func:`pool_predictions`, :func:`abmll.metrics.plot_reliability_diagram`).

    Args:
        predictions: method name -> list of ``(probs (N, C), labels (N,))`` (one per task and seed).
        folder: output folder; files are ``reliability_<method>.png``.
    Returns: method name -> PNG path.
    Raises:
        ValueError: a method has no predictions, or malformed probabilities / labels.
    """
    out = {}
    for method, parts in predictions.items():
        probs, labels = pool_predictions(parts)
        path = Path(folder) / f"reliability_{_slug(method)}.png"
        plot_reliability_diagram(probs, labels, path, title=method, n_bins=n_bins)  # its title gives N
        out[method] = path
    return out


RISK_COVERAGE = "risk_coverage.png"


def plot_risk_coverage(
    predictions: Mapping[str, Sequence[tuple[Tensor, Tensor]]], path: str | os.PathLike, title: str = ""
) -> Path:
    """Selective prediction: accuracy against coverage when each method abstains on its most
    uncertain examples first (by predictive entropy), its predictions pooled over tasks and
    seeds (:func:`pool_predictions`); the legend gives each method's AURC
    (:func:`abmll.uncertainty.aurc`). Returns the PNG path.

    Raises:
        ValueError: a method has no predictions.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from abmll.uncertainty import aurc, entropy, risk_coverage

    fig = Figure(figsize=(6, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for method, parts in predictions.items():
        probs, labels = pool_predictions(parts)
        uncertainty = entropy(probs)
        coverage, risk = risk_coverage(probs, labels, uncertainty)
        ax.plot(coverage.numpy(), (1 - risk).numpy(), label=f"{method} (AURC {aurc(probs, labels, uncertainty):.3f})")
    ax.set_xlabel("coverage (fraction answered, most certain first)")
    ax.set_ylabel("accuracy on the answered examples")
    ax.set_xlim(0, 1)
    ax.legend(loc="lower left", fontsize="small")
    ax.grid(alpha=0.3)
    return _save(fig, path, title)
