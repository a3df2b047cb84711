"""Tests for abmll.metrics: hand-computed values, a loop reference for ECE, and input checks."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from abmll.metrics import (
    accuracy,
    brier_score,
    compute_metrics,
    expected_calibration_error,
    expected_calibration_error_torchmetrics,
    macro_f1,
    negative_log_likelihood,
    plot_reliability_diagram,
    reliability_diagram_data,
)

T = torch.tensor


# ---------------------------------------------------------------- accuracy / NLL / Brier


def test_accuracy_hand_computed():
    probs = T(
        [
            [0.7, 0.2, 0.1],  # pred 0, label 0: correct
            [0.1, 0.6, 0.3],  # pred 1, label 2: wrong
            [0.2, 0.3, 0.5],  # pred 2, label 2: correct
            [0.3, 0.4, 0.3],
        ]
    )  # pred 1, label 1: correct
    labels = T([0, 2, 2, 1])
    assert accuracy(probs, labels) == pytest.approx(3 / 4)


def test_accuracy_tie_goes_to_lowest_index():
    # [0.5, 0.5] predicts option 0: right for label 0, wrong for label 1 -> 1/2
    assert accuracy(T([[0.5, 0.5], [0.5, 0.5]]), T([0, 1])) == pytest.approx(0.5)


def test_nll_hand_computed():
    probs = T([[0.5, 0.5, 0.0], [0.25, 0.25, 0.5]])
    labels = T([1, 0])
    # p(label) = 0.5, 0.25 -> (log 2 + log 4) / 2 = 1.5 log 2 = 1.0397 nats
    assert negative_log_likelihood(probs, labels) == pytest.approx(1.5 * math.log(2), rel=1e-6)


def test_nll_zero_probability_is_floored_by_eps():
    probs = T([[1.0, 0.0], [1.0, 0.0]])
    labels = T([0, 1])
    # -log 1 = 0 and -log(1e-12) = 27.631 -> mean 13.8155
    assert negative_log_likelihood(probs, labels) == pytest.approx(12 * math.log(10) / 2, rel=1e-9)
    # eps = 1e-4 -> (0 + 4 log 10) / 2 = 4.6052
    assert negative_log_likelihood(probs, labels, eps=1e-4) == pytest.approx(2 * math.log(10))


def test_brier_hand_computed():
    probs = T(
        [
            [0.7, 0.2, 0.1],  # label 0: 0.3^2 + 0.2^2 + 0.1^2 = 0.09 + 0.04 + 0.01 = 0.14
            [0.6, 0.3, 0.1],
        ]
    )  # label 2: 0.6^2 + 0.3^2 + 0.9^2 = 0.36 + 0.09 + 0.81 = 1.26
    labels = T([0, 2])
    # mean (0.14 + 1.26) / 2 = 0.70
    assert brier_score(probs, labels) == pytest.approx(0.70, abs=1e-6)


def test_brier_extremes():
    # perfect one-hot: 0; confidently wrong: 1^2 + 1^2 = 2
    assert brier_score(T([[1.0, 0.0]]), T([0])) == pytest.approx(0.0)
    assert brier_score(T([[1.0, 0.0]]), T([1])) == pytest.approx(2.0)


def test_padded_columns_hand_computed():
    # Row 0 has 4 options, row 1 only 2 (columns 2, 3 are padding with probability 0).
    probs = T(
        [
            [0.1, 0.6, 0.2, 0.1],  # label 1, pred 1: correct
            [0.6, 0.4, 0.0, 0.0],
        ]
    )  # label 1, pred 0: wrong
    labels = T([1, 1])
    assert accuracy(probs, labels) == pytest.approx(0.5)
    # NLL = -(log 0.6 + log 0.4) / 2 = (0.5108 + 0.9163) / 2 = 0.7136
    assert negative_log_likelihood(probs, labels) == pytest.approx(-(math.log(0.6) + math.log(0.4)) / 2, rel=1e-6)
    # Brier row 0: 0.01 + 0.16 + 0.04 + 0.01 = 0.22; row 1: 0.36 + 0.36 + 0 + 0 = 0.72
    # mean = 0.47
    assert brier_score(probs, labels) == pytest.approx(0.47, abs=1e-6)
    # Macro-F1 over present classes {0, 1} (2, 3 never occur):
    # class 1: tp 1, fn 1, fp 0 -> 2/(2+1) = 2/3; class 0: tp 0, fp 1 -> 0. Mean = 1/3.
    assert macro_f1(probs, labels) == pytest.approx(1 / 3, abs=1e-6)


def test_padding_changes_no_metric():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(3 * torch.randn(50, 2, generator=g), dim=1)
    labels = torch.randint(0, 2, (50,), generator=g)
    padded = torch.cat([probs, torch.zeros(50, 3)], dim=1)
    a, b = compute_metrics(probs, labels), compute_metrics(padded, labels)
    for key in a:
        assert b[key] == pytest.approx(a[key], abs=1e-7), key


# ---------------------------------------------------------------- macro-F1


def test_macro_f1_class_never_predicted_and_absent_class_excluded():
    labels = T([0, 0, 1, 1, 2, 2])
    preds = [0, 0, 1, 1, 1, 0]  # class 2 is never predicted; class 3 never appears at all
    probs = torch.nn.functional.one_hot(T(preds), 4).float() * 0.7 + 0.075  # rows sum to 1
    # class 0: tp 2, fp 1 (example 5), fn 0 -> F1 = 4 / (4 + 1) = 0.8
    # class 1: tp 2, fp 1 (example 4), fn 0 -> F1 = 0.8
    # class 2: tp 0, fn 2                    -> F1 = 0
    # class 3: tp = fp = fn = 0              -> excluded (including it would give 1.6/4 = 0.4)
    # macro = (0.8 + 0.8 + 0) / 3 = 0.5333
    assert macro_f1(probs, labels) == pytest.approx(1.6 / 3, abs=1e-6)
    assert macro_f1(probs, labels, num_classes=10) == pytest.approx(1.6 / 3, abs=1e-6)


def test_macro_f1_class_predicted_but_never_a_label_counts_as_zero():
    labels = T([0, 0, 1, 1])
    probs = T(
        [
            [0.8, 0.1, 0.1],  # pred 0
            [0.1, 0.1, 0.8],  # pred 2 (class 2 never a label)
            [0.1, 0.8, 0.1],  # pred 1
            [0.1, 0.8, 0.1],
        ]
    )  # pred 1
    # class 0: tp 1, fn 1, fp 0 -> 2/3; class 1: tp 2 -> 1; class 2: fp 1 -> 0
    # macro = (2/3 + 1 + 0) / 3 = 5/9  (MetaICL's label-classes-only average would be 5/6)
    assert macro_f1(probs, labels) == pytest.approx(5 / 9, abs=1e-6)


def test_macro_f1_perfect_and_num_classes_check():
    probs = T([[0.9, 0.1], [0.2, 0.8]])
    labels = T([0, 1])
    assert macro_f1(probs, labels) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="num_classes"):
        macro_f1(T([[0.1, 0.1, 0.8]]), T([0]), num_classes=2)  # prediction 2 >= 2
    with pytest.raises(ValueError, match="num_classes"):
        macro_f1(probs, labels, num_classes=1)


# ---------------------------------------------------------------- ECE


def _binary_probs(confidences, preds):
    """(N, 2) rows whose max is `confidence`, at column `pred`."""
    rows = []
    for c, p in zip(confidences, preds):
        rows.append([c, 1 - c] if p == 0 else [1 - c, c])
    return T(rows, dtype=torch.float64)


def test_ece_hand_computed_three_bins():
    # n_bins = 10; six examples fall in bins [0.5,0.6), [0.7,0.8), [0.9,1.0), two per bin.
    conf = [0.55, 0.58, 0.72, 0.78, 0.91, 0.99]
    probs = _binary_probs(conf, [0] * 6)  # all predict option 0
    labels = T([0, 1, 0, 0, 0, 1])  # correct: y n | y y | y n
    # bin [0.5,0.6): acc 1/2, conf (0.55+0.58)/2 = 0.565 -> gap 0.065
    # bin [0.7,0.8): acc 1,   conf (0.72+0.78)/2 = 0.75  -> gap 0.25
    # bin [0.9,1.0): acc 1/2, conf (0.91+0.99)/2 = 0.95  -> gap 0.45
    # ECE = 2/6 * (0.065 + 0.25 + 0.45) = 0.765 / 3 = 0.255
    assert expected_calibration_error(probs, labels, n_bins=10) == pytest.approx(0.255, abs=1e-6)

    data = reliability_diagram_data(probs, labels, n_bins=10)
    assert data["count"] == [0, 0, 0, 0, 0, 2, 0, 2, 0, 2]
    assert data["accuracy"][5] == pytest.approx(0.5)
    assert data["accuracy"][7] == pytest.approx(1.0)
    assert data["accuracy"][9] == pytest.approx(0.5)
    assert data["confidence"][5] == pytest.approx(0.565, abs=1e-6)
    assert data["confidence"][7] == pytest.approx(0.75, abs=1e-6)
    assert data["confidence"][9] == pytest.approx(0.95, abs=1e-6)
    assert data["bin_lower"][5] == pytest.approx(0.5)
    assert data["bin_upper"][5] == pytest.approx(0.6)


def test_ece_perfect_calibration_is_zero():
    # 4 examples at confidence 0.75 with 3 correct, 2 at confidence 0.5 with 1 correct:
    # every bin has acc == conf -> ECE 0. Plus 3 correct one-hot predictions (conf 1, acc 1).
    probs = T([[0.75, 0.25]] * 4 + [[0.5, 0.5]] * 2 + [[0.0, 1.0]] * 3)
    labels = T([0, 0, 0, 1] + [0, 1] + [1, 1, 1])
    assert expected_calibration_error(probs, labels) == pytest.approx(0.0, abs=1e-7)
    assert compute_metrics(probs, labels)["ece"] == pytest.approx(0.0, abs=1e-7)


def test_ece_confidence_exactly_one_is_pooled_with_the_top_bin_as_guo_defines():
    # Guo et al.'s bins are right-closed, ((m-1)/M, m/M]: 0.95 (correct) and 1.0 (wrong) share
    # the top bin: |0.5 - 0.975| = 0.475. torchmetrics (hence BLoB) puts 1.0 in a bin of its
    # own: (0.05 + 1) / 2 = 0.525; that number is the named torchmetrics variant.
    probs = T([[0.95, 0.05], [1.0, 0.0]])
    labels = T([0, 1])
    assert expected_calibration_error(probs, labels) == pytest.approx(0.475, abs=1e-7)
    assert compute_metrics(probs, labels)["ece"] == pytest.approx(0.475, abs=1e-7)
    assert expected_calibration_error_torchmetrics(probs, labels) == pytest.approx(0.525, abs=1e-6)
    data = reliability_diagram_data(probs, labels)
    assert data["count"][-1] == 2
    assert data["confidence"][-1] == pytest.approx(0.975, abs=1e-7)
    assert data["accuracy"][-1] == pytest.approx(0.5)


def test_ece_bin_edges_are_right_closed():
    # 10 bins: 0.6 belongs to (0.5, 0.6], 0.6000001 to (0.6, 0.7]
    probs = _binary_probs([0.6, 0.6000001, 0.55], [0, 0, 0])
    labels = T([0, 1, 1])
    data = reliability_diagram_data(probs, labels, n_bins=10)
    assert data["count"][5] == 2 and data["count"][6] == 1
    # bin 5: conf 0.575, acc 0.5; bin 6: conf 0.6000001, acc 0
    expected = 2 / 3 * 0.075 + 1 / 3 * 0.6000001
    assert expected_calibration_error(probs, labels, n_bins=10) == pytest.approx(expected, abs=1e-9)


def test_equal_mass_ece_closed_form():
    # 6 examples, 3 bins of 2 by confidence: (0.55 y, 0.6 n) (0.7 y, 0.8 y) (0.9 n, 1.0 y)
    probs = _binary_probs([0.7, 0.55, 1.0, 0.6, 0.9, 0.8], [0] * 6)
    labels = T([0, 0, 0, 1, 1, 0])
    # gaps: |0.5 - 0.575| = 0.075, |1 - 0.75| = 0.25, |0.5 - 0.95| = 0.45; each weight 1/3
    assert expected_calibration_error(probs, labels, n_bins=3, binning="equal_mass") == pytest.approx(
        (0.075 + 0.25 + 0.45) / 3, abs=1e-9
    )
    data = reliability_diagram_data(probs, labels, n_bins=3, binning="equal_mass")
    assert data["count"] == [2.0, 2.0, 2.0] and data["bin_lower"][0] == pytest.approx(0.55)
    # more bins than examples: one example per bin
    assert len(reliability_diagram_data(probs, labels, n_bins=15, binning="equal_mass")["count"]) == 6
    with pytest.raises(ValueError, match="binning"):
        expected_calibration_error(probs, labels, binning="quantile")


def _ece_reference(probs: np.ndarray, labels: np.ndarray, n_bins: int) -> float:
    """Straight loop over bins of Guo et al. (2017), Eq. 3."""
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    ece = 0.0
    for m in range(n_bins):
        lo, hi = m / n_bins, (m + 1) / n_bins
        in_bin = (conf > lo) & (conf <= hi)
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - conf[in_bin].mean())
    return ece


@pytest.mark.parametrize(
    "seed,n,c,n_bins,temp",
    [
        (0, 500, 4, 15, 2.0),
        (1, 300, 2, 10, 1.0),
        (2, 1000, 5, 15, 4.0),
        (3, 64, 3, 7, 0.5),
    ],
)
def test_ece_matches_loop_reference_on_random_inputs(seed, n, c, n_bins, temp):
    rng = np.random.default_rng(seed)
    logits = temp * rng.standard_normal((n, c))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    # labels: mostly the arg-max so accuracy is well above chance, with random flips
    labels = np.where(rng.random(n) < 0.6, probs.argmax(axis=1), rng.integers(0, c, n))
    expected = _ece_reference(probs, labels, n_bins)
    got = expected_calibration_error(torch.from_numpy(probs), torch.from_numpy(labels), n_bins)
    assert expected > 0.01  # the comparison is not between two zeros
    assert got == pytest.approx(expected, abs=1e-5)

    # the diagram's bins reproduce the same ECE
    data = reliability_diagram_data(torch.from_numpy(probs), torch.from_numpy(labels), n_bins)
    assert len(data["count"]) == n_bins and sum(data["count"]) == n
    from_diagram = sum(k / n * abs(a - f) for k, a, f in zip(data["count"], data["accuracy"], data["confidence"]))
    assert from_diagram == pytest.approx(expected, abs=1e-5)


# ---------------------------------------------------------------- compute_metrics / plot


def test_compute_metrics_keys_and_values():
    probs = T([[0.72, 0.18, 0.1], [0.64, 0.26, 0.1]])
    labels = T([0, 2])
    out = compute_metrics(probs, labels, n_bins=10)
    assert set(out) == {"accuracy", "macro_f1", "ece", "nll", "brier", "aurc"}
    assert all(type(v) is float for v in out.values())
    assert out["accuracy"] == pytest.approx(0.5)
    # class 0: tp 1, fp 1 -> 2/3; class 2: fn 1 -> 0; macro = 1/3
    assert out["macro_f1"] == pytest.approx(1 / 3, abs=1e-6)
    # bins [0.7,0.8): conf 0.72, acc 1 -> 0.28; [0.6,0.7): conf 0.64, acc 0 -> 0.64
    # ECE = (0.28 + 0.64) / 2 = 0.46
    assert out["ece"] == pytest.approx(0.46, abs=1e-6)
    assert out["nll"] == pytest.approx(-(math.log(0.72) + math.log(0.1)) / 2, rel=1e-6)
    # row 0: 0.28^2 + 0.18^2 + 0.1^2 = 0.1208; row 1: 0.64^2 + 0.26^2 + 0.9^2 = 1.2872
    assert out["brier"] == pytest.approx((0.1208 + 1.2872) / 2, abs=1e-6)
    # row 0 has the lower entropy and is right: risk 0 at coverage 1/2, 1/2 at coverage 1
    assert out["aurc"] == pytest.approx((0 + 0.5) / 2)


def test_plot_reliability_diagram_writes_png(tmp_path):
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(2 * torch.randn(200, 4, generator=g), dim=1)
    labels = torch.randint(0, 4, (200,), generator=g)
    path = tmp_path / "nested" / "dir" / "reliability.png"
    plot_reliability_diagram(probs, labels, path, title="random", n_bins=10)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 1000


# ---------------------------------------------------------------- invalid inputs

GOOD_P = T([[0.6, 0.4], [0.3, 0.7]])
GOOD_Y = T([0, 1])

ALL_FUNCS = [
    accuracy,
    macro_f1,
    expected_calibration_error,
    negative_log_likelihood,
    brier_score,
    reliability_diagram_data,
    compute_metrics,
]


@pytest.mark.parametrize("fn", ALL_FUNCS, ids=lambda f: f.__name__)
@pytest.mark.parametrize(
    "probs,labels,match",
    [
        (T([0.6, 0.4]), T([0]), "shape"),  # probs 1-D
        (GOOD_P, T([[0], [1]]), "shape"),  # labels 2-D
        (GOOD_P, T([0, 1, 1]), "rows"),  # N mismatch
        (torch.zeros(0, 2), torch.zeros(0, dtype=torch.long), "empty"),  # empty
        (GOOD_P, T([0, 2]), "labels must lie"),  # label == C
        (GOOD_P, T([-1, 0]), "labels must lie"),  # negative label
        (T([[float("nan"), 1.0], [0.3, 0.7]]), GOOD_Y, "NaN"),  # NaN
        (T([[2.0, -1.0], [0.3, 0.7]]), GOOD_Y, r"\[0, 1\]"),  # logits, not probs
        (T([[0.6, 0.6], [0.3, 0.7]]), GOOD_Y, "sum to 1"),  # row sums to 1.2
        (T([[1, 0], [0, 1]]), GOOD_Y, "floating"),  # integer probs
        (GOOD_P, T([0.0, 1.0]), "integer"),  # float labels
        (T([[1.0], [1.0]]), T([0, 0]), "2 columns"),  # a single option
    ],
)
def test_invalid_inputs_raise(fn, probs, labels, match):
    with pytest.raises(ValueError, match=match):
        fn(probs, labels)


@pytest.mark.parametrize("fn", [expected_calibration_error, reliability_diagram_data])
@pytest.mark.parametrize("n_bins", [0, -3, 2.5])
def test_invalid_n_bins(fn, n_bins):
    with pytest.raises(ValueError, match="n_bins"):
        fn(GOOD_P, GOOD_Y, n_bins=n_bins)


def test_plot_validates_before_writing(tmp_path):
    path = tmp_path / "x.png"
    with pytest.raises(ValueError, match="NaN"):
        plot_reliability_diagram(T([[float("nan"), 1.0]]), T([0]), path)
    assert not path.exists()


# ---------------------------------------------------------------- bootstrap intervals


def test_bootstrap_interval_of_a_constant_is_the_constant():
    from abmll.metrics import bootstrap_mean_ci

    assert bootstrap_mean_ci([0.3] * 7) == pytest.approx((0.3, 0.3, 0.3))


def test_bootstrap_interval_matches_the_normal_approximation():
    from abmll.metrics import bootstrap_mean_ci

    rng = np.random.default_rng(0)
    x = rng.normal(1.0, 2.0, 400)
    mean, lo, hi = bootstrap_mean_ci(x, n_boot=4000)
    half = 1.96 * x.std(ddof=1) / math.sqrt(len(x))  # the CLT's 95% half-width
    assert mean == pytest.approx(x.mean())
    assert lo < mean < hi
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.08)
    assert bootstrap_mean_ci(x, n_boot=4000) == (mean, lo, hi)  # seeded: reproducible
    with pytest.raises(ValueError, match="finite"):
        bootstrap_mean_ci([1.0, float("nan")])


# ---------------------------------------------------------------- ties and degenerate sets vs scikit-learn


def _sklearn_reference(probs: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    from sklearn.metrics import accuracy_score, f1_score

    preds = probs.argmax(axis=1)  # numpy: the first maximum, the documented tie rule
    present = sorted(set(labels.tolist()) | set(preds.tolist()))
    return accuracy_score(labels, preds), f1_score(labels, preds, average="macro", labels=present, zero_division=0)


DEGENERATE = {
    "all options tied": (np.full((6, 3), 1 / 3), np.array([0, 1, 2, 0, 1, 2])),
    "ties between two of three": (np.array([[0.4, 0.4, 0.2], [0.2, 0.4, 0.4], [0.45, 0.1, 0.45]]), np.array([1, 2, 2])),
    "one class in the test set": (np.array([[0.9, 0.1], [0.3, 0.7], [0.6, 0.4]]), np.array([0, 0, 0])),
    "one class, always predicted": (np.array([[0.9, 0.1], [0.8, 0.2]]), np.array([0, 0])),
    "a class never predicted": (np.array([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1]]), np.array([0, 2, 1])),
    "a single example": (np.array([[0.2, 0.8]]), np.array([0])),
}


@pytest.mark.parametrize("case", list(DEGENERATE))
def test_ties_and_degenerate_sets_follow_scikit_learn(case):
    probs, labels = DEGENERATE[case]
    acc, f1 = _sklearn_reference(probs, labels)
    p, y = torch.from_numpy(probs), torch.from_numpy(labels)
    assert accuracy(p, y) == pytest.approx(acc, abs=1e-12)
    assert macro_f1(p, y) == pytest.approx(f1, abs=1e-6)
    ece = expected_calibration_error(p, y)
    assert ece == pytest.approx(_ece_reference(probs, labels, 15), abs=1e-9)


@settings(max_examples=60, deadline=None)
@given(
    st.integers(2, 4).flatmap(
        lambda c: st.tuples(
            st.lists(st.lists(st.integers(0, 3), min_size=c, max_size=c), min_size=1, max_size=12),
            st.lists(st.integers(0, c - 1), min_size=12, max_size=12),
        )
    )
)
def test_accuracy_and_macro_f1_match_scikit_learn_on_coarse_scores(data):
    """Scores on a 4-level grid, so ties are frequent; labels drawn freely (often a single class)."""
    rows, label_pool = data
    scores = np.array(rows, dtype=np.float64)
    probs = np.exp(scores) / np.exp(scores).sum(axis=1, keepdims=True)
    labels = np.array(label_pool[: len(rows)])
    acc, f1 = _sklearn_reference(probs, labels)
    assert accuracy(torch.from_numpy(probs), torch.from_numpy(labels)) == pytest.approx(acc, abs=1e-12)
    assert macro_f1(torch.from_numpy(probs), torch.from_numpy(labels)) == pytest.approx(f1, abs=1e-6)


def test_a_confidence_on_a_bin_edge_goes_to_the_lower_bin_for_any_bin_count():
    # 0.55 = 11/20 is the upper edge of (0.50, 0.55]; torch.linspace's edge is 0.5499999999999999
    for n_bins, conf, expected_bin in ((20, 0.55, 10), (10, 0.7, 6), (15, 0.6, 8)):
        probs = torch.tensor([[conf, 1 - conf]], dtype=torch.float64)
        data = reliability_diagram_data(probs, torch.tensor([0]), n_bins=n_bins)
        assert data["count"][expected_bin] == 1.0, (n_bins, conf)


def test_cluster_bootstrap_resamples_whole_clusters():
    from abmll.metrics import bootstrap_mean_ci

    # two clusters, perfectly correlated inside: the cluster bootstrap sees 2 values, not 8
    values = [0.0] * 4 + [1.0] * 4
    clusters = ["a"] * 4 + ["b"] * 4
    mean, lo, hi = bootstrap_mean_ci(values, clusters=clusters, n_boot=4000)
    assert mean == 0.5 and lo == 0.0 and hi == 1.0
    _, lo_units, hi_units = bootstrap_mean_ci(values, n_boot=4000)
    assert lo_units > 0.1 and hi_units < 0.9  # units treated as independent: too narrow
    with pytest.raises(ValueError, match="equal sizes"):
        bootstrap_mean_ci([1.0, 2.0, 3.0], clusters=["a", "a", "b"])
