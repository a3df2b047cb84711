"""The calibration baselines, each against an independent computation: temperature
scaling against its closed form, the support's k-fold temperature against adapting on each
fold by hand, a deep ensemble of identical members against one member, MC dropout at rate 0
against plain LoRA, and the diagonal Laplace GGN against a brute-force Jacobian."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from conftest import make_tiny_llama
from test_meta import random_theta, rule_task, task_batches

import abmll.evaluate as evaluate_module
from abmll.bayes_lora import BayesLoraConfig, BayesLoraModel
from abmll.config import EvalArgs, TaskArgs
from abmll.episodes import episode_batches, kfold_split
from abmll.evaluate import member_prior, predict_method, run_method
from abmll.laplace import ggn_diagonal, linearised_scores, log_marginal_likelihood, posterior_std, prior_precision
from abmll.mc_dropout import lora_dropout
from abmll.meta import MetaConfig, adapt, predict_samples
from abmll.methods import make_method
from abmll.models import load_base_model
from abmll.scoring import ScoringConfig, option_scores
from abmll.temperature import apply_temperature, fit_temperature, tempered_nll

pytestmark = pytest.mark.usefixtures("one_thread")  # other jobs share the 2 cores


# -- temperature scaling ----------------------------------------------------------------------


def test_fitted_temperature_is_the_closed_form_on_a_two_class_toy_set():
    # every example: p(class 0) = sigmoid(d); a share q of the labels is class 0. The tempered
    # NLL -q log s(d/T) - (1-q) log(1 - s(d/T)) is least where s(d/T) = q: T = d / logit(q).
    d, q = 2.0, 0.75
    p0 = torch.sigmoid(torch.tensor(d))
    probs = torch.tensor([[p0, 1 - p0]]).repeat(8, 1)
    labels = torch.tensor([0] * 6 + [1] * 2)
    t = fit_temperature(probs, labels)
    assert t == pytest.approx(d / math.log(q / (1 - q)), rel=1e-5)
    assert tempered_nll(probs, labels, t) < tempered_nll(probs, labels, 1.0)


def test_temperature_keeps_padding_and_the_argmax_and_refuses_bad_input():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.9, 0.0]])  # the second example has 2 options
    for t in (0.3, 1.0, 4.0):
        out = apply_temperature(probs, t)
        assert out[1, 2] == 0 and torch.allclose(out.sum(-1), torch.ones(2))
        assert torch.equal(out.argmax(-1), probs.argmax(-1))
    torch.testing.assert_close(apply_temperature(probs, 1.0), probs)
    sharp = apply_temperature(probs, 0.5)  # softmax(2 log p) = p^2 / sum p^2
    torch.testing.assert_close(sharp[0], probs[0] ** 2 / (probs[0] ** 2).sum())
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            apply_temperature(probs, bad)
    with pytest.raises(ValueError, match="no held-out"):
        fit_temperature(probs[:0], torch.tensor([], dtype=torch.long))
    with pytest.raises(ValueError, match="not among"):
        fit_temperature(probs, torch.tensor([0, 3]))


def test_kfold_split_holds_each_example_out_once_stratified():
    examples = rule_task("t", 0, 16, "abcdefgh")  # labels alternate: 8 of each class
    splits = kfold_split(examples, 4, seed=3)
    held = [e.source for _, h in splits for e in h]
    assert sorted(held) == sorted(e.source for e in examples)
    for rest, h in splits:
        assert len(h) == 4 and [e.label for e in h].count(1) == 2  # each fold: 2 of each class
        assert {e.source for e in rest} == {e.source for e in examples} - {e.source for e in h}
    assert kfold_split(examples, 4, seed=3) == splits and kfold_split(examples, 4, seed=4) != splits
    for bad in (1, 17):
        with pytest.raises(ValueError, match="folds"):
            kfold_split(examples, bad, seed=0)


# -- on a tiny model -----------------------------------------------------------------------------


@pytest.fixture
def world(tiny_model_dir, tiny_data_dir):
    base, tok = load_base_model(str(tiny_model_dir))
    model = BayesLoraModel(base, BayesLoraConfig(rank=2))
    tasks = TaskArgs(data_dir=str(tiny_data_dir), split="tiny", k=4, data_seeds=[1, 2], max_query=4)
    scoring = ScoringConfig(max_rows=8)
    meta = MetaConfig(inner_steps=1, inner_lr=0.3, beta=1e-4)
    ev = EvalArgs(test_steps=2, eval_samples=3, max_test=6, ensemble_members=3, support_folds=2)
    ep = episode_batches(model, tok, "h0", 1, tasks, scoring, "test", ev.max_test, folds=2)
    return dict(model=model, tok=tok, meta=meta, ev=ev, ep=ep)


def lora_probs(w, prior):
    """Plain LoRA written out: adapt deterministically from ``prior``, predict with the mean."""
    torch.manual_seed(1)
    post, _ = adapt(
        w["model"],
        prior,
        w["ep"].support,
        w["ev"].test_steps,
        w["meta"].inner_lr,
        beta=0.0,
        n_samples=0,
        grad_clip=w["meta"].inner_grad_clip,
    )
    return predict_samples(w["model"], post, w["ep"].query, 0)[0][0]


def test_support_temperature_is_fitted_on_the_held_out_folds_only(world):
    w = world
    init = w["model"].init_params()
    metrics, probs, _ = run_method(w["model"], make_method("lora_ts_support", init, w["ev"]), w["ep"], w["meta"], seed=1)
    held_probs, held_labels = [], []
    for fold in w["ep"].folds:  # by hand: adapt on the rest of the support, predict the fold
        torch.manual_seed(1)
        post, _ = adapt(
            w["model"],
            init,
            fold.support,
            w["ev"].test_steps,
            w["meta"].inner_lr,
            beta=0.0,
            n_samples=0,
            grad_clip=w["meta"].inner_grad_clip,
        )
        p, y = predict_samples(w["model"], post, fold.query, 0)
        p = p[0]
        held_probs.append(p)
        held_labels.append(y)
    t = fit_temperature(torch.cat(held_probs), torch.cat(held_labels))
    assert metrics["temperature"] == pytest.approx(t, rel=1e-4)
    torch.testing.assert_close(
        probs, apply_temperature(lora_probs(w, init), metrics["temperature"]), rtol=1e-4, atol=1e-5, msg=str(t)
    )
    no_folds = replace(w["ep"], folds=[])
    with pytest.raises(ValueError, match="k-fold"):
        run_method(w["model"], make_method("lora_ts_support", init, w["ev"]), no_folds, w["meta"], seed=1)


def test_dev_calibrated_method_needs_its_temperature_and_applies_it(world):
    w = world
    init = w["model"].init_params()
    with pytest.raises(ValueError, match="temperature"):
        make_method("lora_ts", init, w["ev"])
    _, probs, _ = run_method(w["model"], make_method("lora_ts", init, w["ev"], temperature=2.5), w["ep"], w["meta"], seed=1)
    torch.testing.assert_close(probs, apply_temperature(lora_probs(w, init), 2.5), rtol=1e-4, atol=1e-5)


def test_ensemble_of_identical_members_is_one_member_and_members_pool(world, monkeypatch):
    w = world
    init = w["model"].init_params()
    method = make_method("lora_ensemble", init, w["ev"])
    assert method.members == 3 and method.samples == 0
    samples, _ = predict_method(w["model"], method, w["ep"], w["meta"], seed=1)
    assert samples.shape[0] == 3
    # independently: each member adapted by hand from its own redrawn init, then averaged
    by_hand = torch.stack([lora_probs(w, member_prior(w["model"], init, m)) for m in range(3)])
    torch.testing.assert_close(samples, by_hand, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(samples[0], samples[1])  # the members differ
    monkeypatch.setattr(evaluate_module, "member_prior", lambda model, prior, member: prior)
    _, same, _ = run_method(w["model"], method, w["ep"], w["meta"], seed=1)
    _, one, _ = run_method(w["model"], make_method("lora", init, w["ev"]), w["ep"], w["meta"], seed=1)
    torch.testing.assert_close(same, one, rtol=1e-5, atol=1e-6)


def test_member_prior_redraws_only_the_mean_A_matrices(world):
    model = world["model"]
    init = model.init_params()
    assert member_prior(model, init, 0) is init
    one, again, two = (member_prior(model, init, m) for m in (1, 1, 2))
    for layer in model.layers:
        assert not torch.equal(one[layer.mean_A], init[layer.mean_A]) and not torch.equal(one[layer.mean_A], two[layer.mean_A])
        assert torch.equal(one[layer.mean_A], again[layer.mean_A])
        assert one[layer.mean_A].abs().max() <= 1 / math.sqrt(layer.d_in)  # Kaiming-uniform's bound
        for key in (layer.mean_B, layer.scale_A, layer.scale_B):
            assert torch.equal(one[key], init[key])


def test_mc_dropout_at_rate_zero_is_plain_lora_and_is_random_above(world):
    w = world
    init = w["model"].init_params()
    off = make_method("lora_mc_dropout", init, replace(w["ev"], lora_dropout=0.0))
    assert off.samples == 3 and off.dropout == 0.0
    metrics, probs, _ = run_method(w["model"], off, w["ep"], w["meta"], seed=1)
    torch.testing.assert_close(probs, lora_probs(w, init), rtol=1e-5, atol=1e-6)
    assert metrics["mean_epistemic"] == pytest.approx(0.0, abs=1e-6)  # no weight noise either
    on = make_method("lora_mc_dropout", init, replace(w["ev"], lora_dropout=0.5))
    samples, _ = predict_method(w["model"], on, w["ep"], w["meta"], seed=1)
    assert samples.shape[0] == 3 and not torch.allclose(samples[0], samples[1])
    layer = w["model"].peft_model.get_submodule(w["model"].layers[0].name)
    assert isinstance(layer.lora_dropout["default"], torch.nn.Identity)  # restored after
    with pytest.raises(ValueError, match="dropout rate"):
        with lora_dropout(w["model"], 1.0):
            pass
    with pytest.raises(ValueError, match="lora_dropout"):
        EvalArgs(lora_dropout=-0.1)


@pytest.mark.parametrize("name", ["laplace_lora", "laplace_lora_lin"])
def test_laplace_lora_runs_and_a_huge_prior_precision_gives_plain_lora(world, monkeypatch, name):
    w = world
    init = w["model"].init_params()
    method = make_method(name, init, w["ev"])
    assert method.laplace == {"laplace_lora": "sampled", "laplace_lora_lin": "linearised"}[name] and method.samples == 3
    samples, _ = predict_method(w["model"], method, w["ep"], w["meta"], seed=1)
    assert samples.shape[0] == 3 and not torch.allclose(samples[0], samples[1])
    monkeypatch.setattr(evaluate_module, "prior_precision", lambda fisher, theta, mean: 1e12)
    _, probs, _ = run_method(w["model"], method, w["ep"], w["meta"], seed=1)
    torch.testing.assert_close(probs, lora_probs(w, init), rtol=1e-4, atol=1e-5)
    base = w["model"].peft_model.get_base_model()
    assert base.config._attn_implementation == "sdpa"  # the linearised predictive restores it


# -- the Laplace pieces against brute force -------------------------------------------------------


def test_ggn_diagonal_matches_the_brute_force_jacobian_form():
    torch.manual_seed(0)
    model = BayesLoraModel(make_tiny_llama(), BayesLoraConfig(rank=2))
    theta = {k: v.detach() for k, v in random_theta(model, seed=1).items()}
    batches = task_batches("t", 0, n_support=5).support
    keys = model.mean_keys()
    fisher = ggn_diagonal(model, theta, batches, keys)
    shapes = [theta[k].shape for k in keys]
    sizes = [s.numel() for s in shapes]
    flat = torch.cat([theta[k].reshape(-1) for k in keys])
    expected = torch.zeros_like(flat)
    for batch in batches:

        def scores(vec, batch=batch):
            parts = dict(zip(keys, (p.reshape(s) for p, s in zip(vec.split(sizes), shapes, strict=True)), strict=True))
            return option_scores(lambda groups=None, **kw: model({**theta, **parts}, **kw).logits, batch)

        z = scores(flat).detach()
        jac = torch.autograd.functional.jacobian(scores, flat)  # (N, C, P): d score / d theta
        for n in range(batch.num_examples):
            p = torch.softmax(z[n], -1)
            h = torch.diag(p) - torch.outer(p, p)  # the softmax NLL's Hessian in the scores
            expected += torch.einsum("ci,cd,di->i", jac[n], h, jac[n])  # diag(J^T H J)
    got = torch.cat([fisher[k].reshape(-1) for k in keys])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-7)
    assert (got > 0).any()


@pytest.mark.parametrize("top_layers", [0, 1])  # 1: the frozen layers' cache in the forward pass
def test_linearised_scores_are_the_scores_plus_the_brute_force_jacobian_times_the_offset(top_layers):
    torch.manual_seed(0)
    model = BayesLoraModel(make_tiny_llama(), BayesLoraConfig(rank=2, top_layers=top_layers))
    assert (model.frozen_cache is not None) == bool(top_layers)
    theta = {k: v.detach() for k, v in random_theta(model, seed=1).items()}
    batch = task_batches("t", 0, n_support=5).support[0]
    keys = model.mean_keys()
    g = torch.Generator().manual_seed(2)
    offsets = [{k: 0.1 * torch.randn(theta[k].shape, generator=g) for k in keys} for _ in range(2)]
    got = linearised_scores(model, theta, batch, offsets)
    shapes = [theta[k].shape for k in keys]
    sizes = [s.numel() for s in shapes]

    def scores(vec):
        parts = dict(zip(keys, (p.reshape(s) for p, s in zip(vec.split(sizes), shapes, strict=True)), strict=True))
        return option_scores(lambda groups=None, **kw: model({**theta, **parts}, **kw).logits, batch)

    flat = torch.cat([theta[k].reshape(-1) for k in keys])
    jac = torch.autograd.functional.jacobian(scores, flat)  # (N, C, P), through SDPA attention
    z = scores(flat).detach()
    assert got.shape == (2, *z.shape)
    for d, offset in enumerate(offsets):
        expected = z + jac @ torch.cat([offset[k].reshape(-1) for k in keys])
        torch.testing.assert_close(got[d], expected, rtol=1e-4, atol=1e-5)
    # linear in the offset: its scores differ from the network's at theta + offset
    moved = scores(flat + torch.cat([offsets[0][k].reshape(-1) for k in keys])).detach()
    assert not torch.allclose(got[0], moved, atol=1e-4)
    with pytest.raises(ValueError, match="offsets"):
        linearised_scores(model, theta, batch, [])


def test_prior_precision_maximises_the_laplace_marginal_likelihood():
    g = torch.Generator().manual_seed(0)
    fisher = {"a": torch.rand(50, generator=g) * 10, "b": torch.rand(3, 4, generator=g)}
    theta = {"a": torch.randn(50, generator=g) * 0.3, "b": torch.randn(3, 4, generator=g), "other": torch.ones(2)}
    lam = prior_precision(fisher, theta)
    best = log_marginal_likelihood(-5.0, fisher, theta, lam)
    for factor in (0.5, 0.9, 0.99, 1.01, 1.1, 2.0):  # a maximum: every nearby value is lower
        assert log_marginal_likelihood(-5.0, fisher, theta, lam * factor) < best
    # the stationarity condition sum F / (lambda (F + lambda)) = |theta|^2, by hand
    F = torch.cat([fisher["a"], fisher["b"].reshape(-1)]).double()
    sq = float(theta["a"].double().pow(2).sum() + theta["b"].double().pow(2).sum())
    assert float((F / (lam * (F + lam))).sum()) == pytest.approx(sq, rel=1e-6)
    mean = {"a": torch.randn(50, generator=g) * 0.3, "b": torch.randn(3, 4, generator=g)}  # theta0 != 0
    centred = prior_precision(fisher, theta, mean)
    off = float((theta["a"] - mean["a"]).double().pow(2).sum() + (theta["b"] - mean["b"]).double().pow(2).sum())
    assert float((F / (centred * (F + centred))).sum()) == pytest.approx(off, rel=1e-6)
    assert log_marginal_likelihood(-5.0, fisher, theta, centred, mean) > log_marginal_likelihood(
        -5.0, fisher, theta, centred * 1.1, mean
    )
    assert prior_precision(fisher, theta, theta) == pytest.approx(1e8)  # theta* at the prior mean: the tightest
    zero = {k: torch.zeros_like(v) for k, v in fisher.items()}
    assert prior_precision(zero, theta) == pytest.approx(1e-8)  # no data: the widest prior
    std = posterior_std(fisher, lam)
    torch.testing.assert_close(std["a"], (fisher["a"] + lam).rsqrt())
