"""Uncertainty decomposition, selective prediction and the reliability histogram against
closed forms and brute-force references."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import cli_flags

from abmll.metrics import plot_reliability_diagram, reliability_diagram_data
from abmll.uncertainty import (
    accuracy_at_coverage,
    aurc,
    choose_threshold,
    decompose,
    entropy,
    normalised_entropy,
    risk_coverage,
)

LN2 = math.log(2)


def test_two_confident_samples_that_disagree_are_pure_epistemic():
    parts = decompose(torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]]))
    assert parts["total"].item() == pytest.approx(LN2)
    assert parts["aleatoric"].item() == pytest.approx(0.0, abs=1e-12)
    assert parts["epistemic"].item() == pytest.approx(LN2)
    assert parts["top_prob_std"].item() == pytest.approx(0.5)  # top class 0 (tie -> first): 1 and 0


def test_samples_that_agree_on_a_coin_flip_are_pure_aleatoric():
    parts = decompose(torch.full((3, 1, 2), 0.5))
    assert parts["total"].item() == pytest.approx(LN2)
    assert parts["aleatoric"].item() == pytest.approx(LN2)
    assert parts["epistemic"].item() == pytest.approx(0.0, abs=1e-7)
    assert parts["top_prob_std"].item() == 0


def test_decomposition_matches_a_loop_and_total_is_the_sum():
    torch.manual_seed(0)
    samples = torch.softmax(torch.randn(5, 7, 4) * 2, -1)
    samples[:, 3, 3] = 0  # an example with 3 options (padding column)
    samples[:, 3] /= samples[:, 3].sum(-1, keepdim=True)
    parts = decompose(samples)
    for n in range(7):
        mean = samples[:, n].mean(0)
        h = -sum(float(p) * math.log(p) for p in mean if p > 0)
        e = sum(-sum(float(p) * math.log(p) for p in samples[s, n] if p > 0) for s in range(5)) / 5
        assert parts["total"][n].item() == pytest.approx(h, abs=1e-5)
        assert parts["aleatoric"][n].item() == pytest.approx(e, abs=1e-5)
        assert parts["epistemic"][n].item() == pytest.approx(h - e, abs=1e-5)
        top = int(mean.argmax())
        assert parts["top_prob_std"][n].item() == pytest.approx(samples[:, n, top].std(unbiased=False).item(), abs=1e-6)
    assert (parts["epistemic"] >= 0).all()
    one = decompose(samples[:1])
    assert torch.allclose(one["epistemic"], torch.zeros(7)) and torch.allclose(one["total"], one["aleatoric"])
    with pytest.raises(ValueError, match="S >= 1"):
        decompose(samples[0])


def test_normalised_entropy_is_one_for_uniform_predictions_whatever_the_number_of_options():
    probs = torch.tensor([[0.5, 0.5, 0, 0], [0.25] * 4, [1.0, 0, 0, 0], [1.0, 0, 0, 0]])
    got = normalised_entropy(entropy(probs), torch.tensor([2, 4, 3, 1]))
    torch.testing.assert_close(got, torch.tensor([1.0, 1.0, 0.0, 0.0]))
    mid = torch.tensor([[0.9, 0.1]])
    assert normalised_entropy(entropy(mid), torch.tensor([2])).item() == pytest.approx(entropy(mid).item() / LN2)


def test_choose_threshold_meets_the_target_with_the_most_coverage_by_brute_force():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        u = torch.randint(0, 6, (15,), generator=g).double() / 5  # ties on purpose
        correct = torch.rand(15, generator=g) < 0.8 - 0.5 * u  # the uncertain rows are wrong more
        for target in (0.5, 0.8, 0.9, 1.0):
            options = []  # every threshold by hand: (coverage, accuracy, t)
            for t in sorted(set(u.tolist())):
                kept = u <= t
                options.append((float(kept.double().mean()), float(correct[kept].double().mean()), t))
            meeting = [o for o in options if o[1] >= target]
            if not meeting:
                with pytest.raises(ValueError, match="lower the target"):
                    choose_threshold(u, correct, target_accuracy=target)
                continue
            got = choose_threshold(u, correct, target_accuracy=target)
            best = max(meeting)  # the most coverage
            assert (got["coverage"], got["selective_accuracy"], got["threshold"]) == pytest.approx(best)
            got = choose_threshold(u, correct, target_coverage=target)
            least = min(o for o in options if o[0] >= target)  # the fewest kept that still covers
            assert (got["coverage"], got["threshold"]) == pytest.approx((least[0], least[2]))
    u = torch.tensor([0.1, 0.2, 0.3, 0.4])
    assert choose_threshold(u, torch.tensor([True, True, False, True]), target_coverage=0.5)["threshold"] == pytest.approx(0.2)
    assert choose_threshold(u, torch.tensor([True, True, False, True]), target_accuracy=0.75)["threshold"] == pytest.approx(0.4)
    for bad in (dict(), dict(target_accuracy=0.9, target_coverage=0.5), dict(target_coverage=0.0), dict(target_accuracy=1.5)):
        with pytest.raises(ValueError):
            choose_threshold(u, torch.ones(4, dtype=torch.bool), **bad)
    with pytest.raises(ValueError, match="no labelled rows"):
        choose_threshold(u[:0], torch.ones(0, dtype=torch.bool), target_coverage=0.5)


def test_risk_coverage_and_aurc_against_brute_force():
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7], [0.5, 0.5]])
    labels = torch.tensor([0, 0, 1, 1, 0])  # predictions 0, 1, 0, 1, 0: wrong at 1 and 2
    u = entropy(probs)
    coverage, risk = risk_coverage(probs, labels, u)
    order = sorted(range(5), key=lambda i: (u[i].item(), i))
    wrong = [int(probs[i].argmax() != labels[i]) for i in order]
    expected = [sum(wrong[:k]) / k for k in range(1, 6)]
    assert coverage.tolist() == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert risk.tolist() == pytest.approx(expected)
    assert aurc(probs, labels, u) == pytest.approx(sum(expected) / 5)
    assert risk[-1].item() == pytest.approx(2 / 5)  # full coverage: the error rate
    oracle = torch.tensor([0.0, 1.0, 1.0, 0.0, 0.0])  # the wrong ones last
    assert aurc(probs, labels, oracle) == pytest.approx((0 + 0 + 0 + 1 / 4 + 2 / 5) / 5)
    acc = accuracy_at_coverage(probs, labels, oracle, (1.0, 0.6))
    assert acc == {"1.00": pytest.approx(0.6), "0.60": pytest.approx(1.0)}


def test_reliability_diagram_has_a_count_histogram(tmp_path):
    torch.manual_seed(1)
    probs = torch.softmax(torch.randn(200, 3) * 2, -1)
    labels = torch.randint(0, 3, (200,))
    fig = plot_reliability_diagram(probs, labels, tmp_path / "r.png", n_bins=10)
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
    counts = reliability_diagram_data(probs, labels, 10)["count"]
    heights = [p.get_height() for p in fig.axes[1].patches]
    assert heights == [float(c) for c in counts] and sum(heights) == 200


def test_auroc_is_the_mann_whitney_probability():
    from abmll.ood import auroc

    torch.manual_seed(2)
    inside, outside = torch.randn(30), torch.randn(20) + 0.7
    inside[:5] = outside[:5]  # some ties
    pairs = [(o > i) + 0.5 * (o == i) for o in outside.tolist() for i in inside.tolist()]
    assert auroc(inside, outside) == pytest.approx(float(sum(pairs)) / len(pairs), abs=1e-6)
    assert auroc(torch.zeros(3), torch.ones(2)) == 1.0 and auroc(torch.ones(3), torch.zeros(2)) == 0.0
    assert auroc(torch.zeros(4), torch.zeros(4)) == 0.5  # no information
    with pytest.raises(ValueError, match="at least one"):
        auroc(torch.zeros(0), torch.ones(2))


def _entropies(samples):
    """(total, epistemic) per example of (S, N, C) sample probabilities, written out here."""
    h = lambda p: -(p * p.clamp_min(1e-30).log()).sum(-1)  # noqa: E731
    total = h(samples.mean(0))
    return {"total": total, "epistemic": total - h(samples).mean(0)}


def _sklearn_auroc(inside, outside):
    from sklearn.metrics import roc_auc_score

    return roc_auc_score([0] * len(inside) + [1] * len(outside), torch.cat([inside, outside]).tolist())


def test_ood_auroc_flags_the_uncertain_examples_as_out_of_distribution(monkeypatch):
    """Known direction: in-distribution examples predicted confidently and alike by every
    weight sample, out-of-distribution ones near uniform and disagreeing, so both AUROCs are
    1 (and 0 with the two sets swapped); a mixed case matches scikit-learn's AUROC."""
    from abmll import ood

    confident = torch.tensor(  # (S=3, N=3, C=2): the samples nearly agree
        [
            [[0.95, 0.05], [0.1, 0.9], [0.8, 0.2]],
            [[0.9, 0.1], [0.15, 0.85], [0.85, 0.15]],
            [[0.93, 0.07], [0.05, 0.95], [0.75, 0.25]],
        ]
    )
    unsure = torch.tensor([[[0.7, 0.3], [0.4, 0.6]], [[0.3, 0.7], [0.6, 0.4]], [[0.5, 0.5], [0.5, 0.5]]])  # disagree
    # uncertain and disagreeing; confident and agreeing; a coin flip all samples agree on
    mixed = torch.tensor([[[0.6, 0.4], [0.98, 0.02], [0.5, 0.5]], [[0.2, 0.8], [0.98, 0.02], [0.5, 0.5]]])
    mixed = torch.cat([mixed, torch.tensor([[[0.55, 0.45], [0.98, 0.02], [0.5, 0.5]]])])
    fake = {"in": confident, "out": unsure, "mixed": mixed}
    monkeypatch.setattr(ood, "predict_samples", lambda model, params, batches, n: (fake[batches[0]], None))

    assert ood.posterior_ood_auroc(None, {}, 3, ["in"], ["out"], seed=0) == {"auroc_total": 1.0, "auroc_epistemic": 1.0}
    assert ood.posterior_ood_auroc(None, {}, 3, ["out"], ["in"], seed=0) == {"auroc_total": 0.0, "auroc_epistemic": 0.0}
    got = ood.posterior_ood_auroc(None, {}, 3, ["in"], ["mixed"], seed=0)
    inside, outside = _entropies(confident), _entropies(mixed)
    # by entropy 2 of the 3 OOD examples rank above all in-distribution ones; by MI only 1
    for kind, fraction in (("total", 2 / 3), ("epistemic", 1 / 3)):
        assert _sklearn_auroc(inside[kind], outside[kind]) == pytest.approx(fraction)
        assert got[f"auroc_{kind}"] == pytest.approx(fraction, abs=1e-6)


