"""The Gaussian-LoRA maths: the mean and std matrices of a layer's four LoRA matrices, the KL
between two such Gaussians and the ABML hyperprior, each in closed form, computed in row
blocks (method doc, "Generative model" and "Meta-objective"; Ravi & Beatson 2019):

    M = (alpha / r) * B_mu @ A_mu,   S = softplus(B_s @ A_s + rho0)

:class:`abmll.bayes_lora.BayesLoraModel` sums :func:`layer_kl` and
:func:`layer_neg_log_hyperprior` over its adapted layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from abmll.checks import above
from abmll.roles import OUTER, setting


@dataclass
class HyperpriorConfig:
    """Hyperprior p(theta) of ABML: N(0, mean_std^2) on each entry of M_theta and
    Gamma(a0, b0) (shape, rate) on each precision 1 / S_theta^2.

    Attributes:
        mean_std: std of the zero-mean Gaussian on each mean entry (weight units).
        a0: Gamma shape on each precision.
        b0: Gamma rate on each precision (weight units squared).
    """

    mean_std: float = setting(1.0, role=OUTER)
    a0: float = setting(1.0, role=OUTER)
    b0: float = setting(0.01, role=OUTER)

    def __post_init__(self) -> None:
        above(self, ("mean_std", "a0", "b0"), 0)


def inverse_softplus(y: float) -> float:
    """softplus^-1(y) = log(exp(y) - 1) for y > 0, computed stably."""
    if y <= 0:
        raise ValueError(f"inverse_softplus needs y > 0, got {y}")
    return y + math.log(-math.expm1(-y))


def mean_matrix(B: Tensor, A: Tensor, scaling: float) -> Tensor:
    """M = scaling * B @ A. B: (d_out, r), A: (r, d_in) -> (d_out, d_in)."""
    return scaling * (B @ A)


def std_matrix(B: Tensor, A: Tensor, rho0: float) -> Tensor:
    """S = softplus(B @ A + rho0) >= 0. B: (d_out, r), A: (r, d_in) -> (d_out, d_in). Finite for
    every finite pre-activation (it underflows to 0 below about -104 in float32)."""
    return F.softplus(B @ A + rho0)


_LOG_SOFTPLUS_SWITCH = -20.0
"""Below this pre-activation log(softplus(x)) is computed as x - exp(x) / 2 (its series,
exact to O(exp(2x)) ~ 4e-18), so it stays finite where softplus itself underflows to 0."""


def log_softplus(x: Tensor) -> Tensor:
    """log(softplus(x)) = log(log(1 + exp(x))), elementwise, finite for every finite x (the
    direct form is -inf below about -104 in float32, where softplus underflows). Twice
    differentiable; its derivative is :func:`dlog_softplus`."""
    small = x < _LOG_SOFTPLUS_SWITCH
    lo = x.clamp(max=_LOG_SOFTPLUS_SWITCH)
    hi = x.clamp(min=_LOG_SOFTPLUS_SWITCH)
    return torch.where(small, lo - 0.5 * torch.exp(lo), torch.log(F.softplus(hi)))


def dlog_softplus(x: Tensor) -> Tensor:
    """d log(softplus(x)) / dx = sigmoid(x) / softplus(x), finite for every finite x (1 - exp(x) / 2
    below :data:`_LOG_SOFTPLUS_SWITCH`, where both factors underflow)."""
    small = x < _LOG_SOFTPLUS_SWITCH
    hi = x.clamp(min=_LOG_SOFTPLUS_SWITCH)
    return torch.where(small, 1 - 0.5 * torch.exp(x.clamp(max=_LOG_SOFTPLUS_SWITCH)), torch.sigmoid(hi) / F.softplus(hi))


def log_std_matrix(B: Tensor, A: Tensor, rho0: float) -> Tensor:
    """log S = log softplus(B @ A + rho0), computed stably (:func:`log_softplus`)."""
    return log_softplus(B @ A + rho0)


def _inv_std(log_s: Tensor) -> Tensor:
    """1 / S from log S, capped at the dtype's largest finite value (so 0 * (1 / S) stays 0
    where S underflows; a nonzero mean difference over such an S is genuinely out of range)."""
    return torch.exp(-log_s).clamp(max=torch.finfo(log_s.dtype).max)


def _gaussian_kl_block(
    Bq: Tensor,
    Aq: Tensor,
    Bsq: Tensor,
    Asq: Tensor,
    Bp: Tensor,
    Ap: Tensor,
    Bsp: Tensor,
    Asp: Tensor,
    scaling: float,
    rho0: float,
) -> Tensor:
    """Sum over a row block of KL(N(Mq, Sq^2) || N(Mp, Sp^2)), elementwise Gaussians, in plain
    autograd ops (twice differentiable: used by the second-order reference). log S is
    computed stably (:func:`log_std_matrix`), so the KL is finite wherever its value is."""
    diff = mean_matrix(torch.cat([Bq, -Bp], 1), torch.cat([Aq, Ap], 0), scaling)  # Mq - Mp in one matmul
    log_sq = log_std_matrix(Bsq, Asq, rho0)
    log_sp = log_std_matrix(Bsp, Asp, rho0)
    # log(sp / sq) + (sq^2 + diff^2) / (2 sp^2) - 1/2, with sq^2 / sp^2 = exp(2 (log_sq - log_sp))
    scaled = diff * _inv_std(log_sp)
    return (log_sp - log_sq + 0.5 * torch.exp(2 * (log_sq - log_sp)) + 0.5 * scaled.square() - 0.5).sum()


class _FusedGaussianKL(torch.autograd.Function):
    """:func:`_gaussian_kl_block` with its gradient in closed form, computed in the forward
    pass: with D = Mq - Mp, pre = B_s @ A_s + rho0, S = softplus(pre), r = Sq^2 / Sp^2,
    l(pre) = d log S / d pre = sigmoid(pre) / S,

        dKL/dMq = -dKL/dMp = D / Sp^2,
        dKL/dpre_q = (r - 1) * l(pre_q),
        dKL/dpre_p = (1 - r - D^2 / Sp^2) * l(pre_p),

    then chained to the LoRA factors by four small matmuls. r and log r come from log S
    (:func:`log_softplus`), so value and gradients stay finite where S underflows.
    Fewer full-matrix passes and buffers than autograd's graph of the same expression (the
    inner loop's hot spot beside the model). Once differentiable."""

    @staticmethod
    def forward(ctx, Bq, Aq, Bsq, Asq, Bp, Ap, Bsp, Asp, scaling: float, rho0: float):
        diff = mean_matrix(torch.cat([Bq, -Bp], 1), torch.cat([Aq, Ap], 0), scaling)
        pre_q, pre_p = (Bsq @ Asq).add_(rho0), (Bsp @ Asp).add_(rho0)
        log_sq, log_sp = log_softplus(pre_q), log_softplus(pre_p)
        log_ratio = (log_sq - log_sp).mul_(2)  # log(Sq^2 / Sp^2)
        ratio = log_ratio.exp()
        inv_sp = _inv_std(log_sp)
        scaled = diff.mul_(inv_sp)  # D / Sp
        diff2 = scaled.square()  # D^2 / Sp^2
        kl = 0.5 * (ratio.sum() + diff2.sum() - log_ratio.sum() - ratio.numel())
        need = ctx.needs_input_grad
        g_mean = scaled.mul_(inv_sp).mul_(scaling) if any(need[:2] + need[4:6]) else None
        g_pre_q = (ratio - 1).mul_(dlog_softplus(pre_q)) if any(need[2:4]) else None
        g_pre_p = ratio.add_(diff2).sub_(1).neg_().mul_(dlog_softplus(pre_p)) if any(need[6:8]) else None
        ctx.save_for_backward(Bq, Aq, Bsq, Asq, Bp, Ap, Bsp, Asp, g_mean, g_pre_q, g_pre_p)
        return kl

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        Bq, Aq, Bsq, Asq, Bp, Ap, Bsp, Asp, g_mean, g_pre_q, g_pre_p = ctx.saved_tensors
        need = ctx.needs_input_grad
        out = [None] * 10
        for i, (B, A, g, sign) in enumerate(
            ((Bq, Aq, g_mean, 1), (Bsq, Asq, g_pre_q, 1), (Bp, Ap, g_mean, -1), (Bsp, Asp, g_pre_p, 1))
        ):
            if need[2 * i]:
                out[2 * i] = (sign * grad) * (g @ A.T)
            if need[2 * i + 1]:
                out[2 * i + 1] = (sign * grad) * (B.T @ g)
        return tuple(out)


