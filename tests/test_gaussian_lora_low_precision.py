"""A bf16 base model (CPU bf16): the KL, softplus, hyperprior and option log-probabilities stay
finite and close to float32 for extreme but legal values; KL, hyperprior and log-softmax are
accumulated in float32 whatever the dtype of the model or of the adapter tensors."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_tiny_llama
from test_meta import TOK, rule_task

from abmll.bayes_lora import BayesLoraConfig, BayesLoraModel
from abmll.gaussian_lora import HyperpriorConfig, inverse_softplus
from abmll.meta import predict_batches
from abmll.scoring import ScoringConfig, make_batches


def constant_params(model: BayesLoraModel, mean: float, std: float) -> dict[str, torch.Tensor]:
    """Every layer's M = mean and S = std exactly (rank-1 pairs of constant matrices)."""
    out = {}
    for L in model.layers:
        r = model.config.rank
        out[L.mean_B] = torch.zeros(L.d_out, r)
        out[L.mean_B][:, 0] = mean / L.scaling
        out[L.mean_A] = torch.zeros(r, L.d_in)
        out[L.mean_A][0] = 1.0
        out[L.scale_B] = torch.zeros(L.d_out, r)
        out[L.scale_B][:, 0] = inverse_softplus(std) - L.rho0
        out[L.scale_A] = torch.zeros(r, L.d_in)
        out[L.scale_A][0] = 1.0
    return out


def gaussian_kl(mq, sq, mp, sp):
    return math.log(sp / sq) + (sq**2 + (mq - mp) ** 2) / (2 * sp**2) - 0.5


EXTREMES = [(0.0, 1e-6, 50.0, 10.0), (50.0, 10.0, 0.0, 1e-6), (-50.0, 1e-6, 0.0, 1e-6), (1.0, 3e-3, -2.0, 0.1)]


@pytest.fixture(scope="module")
def bf16_model():
    return BayesLoraModel(make_tiny_llama().to(torch.bfloat16), BayesLoraConfig(rank=2))


@pytest.mark.parametrize("mq,sq,mp,sp", EXTREMES)
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
def test_kl_is_float32_finite_and_matches_the_closed_form(bf16_model, mq, sq, mp, sp, param_dtype):
    model = bf16_model
    q = {k: v.to(param_dtype) for k, v in constant_params(model, mq, sq).items()}
    p = {k: v.to(param_dtype) for k, v in constant_params(model, mp, sp).items()}
    kl = model.kl(q, p)
    assert kl.dtype == torch.float32 and torch.isfinite(kl)
    if param_dtype == torch.float32:
        expected = model.num_weight_entries() * gaussian_kl(mq, sq, mp, sp)
        assert kl.item() == pytest.approx(expected, rel=2e-3)
    else:  # the same bf16-rounded tensors, computed in float64, agree with the float32 KL
        ref = model.kl({k: v.double() for k, v in q.items()}, {k: v.double() for k, v in p.items()})
        assert kl.item() == pytest.approx(ref.item(), rel=2e-3)


@pytest.mark.parametrize("std", [1e-6, 1e-3, 1.0, 10.0])
def test_hyperprior_is_float32_and_finite_for_extreme_scales(bf16_model, std):
    theta = {k: v.bfloat16() for k, v in constant_params(bf16_model, 50.0, std).items()}
    value = bf16_model.neg_log_hyperprior(theta, HyperpriorConfig())
    assert value.dtype == torch.float32 and torch.isfinite(value)
    ref = bf16_model.neg_log_hyperprior({k: v.double() for k, v in theta.items()}, HyperpriorConfig())
    assert value.item() == pytest.approx(ref.item(), rel=1e-3)


def test_kl_gradients_stay_finite_at_extremes(bf16_model):
    q = {k: v.requires_grad_() for k, v in constant_params(bf16_model, 50.0, 1e-6).items()}
    p = {k: v.requires_grad_() for k, v in constant_params(bf16_model, 0.0, 10.0).items()}
    bf16_model.kl(q, p).backward()
    assert all(torch.isfinite(v.grad).all() for v in [*q.values(), *p.values()])


@pytest.mark.parametrize("n_samples", [0, 2])
def test_bf16_option_probabilities_are_finite_and_close_to_float32(n_samples):
    models = {dt: BayesLoraModel(make_tiny_llama().to(dt), BayesLoraConfig(rank=2)) for dt in (torch.float32, torch.bfloat16)}
    params = constant_params(models[torch.float32], 0.01, 1e-3)
    batches = make_batches(TOK, rule_task("t", 0, 8, "abcdefgh"), ScoringConfig(max_rows=6))
    probs = {}
    for dt, model in models.items():
        torch.manual_seed(0)
        probs[dt], _ = predict_batches(model, params, batches, n_samples)
    assert probs[torch.bfloat16].dtype == torch.float32 and torch.isfinite(probs[torch.bfloat16]).all()
    assert (probs[torch.bfloat16] - probs[torch.float32]).abs().max() < 0.02
