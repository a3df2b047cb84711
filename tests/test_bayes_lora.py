"""Gaussian LoRA: KL and hyperprior against torch.distributions, sampled-output moments (flipout and
per-batch), mean path = peft LoRA."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import make_tiny_llama
from peft import LoraConfig, get_peft_model
from torch.distributions import Gamma, Normal, kl_divergence

from abmll.bayes_lora import BayesLoraConfig, BayesLoraModel
from abmll.gaussian_lora import HyperpriorConfig, inverse_softplus, mean_matrix, std_matrix


def random_params(model: BayesLoraModel, seed: int, scale: float = 0.3, dtype=torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: scale * torch.randn(v.shape, generator=g, dtype=dtype) for k, v in model.init_params().items()}


def distributions(model: BayesLoraModel, params):
    """Per layer: (M, S) full matrices built independently of the library's KL code."""
    out = []
    for L in model.layers:
        M = L.scaling * params[L.mean_B] @ params[L.mean_A]
        S = torch.nn.functional.softplus(params[L.scale_B] @ params[L.scale_A] + L.rho0)
        out.append((M, S))
    return out


@pytest.mark.parametrize("chunk", [1 << 20, 40])
def test_kl_matches_torch_distributions(chunk):
    model = BayesLoraModel(make_tiny_llama(), BayesLoraConfig(rank=3, kl_chunk_elements=chunk))
    q, p = random_params(model, 1), random_params(model, 2)
    ref = sum(
        kl_divergence(Normal(Mq, Sq), Normal(Mp, Sp)).sum()
        for (Mq, Sq), (Mp, Sp) in zip(distributions(model, q), distributions(model, p))
    )
    got = model.kl(q, p)
    assert got.item() > 0
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)
    assert model.kl(q, q).abs().item() < 1e-3


def test_kl_gradients_match_reference_with_chunking():
    model = BayesLoraModel(make_tiny_llama(), BayesLoraConfig(rank=3, kl_chunk_elements=40))
    q = {k: v.requires_grad_() for k, v in random_params(model, 3, dtype=torch.float64).items()}
    p = {k: v.requires_grad_() for k, v in random_params(model, 4, dtype=torch.float64).items()}
    grads = torch.autograd.grad(model.kl(q, p), list(q.values()) + list(p.values()))
    ref = sum(
        kl_divergence(Normal(Mq, Sq), Normal(Mp, Sp)).sum()
        for (Mq, Sq), (Mp, Sp) in zip(distributions(model, q), distributions(model, p))
    )
    ref_grads = torch.autograd.grad(ref, list(q.values()) + list(p.values()))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-9)


def test_neg_log_hyperprior_matches_torch_distributions():
    model = BayesLoraModel(make_tiny_llama(), BayesLoraConfig(rank=2, kl_chunk_elements=50))
    theta = random_params(model, 5)
    hyper = HyperpriorConfig(mean_std=0.5, a0=2.0, b0=0.01)
    ref = 0.0
    for M, S in distributions(model, theta):
        ref = ref - Normal(0.0, hyper.mean_std).log_prob(M).sum()
        ref = ref - Gamma(hyper.a0, hyper.b0).log_prob(S.pow(-2)).sum()
    torch.testing.assert_close(model.neg_log_hyperprior(theta, hyper), ref, rtol=1e-5, atol=1e-2)


def test_initial_prior_has_zero_mean_and_std_c_times_std_w0():
    base = make_tiny_llama()
    w0 = base.model.layers[0].self_attn.q_proj.weight.detach().clone()
    model = BayesLoraModel(base, BayesLoraConfig(init_std_factor=0.2))
    theta = model.init_params()
    L = model.layers[0]
    assert torch.count_nonzero(mean_matrix(theta[L.mean_B], theta[L.mean_A], L.scaling)) == 0
    S = std_matrix(theta[L.scale_B], theta[L.scale_A], L.rho0)
    torch.testing.assert_close(S, torch.full_like(S, 0.2 * w0.std().item()), rtol=1e-5, atol=0)
    assert abs(inverse_softplus(torch.nn.functional.softplus(torch.tensor(0.37)).item()) - 0.37) < 1e-6