def _neg_log_hyperprior_block(
    B: Tensor,
    A: Tensor,
    Bs: Tensor,
    As: Tensor,
    scaling: float,
    rho0: float,
    mean_std: float,
    a0: float,
    b0: float,
) -> Tensor:
    """Sum over a row block of -log N(M; 0, mean_std^2) - log Gamma(1/S^2; a0, b0), with
    log S computed stably (:func:`log_std_matrix`)."""
    m = mean_matrix(B, A, scaling)
    log_prec = -2 * log_std_matrix(Bs, As, rho0)
    nlp_mean = 0.5 * (m / mean_std).square() + math.log(mean_std) + 0.5 * math.log(2 * math.pi)
    nlp_prec = -(a0 * math.log(b0) - math.lgamma(a0) + (a0 - 1) * log_prec - b0 * log_prec.exp())
    return (nlp_mean + nlp_prec).sum()


def _row_blocks(d_out: int, d_in: int, max_elements: int) -> list[tuple[int, int]]:
    rows = max(1, max_elements // d_in)
    return [(i, min(i + rows, d_out)) for i in range(0, d_out, rows)]


def _blockwise(fn, blocks: list[tuple[int, int]], *args):
    """``fn`` on one block as is; on several, each block is recomputed in backward
    (activation checkpointing) so only one block's intermediates are alive at a time."""
    if len(blocks) == 1:
        return fn(*args)
    return checkpoint(fn, *args, use_reentrant=False)


def layer_kl(
    q: tuple[Tensor, Tensor, Tensor, Tensor],
    p: tuple[Tensor, Tensor, Tensor, Tensor],
    scaling: float,
    rho0: float,
    max_elements: int,
    twice_differentiable: bool = False,
) -> Tensor:
    """KL(q || p) between one layer's two Gaussian-LoRA distributions, summed over its
    d_out x d_in weight entries (nats, a float32 scalar at least).

    Args:
        q, p: each (B_mu (d_out, r), A_mu (r, d_in), B_s (d_out, r), A_s (r, d_in)).
        scaling: alpha / r; rho0: the std offset softplus^-1(c std(W0)).
        max_elements: row blocks of at most about this many entries, each recomputed during
            backward (activation checkpointing); one block when the layer is smaller.
        twice_differentiable: plain autograd ops (for ``create_graph``) instead of the fused
            closed-form gradient.
    """
    fn = _gaussian_kl_block if twice_differentiable else _FusedGaussianKL.apply
    (Bq, Aq, Bsq, Asq), (Bp, Ap, Bsp, Asp) = q, p
    blocks = _row_blocks(Bq.shape[0], Aq.shape[1], max_elements)
    total = 0.0
    for i, j in blocks:
        total = total + _blockwise(fn, blocks, Bq[i:j], Aq, Bsq[i:j], Asq, Bp[i:j], Ap, Bsp[i:j], Asp, scaling, rho0)
    return total


def layer_neg_log_hyperprior(
    theta: tuple[Tensor, Tensor, Tensor, Tensor], scaling: float, rho0: float, hyper: HyperpriorConfig, max_elements: int
) -> Tensor:
    """-log p(theta) of one layer: N(0, mean_std^2) on each entry of M and Gamma(a0, b0) on
    each precision 1 / S^2, summed over its entries (nats). ``theta`` as ``q`` of
    :func:`layer_kl`; row blocks as there."""
    B, A, Bs, As = theta
    blocks = _row_blocks(B.shape[0], A.shape[1], max_elements)
    total = 0.0
    for i, j in blocks:
        total = total + _blockwise(
            _neg_log_hyperprior_block, blocks, B[i:j], A, Bs[i:j], As, scaling, rho0, hyper.mean_std, hyper.a0, hyper.b0
        )
    return total
