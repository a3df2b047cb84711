"""Uncertainty decomposition, selective prediction and the reliability histogram against
closed forms and brute-force references."""

from __future__ import annotations

import math

import pytest
import torch

from abmll.metrics import plot_reliability_diagram, reliability_diagram_data
from abmll.uncertainty import accuracy_at_coverage, aurc, decompose, entropy, risk_coverage

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


def test_evaluate_reports_ood_auroc_per_task_pair(world, tmp_path):
    import json

    from abmll.cli import main

    assert (
        main(
            [
                "evaluate",
                "--config",
                str(world["config"]),
                "--prior",
                str(world["prior"]),
                "--eval_samples",
                "3",
                "--ood_tasks",
                "t0",
                "h0",
                "--plots",
                "false",
                "--out",
                str(tmp_path),
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
    ood = results["ood"]
    assert list(ood) == ["abmll"] and list(ood["abmll"]) == ["h0 -> t0"]  # zero-shot does not adapt; h0 -> h0 skipped
    for value in ood["abmll"]["h0 -> t0"].values():
        assert 0.0 <= value <= 1.0