def test_evaluate_reports_ood_auroc_per_task_pair(world, tmp_path, monkeypatch):
    """The reported AUROCs are recomputed (scikit-learn) from the per-example uncertainties
    of the predictions behind them: h0's own test examples negative, t0's positive."""
    import json

    from abmll import ood
    from abmll.cli import main

    names, samples = {}, {}

    def episode_batches(*args):
        ep = real_episode_batches(*args)
        names[id(ep.query)] = args[2]
        return ep

    def predict_samples(model, params, batches, n):
        out = real_predict_samples(model, params, batches, n)
        samples[names[id(batches)]] = out[0]
        return out

    real_episode_batches, real_predict_samples = ood.episode_batches, ood.predict_samples
    monkeypatch.setattr(ood, "episode_batches", episode_batches)
    monkeypatch.setattr(ood, "predict_samples", predict_samples)
    assert (
        main(
            [
                "evaluate",
                *cli_flags(
                    config=world["config"],
                    prior=world["prior"],
                    eval_samples="3",
                    ood_tasks=["t0", "h0"],
                    plots="false",
                    out=tmp_path,
                ),
            ]
        )
        == 0
    )
    results = json.loads((tmp_path / "results.json").read_text())
    per_task = {m: results["methods"][m]["per_task"]["h0"]["mean"] for m in ("zero_shot", "abmll")}
    assert per_task["zero_shot"]["mean_epistemic"] == 0 and per_task["abmll"]["mean_epistemic"] > 0
    assert per_task["abmll"]["mean_total"] == pytest.approx(
        per_task["abmll"]["mean_aleatoric"] + per_task["abmll"]["mean_epistemic"], abs=1e-6
    )
    ood_results = results["ood"]
    assert list(ood_results) == ["abmll"] and list(ood_results["abmll"]) == [
        "h0 -> t0"
    ]  # zero-shot does not adapt; h0 -> h0 skipped
    assert set(samples) == {"h0", "t0"} and samples["h0"].shape[:2] == (3, 6) and samples["t0"].shape[:2] == (3, 6)
    inside, outside = _entropies(samples["h0"]), _entropies(samples["t0"])
    for kind in ("total", "epistemic"):
        expected = _sklearn_auroc(inside[kind], outside[kind])
        assert abs(expected - 0.5) > 0.05  # swapping in- and out-of-distribution would show
        assert ood_results["abmll"]["h0 -> t0"][f"auroc_{kind}"] == pytest.approx(expected, abs=1e-6)