def test_initial_prior_depends_on_init_seed_not_on_the_global_rng():
    torch.manual_seed(1)
    first = BayesLoraModel(make_tiny_llama(), BayesLoraConfig(rank=2)).init_params()
    torch.manual_seed(2)
    torch.rand(7)
    second = BayesLoraModel(make_tiny_llama(), BayesLoraConfig(rank=2)).init_params()
    other = BayesLoraModel(make_tiny_llama(), BayesLoraConfig(rank=2, init_seed=1)).init_params()
    assert all(torch.equal(first[k], second[k]) for k in first)
    a_keys = [k for k in first if k.endswith(("lora_A.default.weight", "bayes_scale_A"))]
    assert a_keys and all(not torch.equal(first[k], other[k]) for k in a_keys)
    bound = 1 / math.sqrt(first[a_keys[0]].shape[1])  # Kaiming-uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in))
    assert all(first[k].abs().max() <= bound for k in a_keys) and first[a_keys[0]].abs().max() > 0.5 * bound


def _capture_layer0_q(model: BayesLoraModel):
    captured = []
    module = model.peft_model.get_submodule(model.layers[0].name)
    handle = module.register_forward_hook(lambda m, a, out: captured.append((a[0].detach(), out.detach())))
    return captured, handle


@pytest.mark.parametrize("sampling,rows,calls", [("flipout", 8, 500), ("per_batch", 1, 2000)])
def test_sampled_outputs_match_gaussian_weights(sampling, rows, calls):
    """Both samplers give each output the moments of x (W0 + dW)^T, dW ~ N(M, S^2) entrywise."""
    torch.manual_seed(0)
    model = BayesLoraModel(make_tiny_llama(), BayesLoraConfig(rank=2, init_std_factor=1.0, sampling=sampling))
    params = random_params(model, 6, scale=0.5)
    L = model.layers[0]
    base_w = model.peft_model.get_submodule(L.name).get_base_layer().weight.detach()
    captured, handle = _capture_layer0_q(model)
    ids = torch.tensor([[5, 17, 99, 42]] * rows)
    with torch.no_grad():
        for _ in range(calls):
            model(params, ids, sample=True)
    handle.remove()
    x = captured[0][0][0]  # (seq, d_in), same for all calls
    outs = torch.cat([out for _, out in captured])  # (calls * rows, seq, d_out)
    M = L.scaling * params[L.mean_B] @ params[L.mean_A]
    S = std_matrix(params[L.scale_B], params[L.scale_A], L.rho0)
    mean_ref = x @ (base_w + M).T
    var_ref = x.square() @ S.square().T
    n = outs.shape[0]
    # Monte Carlo tolerances: mean within 5 standard errors, variance within 15%.
    assert ((outs.mean(0) - mean_ref).abs() <= 5 * (var_ref / n).sqrt() + 1e-5).all()
    torch.testing.assert_close(outs.var(0), var_ref, rtol=0.15, atol=1e-6)


def test_flipout_sample_shared_along_sequence_and_differs_between_sequences():
    model = BayesLoraModel(make_tiny_llama(), BayesLoraConfig(rank=2, init_std_factor=1.0))
    params = random_params(model, 7)
    captured, handle = _capture_layer0_q(model)
    ids = torch.tensor([[9, 9, 9]] * 4)  # identical q_proj inputs at every position and row
    with torch.no_grad():
        model(params, ids, sample=True)
        model(params, ids, sample=True, groups=torch.tensor([0, 0, 1, 1]))
    handle.remove()
    out = captured[0][1]
    torch.testing.assert_close(out[:, 0], out[:, 1])  # same sample along a sequence
    torch.testing.assert_close(out[:, 0], out[:, 2])
    assert (out[0] - out[1]).abs().max() > 1e-3  # rows: different samples
    grouped = captured[1][1]
    torch.testing.assert_close(grouped[0], grouped[1])  # same group: same sample
    assert (grouped[1] - grouped[2]).abs().max() > 1e-3


