"""The method registry: every baseline resolves and runs through the one code path, LoRA is the
deterministic inner loop, Reptile's and multi-task LoRA's outer steps match their closed forms."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_llama
from test_meta import random_theta, task_batches

import abmll.evaluate
from abmll.bayes_lora import BayesLoraConfig, BayesLoraModel
from abmll.config import EvalArgs, TaskArgs
from abmll.data import read_jsonl
from abmll.episodes import episode_batches
from abmll.evaluate import evaluate, run_method
from abmll.gaussian_lora import HyperpriorConfig
from abmll.meta import MetaConfig, adapt, mean_nll, meta_step, predict_batches
from abmll.methods import METHODS, get_spec, make_method, prior_kinds, prior_meta_config, train_prior
from abmll.metrics import compute_metrics
from abmll.models import load_base_model
from abmll.scoring import ScoringConfig, option_nll, option_scores

pytestmark = pytest.mark.usefixtures("one_thread")  # other jobs share the 2 cores


@pytest.fixture
def world(tiny_model_dir, tiny_data_dir):
    base, tok = load_base_model(str(tiny_model_dir))
    model = BayesLoraModel(base, BayesLoraConfig(rank=2))
    tasks = TaskArgs(data_dir=str(tiny_data_dir), split="tiny", k=4, data_seeds=[1, 2], max_query=4)
    scoring = ScoringConfig(max_rows=8)
    meta = MetaConfig(inner_steps=1, inner_lr=0.3, outer_lr=0.05, beta=1e-4, gamma=1e-7, meta_steps=2)
    ev = EvalArgs(test_steps=2, eval_samples=2, max_test=6)
    ep = episode_batches(model, tok, "h0", 1, tasks, scoring, "test", ev.max_test)
    return dict(model=model, tok=tok, tasks=tasks, scoring=scoring, meta=meta, ev=ev, ep=ep)


def test_registry_names_and_unknown_names():
    assert list(METHODS)[:6] == ["zero_shot", "lora", "multitask_lora", "reptile", "bayes_lora", "abmll"]
    for spec in METHODS.values():  # a calibrated or ensembled entry builds on one of the six, with its prior
        assert spec.base in list(METHODS)[:6] and get_spec(spec.base).prior == spec.prior, spec.name
    assert prior_kinds(list(METHODS)) == ["init", "multitask", "reptile", "abmll"]
    with pytest.raises(ValueError, match="unknown method 'maml'.*abmll"):
        get_spec("maml")
    with pytest.raises(ValueError, match="not meta-trained"):
        prior_meta_config("init", MetaConfig())


def test_every_method_resolves_and_runs(world, tmp_path):
    w = world
    priors = {}
    for kind in prior_kinds(list(METHODS)):
        priors[kind], history = train_prior(
            kind,
            w["model"],
            w["tok"],
            ["t0", "t1", "t2"],
            w["tasks"],
            w["meta"],
            HyperpriorConfig(),
            w["scoring"],
            tmp_path / kind,
            {},
        )
        assert len(history) == (0 if kind == "init" else w["meta"].meta_steps)
    init = w["model"].init_params()
    for kind in ("abmll", "multitask", "reptile"):  # trained: the mean pair moved
        assert any(not torch.equal(priors[kind][k], init[k]) for k in w["model"].mean_keys()), kind
    for kind in ("multitask", "reptile"):  # deterministic: the scale pair did not
        scale = [k for k in init if k not in w["model"].mean_keys()]
        assert all(torch.equal(priors[kind][k], init[k]) for k in scale), kind
    query_labels = [e.label for e in read_jsonl(Path(w["tasks"].data_dir) / "h0" / "h0_test.jsonl")]
    ep = episode_batches(w["model"], w["tok"], "h0", 1, w["tasks"], w["scoring"], "test", w["ev"].max_test, folds=2)
    for name, spec in METHODS.items():
        method = make_method(name, priors[spec.prior], w["ev"], temperature=2.0 if spec.calibrate == "dev" else None)
        assert method.steps == (w["ev"].test_steps if spec.adapt else 0)
        assert method.samples == (w["ev"].eval_samples if spec.samples_draws else 0)
        metrics, probs, labels = run_method(w["model"], method, ep, w["meta"], seed=1)
        assert ("temperature" in metrics) == bool(spec.calibrate), name
        assert probs.shape == (6, 2) and labels.tolist() == query_labels, name
        expected = compute_metrics(probs, labels)  # the metrics are those of the returned predictions
        assert {k: metrics[k] for k in expected} == pytest.approx(expected, abs=1e-9), name
        if not spec.adapt:  # zero-shot: the pretrained model's own predictions
            torch.testing.assert_close(probs, predict_batches(w["model"], init, w["ep"].query, 0)[0], rtol=0, atol=0)
    # a saved finished prior is reloaded, not retrained
    again, history = train_prior(
        "abmll",
        w["model"],
        w["tok"],
        ["t0", "t1", "t2"],
        w["tasks"],
        w["meta"],
        HyperpriorConfig(),
        w["scoring"],
        tmp_path / "abmll",
        {},
    )
    assert len(history) == 2 and all(torch.equal(again[k], priors["abmll"][k]) for k in again)


def test_lora_is_deterministic_adapt_from_init(world):
    w = world
    init = w["model"].init_params()
    _, probs, _ = run_method(w["model"], make_method("lora", init, w["ev"]), w["ep"], w["meta"], seed=1)
    post, _ = adapt(
        w["model"],
        init,
        w["ep"].support,
        w["ev"].test_steps,
        w["meta"].inner_lr,
        beta=0.0,
        n_samples=0,
        grad_clip=w["meta"].inner_grad_clip,
    )
    ref, _ = predict_batches(w["model"], post, w["ep"].query, n_samples=0)
    assert torch.equal(probs, ref)
    scale = [k for k in init if k not in w["model"].mean_keys()]
    assert all(torch.equal(post[k], init[k]) for k in scale)  # scale pair untouched
    assert (ref - predict_batches(w["model"], init, w["ep"].query, 0)[0]).abs().max() > 1e-6  # it adapted
    _, bayes, _ = run_method(w["model"], make_method("bayes_lora", init, w["ev"]), w["ep"], w["meta"], seed=1)
    assert (bayes - probs).abs().max() > 1e-6  # sampled, KL: a different method
    _, bayes2, _ = run_method(w["model"], make_method("bayes_lora", init, w["ev"]), w["ep"], w["meta"], seed=1)
    assert torch.equal(bayes, bayes2)  # seeded per method


def test_reptile_outer_update_is_theta_plus_eps_times_lambda_minus_theta():
    model = BayesLoraModel(make_tiny_llama(), BayesLoraConfig(rank=2))
    theta = random_theta(model, seed=3)
    tasks = [task_batches("a", 1), task_batches("b", 2)]
    config = MetaConfig(inner_steps=2, inner_lr=0.3, n_samples=0, beta=0.0, gamma=0.0, outer_update="reptile")
    before = {k: v.detach().clone() for k, v in theta.items()}
    lams = [adapt(model, before, list(t.support) + list(t.query), 2, 0.3, 0.0, 0, config.inner_grad_clip)[0] for t in tasks]
    eps = 0.25
    logs = meta_step(model, theta, torch.optim.SGD(theta.values(), lr=eps), tasks, config, HyperpriorConfig())
    for k in theta:
        lam_mean = sum(lam[k] for lam in lams) / len(lams)
        torch.testing.assert_close(theta[k].detach(), before[k] + eps * (lam_mean - before[k]), rtol=1e-5, atol=1e-7)
    assert any(not torch.equal(theta[k].detach(), before[k]) for k in theta)
    # the logs, recomputed: NLLs at the posterior mean of each task's lambda^(K) (before: at theta)
    mean_over_tasks = lambda f: sum(f(lam, t) for lam, t in zip(lams, tasks)) / len(tasks)  # noqa: E731
    assert logs["query_nll"] == pytest.approx(mean_over_tasks(lambda lam, t: mean_nll(model, lam, t.query)), abs=1e-6)
    assert logs["support_nll_after"] == pytest.approx(mean_over_tasks(lambda lam, t: mean_nll(model, lam, t.support)), abs=1e-6)
    assert logs["support_nll_before"] == pytest.approx(
        mean_over_tasks(lambda lam, t: mean_nll(model, before, t.support)), abs=1e-6
    )
    assert logs["support_nll_after"] < logs["support_nll_before"]
    assert prior_meta_config("reptile", MetaConfig()).outer_update == "reptile"
    with pytest.raises(ValueError, match="outer_update"):
        meta_step(
            model, theta, torch.optim.SGD(theta.values(), lr=eps), tasks, MetaConfig(outer_update="maml"), HyperpriorConfig()
        )


def test_multitask_step_is_gradient_of_mean_query_nll():
    model = BayesLoraModel(make_tiny_llama(), BayesLoraConfig(rank=2))
    theta = random_theta(model, seed=4)
    tasks = [task_batches("a", 5), task_batches("b", 6, n_query=4)]
    config = prior_meta_config("multitask", MetaConfig(inner_steps=3, n_samples=2, beta=1e-3, gamma=1e-3))
    assert (config.inner_steps, config.n_samples, config.beta, config.gamma) == (0, 0, 0.0, 0.0)
    meta_step(model, theta, torch.optim.SGD(theta.values(), lr=0.0), tasks, config, HyperpriorConfig())

    def task_nll(t):
        return torch.cat(
            [option_nll(option_scores(lambda groups=None, **kw: model(theta, **kw).logits, b), b.labels) for b in t.query]
        ).mean()

    ref = torch.autograd.grad(sum(task_nll(t) for t in tasks) / len(tasks), list(theta.values()), allow_unused=True)
    for (_, v), r in zip(theta.items(), ref):
        torch.testing.assert_close(v.grad, torch.zeros_like(v) if r is None else r, rtol=1e-4, atol=1e-7)
    assert all(v.grad.abs().sum() == 0 for k, v in theta.items() if k not in model.mean_keys())


def test_evaluate_reports_predictions_and_keeps_its_return_shape(world):
    w = world
    init = w["model"].init_params()
    methods = [make_method(n, init, w["ev"]) for n in ("zero_shot", "lora", "bayes_lora")]
    seen, preds = [], {}
    res = evaluate(
        w["model"],
        w["tok"],
        methods,
        ["h0", "h1"],
        [1, 2],
        w["tasks"],
        w["scoring"],
        w["meta"],
        w["ev"],
        on_result=lambda m, t, s, r, cached: seen.append((m, t, s, cached)) or preds.setdefault((m, t, s), (r.probs, r.labels)),
    )
    assert res["tasks"] == ["h0", "h1"] and res["seeds"] == [1, 2]
    assert set(res["methods"]["lora"]) == {"per_task", "mean", "std_over_seeds"}
    assert len(seen) == len(preds) == 12 and not any(cached for *_, cached in seen)
    for (m, t, s), (p, _) in preds.items():  # a result does not depend on the methods run before it
        ep = episode_batches(w["model"], w["tok"], t, s, w["tasks"], w["scoring"], "test", w["ev"].max_test)
        metrics, p2, _ = run_method(w["model"], next(x for x in methods if x.name == m), ep, w["meta"], s)
        assert torch.equal(p, p2) and metrics == res["methods"][m]["per_task"][t]["seeds"][s]


def test_eval_settings_choose_the_adaptation_optimizer_and_learning_rate(world):
    w = world
    init = w["model"].init_params()
    ev = EvalArgs(test_steps=2, eval_samples=2, max_test=6, test_optimizer="adamw", test_lr=0.01)
    _, probs, _ = run_method(w["model"], make_method("lora", init, ev), w["ep"], w["meta"], seed=1)
    post, _ = adapt(
        w["model"], init, w["ep"].support, 2, 0.01, beta=0.0, n_samples=0, grad_clip=w["meta"].inner_grad_clip, optimizer="adamw"
    )
    assert torch.equal(probs, predict_batches(w["model"], post, w["ep"].query, n_samples=0)[0])
    _, sgd, _ = run_method(w["model"], make_method("lora", init, w["ev"]), w["ep"], w["meta"], seed=1)
    assert (sgd - probs).abs().max() > 1e-6


@pytest.mark.parametrize(
    "bad,message",
    [
        (dict(test_optimizer="adam"), "--test_optimizer must be one of sgd, adamw"),
        (dict(test_lr=0.0), "--test_lr must be a finite number > 0"),
        (dict(test_lr=float("nan")), "--test_lr must be a finite number > 0"),
    ],
)
def test_invalid_adaptation_settings_are_refused_naming_the_flag(bad, message):
    with pytest.raises(ValueError, match=message):
        EvalArgs(**bad)


def test_result_key_leaves_out_added_fields_at_their_defaults():
    from abmll.config import RunConfig, result_config

    cfg = RunConfig(eval=EvalArgs(), tasks=TaskArgs())
    assert "test_optimizer" not in result_config(cfg)["eval"] and "test_lr" not in result_config(cfg)["eval"]
    changed = result_config(replace(cfg, eval=EvalArgs(test_optimizer="adamw", test_lr=0.01)))["eval"]
    assert changed["test_optimizer"] == "adamw" and changed["test_lr"] == 0.01


def test_adamw_without_its_own_learning_rate_is_refused():
    with pytest.raises(ValueError, match="--test_optimizer adamw needs --test_lr"):
        EvalArgs(test_optimizer="adamw")


def test_evaluate_reads_done_results_back_and_calls_a_lazy_prior_only_when_a_result_needs_it(world):
    w = world
    init = w["model"].init_params()
    calls = []
    lazy = lambda: calls.append(1) or init  # noqa: E731
    methods = [make_method("lora", lazy, w["ev"]), make_method("zero_shot", init, w["ev"])]
    first = {}
    evaluate(w["model"], w["tok"], methods, ["h0"], [1, 2], w["tasks"], w["scoring"], w["meta"], w["ev"],
             on_result=lambda m, t, s, r, cached: first.setdefault((m, t, s), r))  # fmt: skip
    assert len(calls) == 2  # once per (task, seed) that ran lora
    calls.clear()
    seen = []
    again = evaluate(w["model"], w["tok"], methods, ["h0"], [1, 2], w["tasks"], w["scoring"], w["meta"], w["ev"],
                     on_result=lambda m, t, s, r, cached: seen.append(cached), done=first)  # fmt: skip
    assert calls == [] and seen == [True] * 4
    assert again["methods"]["lora"]["per_task"]["h0"]["seeds"][2] == first["lora", "h0", 2].metrics


def test_a_tempered_method_beside_its_base_tempers_the_base_predictions_as_a_fresh_run_would(world, monkeypatch):
    w = world
    init = w["model"].init_params()
    ev = replace(w["ev"], support_folds=2)
    methods = [make_method("lora", init, ev), make_method("lora_ts_support", init, ev)]
    assert methods[1].base == "lora" and methods[1].support_folds == 2
    together, runs = {}, []
    real = abmll.evaluate.run_method
    monkeypatch.setattr(abmll.evaluate, "run_method", lambda model, m, *a: runs.append(m.name) or real(model, m, *a))
    evaluate(w["model"], w["tok"], methods, ["h0"], [1], w["tasks"], w["scoring"], w["meta"], ev,
             on_result=lambda m, t, s, r, cached: together.setdefault(m, r))  # fmt: skip
    assert runs == ["lora"]  # the tempered method did not run (adapt and predict) again
    alone = {}
    evaluate(w["model"], w["tok"], methods[1:], ["h0"], [1], w["tasks"], w["scoring"], w["meta"], ev,
             on_result=lambda m, t, s, r, cached: alone.setdefault(m, r))  # fmt: skip
    reused, fresh = together["lora_ts_support"], alone["lora_ts_support"]
    assert torch.allclose(reused.probs, fresh.probs, atol=1e-6) and torch.equal(reused.labels, fresh.labels)
    assert reused.metrics["temperature"] == pytest.approx(fresh.metrics["temperature"], rel=1e-6)
    assert reused.metrics["temperature"] != 1.0
    assert reused.metrics["nll"] == pytest.approx(fresh.metrics["nll"], rel=1e-5)