def test_per_batch_sample_is_shared_by_all_rows_and_redrawn_each_call():
    model = BayesLoraModel(make_tiny_llama(), BayesLoraConfig(rank=2, init_std_factor=1.0, sampling="per_batch"))
    params = random_params(model, 7)
    captured, handle = _capture_layer0_q(model)
    ids = torch.tensor([[9, 9, 9]] * 4)
    with torch.no_grad():
        model(params, ids, sample=True)
        model(params, ids, sample=True)
        mean = model(params, ids).logits
    handle.remove()
    first, second = captured[0][1], captured[1][1]
    torch.testing.assert_close(first[0], first[3])  # one sample for the whole batch
    assert (first - second).abs().max() > 1e-3  # a new sample per forward
    assert (captured[2][1] - first).abs().max() > 1e-3  # sample=False: no noise
    assert mean.shape == (4, 3, model.peft_model.config.vocab_size)


def test_per_batch_equals_model_with_sampled_weight_and_gradients_reach_scale_pair():
    """sampling="per_batch" runs exactly W0 + M + S * E with E from torch's RNG, layer by layer,
    and the loss's gradient reaches the scale pair (through S) and the mean pair."""
    model = BayesLoraModel(make_tiny_llama(), BayesLoraConfig(rank=2, sampling="per_batch"))
    params = {k: v.requires_grad_() for k, v in random_params(model, 9, scale=0.2).items()}
    ids = torch.tensor([[3, 50, 7, 21], [4, 4, 8, 15]])
    torch.manual_seed(5)
    out = model(params, ids, sample=True).logits
    torch.manual_seed(5)
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for L in ref.layers:
            S = std_matrix(params[L.scale_B], params[L.scale_A], L.rho0)
            ref.peft_model.get_submodule(L.name).get_base_layer().weight.add_(S * torch.randn_like(S))
        expected = ref(params, ids).logits
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    out.logsumexp(-1).sum().backward()
    L = model.layers[0]
    for key in (L.scale_A, L.scale_B, L.mean_A, L.mean_B):
        assert params[key].grad is not None and params[key].grad.abs().max() > 0, key


def test_unknown_sampling_is_rejected():
    with pytest.raises(ValueError, match="sampling must be one of"):
        BayesLoraConfig(sampling="per_token")
    model = BayesLoraModel(make_tiny_llama(), BayesLoraConfig(rank=2))
    model.config.sampling = "per_token"  # changed after construction: refused, not run as flipout
    with pytest.raises(ValueError, match="sampling must be one of"):
        model(model.init_params(), torch.tensor([[3, 4]]), sample=True)


def test_posterior_mean_equals_plain_peft_lora():
    base = make_tiny_llama()
    plain = get_peft_model(copy.deepcopy(base), LoraConfig(r=3, lora_alpha=6, target_modules=["q_proj", "v_proj"]))
    model = BayesLoraModel(base, BayesLoraConfig(rank=3, alpha=6))
    params = random_params(model, 8)
    with torch.no_grad():
        for name, p in plain.named_parameters():
            if name in params:
                p.copy_(params[name])
    ids = torch.tensor([[3, 50, 7, 21, 99], [4, 4, 8, 15, 16]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ours = model(params, ids, mask).logits
        ref = plain(input_ids=ids, attention_mask=mask).logits
        sampled = model(params, ids, mask, sample=True).logits
    torch.testing.assert_close(ours, ref)
    assert (sampled - ref).abs().max() > 1e-4
    assert len(model.mean_keys()) == sum(1 for n in params if "lora_" in n)


def test_unmatched_target_modules_raise():
    with pytest.raises(ValueError, match="target_modules"):
        BayesLoraModel(make_tiny_llama(), BayesLoraConfig(target_modules=["no_such_proj"]))


def test_fused_kl_equals_plain_autograd_kl_in_value_and_gradient():
    """The closed-form-gradient KL (default) and the twice-differentiable one agree, with
    only q, only p, or both requiring grad."""
    model = BayesLoraModel(make_tiny_llama(), BayesLoraConfig(rank=3))
    for which in ("q", "p", "both"):
        q = {k: v.requires_grad_(which in ("q", "both")) for k, v in random_params(model, 7, dtype=torch.float64).items()}
        p = {k: v.requires_grad_(which in ("p", "both")) for k, v in random_params(model, 8, dtype=torch.float64).items()}
        leaves = [v for v in list(q.values()) + list(p.values()) if v.requires_grad]
        fused, plain = model.kl(q, p), model.kl(q, p, twice_differentiable=True)
        torch.testing.assert_close(fused, plain, rtol=1e-12, atol=1e-10)
        for g, r in zip(torch.autograd.grad(3.0 * fused, leaves), torch.autograd.grad(3.0 * plain, leaves)):
            torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------ numerics over the legal range
PRE = [-1000.0, -300.0, -120.0, -50.0, -20.5, -19.5, -5.0, 0.0, 5.0, 50.0, 300.0, 1000.0]
"""Scale pre-activations B_s A_s + rho0 from -1e3 to 1e3 (both sides of log_softplus's switch)."""


def _mp_log_softplus(x):
    import mpmath

    return mpmath.log(mpmath.log1p(mpmath.exp(x)))


def _mp_reference(pq: float, pp: float, d: float, n: int) -> dict:
    """KL(N(d, Sq^2) || N(0, Sp^2)), the hyperprior of N(d, Sq^2) (mean_std 1, Gamma(1, 0.01))
    and their gradients, for a row of ``n`` equal entries, in 50-digit arithmetic."""
    import mpmath

    mpmath.mp.dps = 50
    pq, pp, d = mpmath.mpf(pq), mpmath.mpf(pp), mpmath.mpf(d)
    lq, lp = _mp_log_softplus(pq), _mp_log_softplus(pp)
    dls = lambda x: mpmath.diff(_mp_log_softplus, x)  # noqa: E731
    ratio = mpmath.exp(2 * (lq - lp))
    return {
        "kl": n * (lp - lq + ratio / 2 + d**2 * mpmath.exp(-2 * lp) / 2 - mpmath.mpf(1) / 2),
        "kl_scale_q": n * (ratio - 1) * dls(pq),
        "kl_mean_q": n * d * mpmath.exp(-2 * lp),
        "hyper": n
        * (d**2 / 2 + mpmath.log(2 * mpmath.pi) / 2 - mpmath.log(mpmath.mpf("0.01")) + mpmath.mpf("0.01") * mpmath.exp(-2 * lq)),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kl_hyperprior_and_scale_stay_finite_over_the_legal_range(dtype):
    """For every pair of scale pre-activations in [-1e3, 1e3] (and mean differences 0 and 0.01),
    with the adapter tensors in fp32, bf16 or fp16: KL(q || p), the hyperprior, the sampling
    scale S and their gradients are finite, and within 1e-4 (values) / 1e-2 (gradients,
    rounded to the tensors' dtype) of a 50-digit reference, wherever that reference fits the
    dtype's range (fp32 for the values, which are accumulated in fp32). The direct log(softplus)
    gives -inf below about -104 in fp32 (the KL at -120 was inf, its gradient NaN)."""
    model = BayesLoraModel(make_tiny_llama(), BayesLoraConfig(rank=1, alpha=1.0, target_modules=["q_proj"], top_layers=1))
    (L,) = model.layers
    n, rows = L.d_in, L.d_out
    big_value, big_grad = 1e30, torch.finfo(dtype).max / 10
    cases = []
    for pq in PRE:
        for pp in PRE:
            for d in (0.0, 0.01):
                ref = _mp_reference(pq, pp, d, n)
                if abs(ref["kl"]) < big_value and abs(ref["kl_scale_q"]) < big_grad and abs(ref["kl_mean_q"]) < big_grad:
                    cases.append((pq, pp, d, ref))
    assert len(cases) > (120 if dtype == torch.float16 else 200)  # most of the grid (fp16's range is narrower)
    assert any(pq == -120.0 and pp == 0.0 for pq, pp, _, _ in cases)
    for start in range(0, len(cases), rows):
        chunk = cases[start : start + rows]
        chunk = chunk + [chunk[0]] * (rows - len(chunk))  # pad with a repeat (counted below)
        col = lambda values: torch.tensor(values, dtype=torch.float64).unsqueeze(1).to(dtype)  # noqa: E731
        ones = torch.ones(1, n, dtype=dtype)
        q = {
            L.mean_B: col([d for _, _, d, _ in chunk]).requires_grad_(),
            L.mean_A: ones,
            L.scale_B: col([pq - L.rho0 for pq, _, _, _ in chunk]).requires_grad_(),
            L.scale_A: ones,
        }
        p = {
            L.mean_B: torch.zeros(rows, 1, dtype=dtype),
            L.mean_A: ones,
            L.scale_B: col([pp - L.rho0 for _, pp, _, _ in chunk]),
            L.scale_A: ones,
        }
        kl = model.kl(q, p)
        kl.backward()
        assert torch.isfinite(kl)
        g_scale, g_mean = q[L.scale_B].grad.double().squeeze(1), q[L.mean_B].grad.double().squeeze(1)
        assert torch.isfinite(g_scale).all() and torch.isfinite(g_mean).all()
        # the inputs as rounded to the dtype: the reference is taken at the values actually stored
        stored = [
            _mp_reference(
                float(q[L.scale_B][i].detach()) + L.rho0, float(p[L.scale_B][i]) + L.rho0, float(q[L.mean_B][i].detach()), n
            )
            for i in range(rows)
        ]
        assert kl.item() == pytest.approx(float(sum(r["kl"] for r in stored)), rel=1e-4, abs=1e-3)
        for i, r in enumerate(stored):
            assert g_scale[i].item() == pytest.approx(float(r["kl_scale_q"]), rel=1e-2, abs=1e-4), (i, chunk[i][:3])
            assert g_mean[i].item() == pytest.approx(float(r["kl_mean_q"]), rel=1e-2, abs=1e-4), (i, chunk[i][:3])
    # the hyperprior of theta, at every pre-activation where its value (b0 / S^2 grows as S -> 0) fits
    # (and its gradient, about twice as large, fits the tensors' dtype)
    fit = [x for x in PRE if abs(_mp_reference(x, 0.0, 0.01, n)["hyper"]) < min(big_value, big_grad / 4)]
    assert 1000.0 in fit and (dtype == torch.float16 or -20.5 in fit)
    theta = {
        L.mean_B: torch.full((rows, 1), 0.01, dtype=dtype),
        L.mean_A: torch.ones(1, n, dtype=dtype),
        L.scale_B: torch.tensor([fit[i % len(fit)] - L.rho0 for i in range(rows)], dtype=torch.float64).unsqueeze(1).to(dtype),
        L.scale_A: torch.ones(1, n, dtype=dtype),
    }
    theta[L.scale_B].requires_grad_()
    hyper = model.neg_log_hyperprior(theta, HyperpriorConfig())
    hyper.backward()
    want = sum(
        _mp_reference(float(theta[L.scale_B][i].detach()) + L.rho0, 0.0, float(theta[L.mean_B][i]), n)["hyper"]
        for i in range(rows)
    )
    assert hyper.item() == pytest.approx(float(want), rel=1e-4) and torch.isfinite(theta[L.scale_B].grad).all()
    pre = torch.tensor(PRE, dtype=dtype).unsqueeze(1).requires_grad_()
    S = std_matrix(pre, torch.ones(1, 3, dtype=dtype), 0.0)
    S.sum().backward()
    assert torch.isfinite(S).all() and (S >= 0).all() and torch.isfinite(pre.grad).all()
