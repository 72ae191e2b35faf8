"""Tests for llmcal.metrics: references (torchmetrics, loops), hand arithmetic, properties."""
from __future__ import annotations

import functools
import json
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmcal.errors import LlmcalError
from llmcal.metrics import (
    BinStats,
    accuracy,
    auroc,
    bin_statistics,
    bootstrap_ci,
    brier,
    classwise_ece,
    compute_metrics,
    conf_ece,
    ece_from_statistics,
    equal_mass_ece,
    mce,
    mean_confidence,
    metrics_from_predictions,
    nll,
    reliability_bins,
)
from llmcal.metrics.core import bin_index
from llmcal.predictions import Prediction, softmax


# --------------------------------------------------------------------------- helpers

def random_probs(rng, n, k, scale=3.0):
    return softmax(rng.normal(size=(n, k)) * scale), rng.integers(0, k, size=n)


def away_from_edges(rng, n, k, n_bins):
    """Random probs whose max is at least 0.01/M from every bin edge (torchmetrics bins differ at edges)."""
    p, a = random_probs(rng, 4 * n, k)
    c = p.max(axis=1) * n_bins
    keep = np.abs(c - np.round(c)) > 1e-2
    return p[keep][:n], a[keep][:n]


def cw_ece_loop(probs, answers, n_bins):
    """Straightforward classwise ECE: for each column, each bin, a Python loop over samples."""
    n, k = probs.shape
    total = 0.0
    for j in range(k):
        for m in range(n_bins):
            members = [i for i in range(n) if min(int(math.floor(probs[i, j] * n_bins)), n_bins - 1) == m]
            if not members:
                continue
            freq = sum(1.0 for i in members if answers[i] == j) / len(members)
            mean_p = sum(probs[i, j] for i in members) / len(members)
            total += len(members) / n * abs(freq - mean_p)
    return total / k


def auroc_pairs(conf, correct):
    """O(N^2) AUROC: P(conf of a correct > conf of a wrong) + 0.5 P(tie)."""
    pos = [c for c, y in zip(conf, correct) if y]
    neg = [c for c, y in zip(conf, correct) if not y]
    wins = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p in pos for q in neg)
    return wins / (len(pos) * len(neg))


@st.composite
def prob_data(draw, min_n=1, max_n=60):
    n = draw(st.integers(min_n, max_n))
    k = draw(st.integers(2, 5))
    seed = draw(st.integers(0, 2**32 - 1))
    scale = draw(st.sampled_from([0.1, 1.0, 3.0, 10.0]))
    rng = np.random.default_rng(seed)
    p, a = random_probs(rng, n, k, scale)
    return p, a


FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------- against torchmetrics

@pytest.mark.parametrize("n_bins", [5, 10, 15])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_conf_ece_and_mce_match_torchmetrics(n_bins, seed):
    torch = pytest.importorskip("torch")
    tmf = pytest.importorskip("torchmetrics.functional.classification")
    rng = np.random.default_rng(seed)
    p, a = away_from_edges(rng, 500, 4, n_bins)
    tp, ta = torch.tensor(p, dtype=torch.float64), torch.tensor(a)
    ref_ece = float(tmf.multiclass_calibration_error(tp, ta, num_classes=4, n_bins=n_bins, norm="l1"))
    ref_mce = float(tmf.multiclass_calibration_error(tp, ta, num_classes=4, n_bins=n_bins, norm="max"))
    assert conf_ece(p, a, n_bins) == pytest.approx(ref_ece, abs=1e-6)
    assert mce(p, a, n_bins) == pytest.approx(ref_mce, abs=1e-6)


# --------------------------------------------------------------------------- hand-computed cases

# Four questions, three options.
P4 = np.array([
    [0.70, 0.20, 0.10],  # pred 0, conf 0.70, answer 0 -> correct, bin 7
    [0.25, 0.60, 0.15],  # pred 1, conf 0.60, answer 2 -> wrong,   bin 6
    [0.05, 0.05, 0.90],  # pred 2, conf 0.90, answer 2 -> correct, bin 9
    [0.35, 0.40, 0.25],  # pred 1, conf 0.40, answer 0 -> wrong,   bin 4
])
A4 = np.array([0, 2, 2, 0])


def test_bin_index_edges():
    # left-closed bins, last bin closed: 0.0 -> 0, 0.1 -> 1, 0.0999 -> 0, 1.0 -> 9
    assert bin_index(np.array([0.0, 0.0999, 0.1, 0.55, 0.9, 0.99, 1.0]), 10).tolist() == [0, 0, 1, 5, 9, 9, 9]
    # float slack past [0, 1] is clipped
    assert bin_index(np.array([-1e-12, 1 + 1e-12]), 10).tolist() == [0, 9]
    assert bin_index(np.array([0.5, 0.49]), 2).tolist() == [1, 0]
    assert bin_index(np.array([0.0, 1.0]), 1).tolist() == [0, 0]


def test_accuracy_hand():
    # correct: 1, 0, 1, 0 -> 2/4
    assert accuracy(P4, A4) == 0.5


def test_mean_confidence_hand():
    # (0.7 + 0.6 + 0.9 + 0.4) / 4 = 2.6 / 4
    assert mean_confidence(P4) == pytest.approx(0.65)


def test_conf_ece_hand():
    # every question alone in its bin: (|1-0.7| + |0-0.6| + |1-0.9| + |0-0.4|) / 4 = (0.3+0.6+0.1+0.4)/4
    assert conf_ece(P4, A4) == pytest.approx(1.4 / 4)
    # two bins (M=2): bin 0 = {0.4 wrong}; bin 1 = {0.7 c, 0.6 w, 0.9 c}
    # bin 1: acc 2/3, conf 2.2/3 -> |2/3 - 2.2/3| = 0.2/3, weight 3/4; bin 0: |0 - 0.4|, weight 1/4
    assert conf_ece(P4, A4, n_bins=2) == pytest.approx(3 / 4 * 0.2 / 3 + 1 / 4 * 0.4)
    # one bin: |acc - mean conf| = |0.5 - 0.65|
    assert conf_ece(P4, A4, n_bins=1) == pytest.approx(0.15)


def test_mce_hand():
    # M=10: max(0.3, 0.6, 0.1, 0.4) = 0.6 ; M=2: max(0.2/3, 0.4) = 0.4
    assert mce(P4, A4) == pytest.approx(0.6)
    assert mce(P4, A4, n_bins=2) == pytest.approx(0.4)


def test_equal_mass_ece_hand():
    # sorted by conf: 0.4 w, 0.6 w, 0.7 c, 0.9 c ; M=2 -> {0.4 w, 0.6 w}, {0.7 c, 0.9 c}
    # bin 1: |0 - 0.5| * 2/4 ; bin 2: |1 - 0.8| * 2/4 -> 0.25 + 0.1
    assert equal_mass_ece(P4, A4, n_bins=2) == pytest.approx(0.35)
    # M=1 equals |acc - mean conf|
    assert equal_mass_ece(P4, A4, n_bins=1) == pytest.approx(0.15)
    # M >= N: one question per bin, same as the equal-width case here
    assert equal_mass_ece(P4, A4, n_bins=10) == pytest.approx(1.4 / 4)
    # M=3 on 4 questions: array_split sizes 2, 1, 1 -> {0.4 w, 0.6 w}, {0.7 c}, {0.9 c}
    # (|0 - 0.5| * 2 + |1 - 0.7| + |1 - 0.9|) / 4 = (1.0 + 0.3 + 0.1) / 4
    assert equal_mass_ece(P4, A4, n_bins=3) == pytest.approx(1.4 / 4)


def test_classwise_ece_hand():
    # M=1: each class k contributes |mean 1{y=k} - mean p_k|
    # k=0: freq 2/4 = 0.5,  mean p = (0.7+0.25+0.05+0.35)/4 = 1.35/4 = 0.3375 -> 0.1625
    # k=1: freq 0,          mean p = (0.2+0.6+0.05+0.4)/4  = 1.25/4 = 0.3125 -> 0.3125
    # k=2: freq 2/4 = 0.5,  mean p = (0.1+0.15+0.9+0.25)/4 = 1.4/4  = 0.35   -> 0.15
    assert classwise_ece(P4, A4, n_bins=1) == pytest.approx((0.1625 + 0.3125 + 0.15) / 3)
    # M=2, class 0: p = 0.7 (y=1) | 0.25 (y=0), 0.05 (y=0), 0.35 (y=1)
    #   bin 1 {0.7}: |1 - 0.7| * 1/4 = 0.075 ; bin 0 {0.25,0.05,0.35}: |1/3 - 0.65/3| * 3/4 = 0.0875
    # class 1: p = 0.2, 0.6, 0.05, 0.4, all y=0: bin 1 {0.6}: 0.6/4 = 0.15 ; bin 0: 0.65/4 = 0.1625
    # class 2: p = 0.1 (0), 0.15 (1), 0.9 (1), 0.25 (0): bin 1 {0.9}: 0.1/4 = 0.025 ;
    #   bin 0 {0.1, 0.15, 0.25}: |1/3 - 0.5/3| * 3/4 = 0.125
    expected = (0.075 + 0.0875 + 0.15 + 0.1625 + 0.025 + 0.125) / 3
    assert classwise_ece(P4, A4, n_bins=2) == pytest.approx(expected)


def test_brier_hand():
    # row 0: (0.3^2 + 0.2^2 + 0.1^2) = 0.14 ; row 1: 0.25^2 + 0.6^2 + 0.85^2 = 0.0625+0.36+0.7225 = 1.145
    # row 2: 0.05^2 + 0.05^2 + 0.1^2 = 0.015 ; row 3: 0.65^2 + 0.4^2 + 0.25^2 = 0.4225+0.16+0.0625 = 0.645
    assert brier(P4, A4) == pytest.approx((0.14 + 1.145 + 0.015 + 0.645) / 4)


def test_nll_hand():
    # -(log 0.7 + log 0.15 + log 0.9 + log 0.35) / 4
    assert nll(P4, A4) == pytest.approx(-(math.log(0.7) + math.log(0.15) + math.log(0.9) + math.log(0.35)) / 4)
    # a zero probability on the answer is floored at eps
    assert nll(np.array([[1.0, 0.0]]), np.array([1]), eps=1e-12) == pytest.approx(-math.log(1e-12))


def test_auroc_hand():
    # correct confs {0.7, 0.9}, wrong {0.6, 0.4}: every correct beats every wrong -> 1
    assert auroc(np.array([0.7, 0.6, 0.9, 0.4]), np.array([1, 0, 1, 0])) == 1.0
    # correct {0.5, 0.8}, wrong {0.5, 0.9}: pairs (0.5,0.5)=0.5 (0.5,0.9)=0 (0.8,0.5)=1 (0.8,0.9)=0 -> 1.5/4
    assert auroc(np.array([0.5, 0.8, 0.5, 0.9]), np.array([1, 1, 0, 0])) == pytest.approx(0.375)
    assert math.isnan(auroc(np.array([0.5, 0.6]), np.array([1, 1])))
    assert math.isnan(auroc(np.array([0.5, 0.6]), np.array([0, 0])))


def test_reliability_bins_hand():
    r = reliability_bins(P4, A4, n_bins=2)
    assert r["n_bins"] == 2
    assert r["edges"] == [0.0, 0.5, 1.0]
    assert r["count"] == [1, 3]
    assert r["accuracy"] == pytest.approx([0.0, 2 / 3])
    assert r["confidence"] == pytest.approx([0.4, 2.2 / 3])
    r10 = reliability_bins(P4, A4)
    assert len(r10["edges"]) == 11 and r10["count"] == [0, 0, 0, 0, 1, 0, 1, 1, 0, 1]
    assert r10["accuracy"][0] is None and r10["confidence"][5] is None
    json.dumps(r10)


def test_bin_statistics_and_ece_from_statistics_hand():
    s = bin_statistics(np.array([0.7, 0.6, 0.9, 0.4]), np.array([True, False, True, False]), n_bins=2)
    assert s.count.tolist() == [1, 3]
    assert s.sum_conf == pytest.approx([0.4, 2.2])
    assert s.sum_correct.tolist() == [0, 2]
    assert s.accuracy == pytest.approx([0.0, 2 / 3])
    # (|0 - 0.4| + |2 - 2.2|) / 4
    assert ece_from_statistics(s) == pytest.approx(0.6 / 4)
    empty = bin_statistics(np.array([]), np.array([]), n_bins=3)
    assert empty.count.tolist() == [0, 0, 0] and np.isnan(empty.accuracy).all()
    with pytest.raises(LlmcalError):
        ece_from_statistics(empty)


def test_binstats_add_sum_and_array_roundtrip():
    a = bin_statistics(np.array([0.1, 0.95]), np.array([0, 1]), 4)
    b = bin_statistics(np.array([0.3]), np.array([1]), 4)
    c = a + b
    assert c.count.tolist() == [1, 1, 0, 1]
    assert sum([a, b]).count.tolist() == c.count.tolist()
    r = BinStats.from_array(c.to_array())
    assert np.array_equal(r.sum_conf, c.sum_conf)
    with pytest.raises(LlmcalError):
        a + BinStats.zeros(5)
    with pytest.raises(Exception):
        a.count = np.zeros(4)  # frozen


# --------------------------------------------------------------------------- independent references

@pytest.mark.parametrize("seed", range(4))
def test_classwise_ece_matches_loop(seed):
    rng = np.random.default_rng(seed)
    p, a = random_probs(rng, 150, 4, scale=2.0)
    for m in (1, 5, 10):
        assert classwise_ece(p, a, m) == pytest.approx(cw_ece_loop(p, a, m), abs=1e-12)


def test_classwise_ece_zero_padded_columns():
    rng = np.random.default_rng(7)
    p3, a3 = random_probs(rng, 40, 3)
    p = np.hstack([p3, np.zeros((40, 1))])
    assert classwise_ece(p, a3, 10) == pytest.approx(cw_ece_loop(p, a3, 10), abs=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_auroc_matches_pair_counting(seed):
    rng = np.random.default_rng(seed)
    conf = np.round(rng.uniform(0.2, 1.0, size=200), 2)  # rounding creates ties
    correct = rng.uniform(size=200) < conf
    assert auroc(conf, correct) == pytest.approx(auroc_pairs(conf, correct), abs=1e-12)


# --------------------------------------------------------------------------- validation

@pytest.mark.parametrize("probs, answers, match", [
    (np.zeros((0, 3)), np.zeros(0, dtype=int), "empty"),
    (np.full((2, 2), 0.5), np.array([0]), "2 rows but answers has 1"),
    (np.full((2, 2), 0.5), np.array([0, 2]), "out of range"),
    (np.full((2, 2), 0.5), np.array([0, -1]), "out of range"),
    (np.full(4, 0.25), np.array([0]), "2-D"),
    (np.full((2, 2), 0.5), np.array([[0], [1]]), "1-D"),
    (np.array([[0.5, 0.6], [0.5, 0.5]]), np.array([0, 1]), "sum to 1"),
    (np.array([[np.nan, 1.0]]), np.array([0]), "non-finite"),
    (np.full((2, 2), 0.5), np.array([0.5, 1.0]), "integer"),
])
def test_invalid_inputs_raise(probs, answers, match):
    with pytest.raises(LlmcalError, match=match):
        conf_ece(probs, answers)


def test_invalid_n_bins_and_bootstrap_args():
    with pytest.raises(LlmcalError, match="n_bins"):
        conf_ece(P4, A4, n_bins=0)
    with pytest.raises(LlmcalError, match="n_bins"):
        compute_metrics(P4, A4, n_bins=0)
    with pytest.raises(LlmcalError, match="level"):
        bootstrap_ci(accuracy, P4, A4, level=1.5)
    with pytest.raises(LlmcalError, match="n_resamples"):
        bootstrap_ci(accuracy, P4, A4, n_resamples=0)
    with pytest.raises(LlmcalError, match="subjects"):
        compute_metrics(P4, A4, subjects=["a"])


# --------------------------------------------------------------------------- bootstrap

def test_bootstrap_fast_paths_match_generic_path():
    rng = np.random.default_rng(3)
    p, a = random_probs(rng, 300, 4)
    for fn in (accuracy, conf_ece, functools.partial(conf_ece, n_bins=7)):
        fast = bootstrap_ci(fn, p, a, n_resamples=200, seed=5)
        slow = bootstrap_ci(lambda pp, aa, fn=fn: fn(pp, aa), p, a, n_resamples=200, seed=5)
        assert fast == pytest.approx(slow, abs=1e-12)


def test_bootstrap_is_seeded_and_fast():
    import time

    rng = np.random.default_rng(0)
    p, a = random_probs(rng, 14000, 4)
    t = time.perf_counter()
    ci1 = bootstrap_ci(conf_ece, p, a, n_resamples=1000, seed=1)
    elapsed = time.perf_counter() - t
    assert ci1 == bootstrap_ci(conf_ece, p, a, n_resamples=1000, seed=1)
    assert ci1 != bootstrap_ci(conf_ece, p, a, n_resamples=1000, seed=2)
    assert elapsed < 5.0


# --------------------------------------------------------------------------- compute_metrics

def test_compute_metrics_keys_types_and_json():
    rng = np.random.default_rng(0)
    p, a = random_probs(rng, 200, 4)
    subjects = ["math", None, "bio", "math"] * 50
    r = compute_metrics(p, a, n_bootstrap=100, subjects=subjects)
    assert set(r) == {"n", "accuracy", "conf_ece", "cw_ece", "em_ece", "mce", "brier", "nll", "auroc",
                      "mean_conf", "ci", "reliability", "per_subject", "n_bins", "smece", "smece_sigma",
                      "l2_ce_debiased", "aurc", "acc_at_80", "acc_at_50", "estimators", "rms_ce", "ece_1_bin",
                      "platt_ece_1_bin", "platt_ece_10_bin", "platt_coef", "platt_intercept", "selective_acc_at_10"}
    assert r["n"] == 200 and r["n_bins"] == 10
    for key in ("accuracy", "conf_ece", "cw_ece", "em_ece", "mce", "brier", "nll", "auroc", "mean_conf",
                "smece", "smece_sigma", "l2_ce_debiased", "aurc", "acc_at_80", "acc_at_50"):
        assert type(r[key]) is float
    assert r["accuracy"] == accuracy(p, a) and r["conf_ece"] == conf_ece(p, a)
    assert set(r["ci"]) == {"accuracy", "conf_ece", "aurc"}
    assert all(len(v) == 2 and all(type(x) is float for x in v) for v in r["ci"].values())
    assert set(r["per_subject"]) == {"(none)", "bio", "math"}
    assert r["per_subject"]["math"]["n"] == 100
    assert set(r["per_subject"]["bio"]) == {"n", "accuracy", "conf_ece"}
    assert set(r["estimators"]) >= set(r) - {"n", "reliability", "per_subject", "n_bins", "estimators",
                                             "smece_sigma"}
    json.loads(json.dumps(r))
    assert compute_metrics(p, a, n_bootstrap=0)["per_subject"] == {}


def test_metrics_from_predictions_mixed_option_counts():
    preds = [
        Prediction.from_logits("q1", "a", 0, [2.0, 0.0, -1.0, 0.5]),
        Prediction.from_logits("q2", "b", 1, [0.0, 1.0]),
        Prediction.from_logits("q3", None, 2, [0.3, 0.2, 0.1]),
    ]
    r = metrics_from_predictions(preds, n_bootstrap=50)
    assert r["n"] == 3
    assert r["accuracy"] == pytest.approx(2 / 3)
    assert r["mean_conf"] == pytest.approx(np.mean([p.conf for p in preds]))
    assert set(r["per_subject"]) == {"a", "b", "(none)"}
    with pytest.raises(LlmcalError):
        metrics_from_predictions([])


# --------------------------------------------------------------------------- properties

@FAST
@given(prob_data())
def test_ece_bounds_and_lower_bound(data):
    p, a = data
    acc, mc = accuracy(p, a), mean_confidence(p)
    for fn in (conf_ece, equal_mass_ece):
        for m in (1, 10):
            e = fn(p, a, m)
            assert 0.0 <= e <= 1.0
            # the triangle inequality over bins: ECE >= |mean conf - acc|
            assert e >= abs(mc - acc) - 1e-12
    assert 0.0 <= classwise_ece(p, a) <= 1.0
    assert conf_ece(p, a) <= mce(p, a) + 1e-12 <= 1.0 + 1e-12


@FAST
@given(st.integers(1, 50), st.integers(2, 6), st.integers(0, 2**32 - 1))
def test_perfect_one_hot_predictions_have_zero_error(n, k, seed):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, k, size=n)
    p = np.eye(k)[a]
    assert accuracy(p, a) == 1.0
    assert conf_ece(p, a) == 0.0
    assert classwise_ece(p, a) == 0.0
    assert equal_mass_ece(p, a) == 0.0
    assert mce(p, a) == 0.0
    assert brier(p, a) == 0.0


@FAST
@given(st.lists(st.tuples(st.floats(0, 1), st.booleans()), max_size=40),
       st.lists(st.tuples(st.floats(0, 1), st.booleans()), max_size=40),
       st.integers(1, 20))
def test_binstats_addition_equals_stats_of_concatenation(xs, ys, m):
    def stats(pairs):
        return bin_statistics(np.array([c for c, _ in pairs], dtype=float),
                              np.array([y for _, y in pairs], dtype=float), m)
    s = stats(xs) + stats(ys)
    t = stats(xs + ys)
    assert np.array_equal(s.count, t.count)
    assert np.allclose(s.sum_conf, t.sum_conf, atol=1e-12)
    assert np.array_equal(s.sum_correct, t.sum_correct)


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 2**32 - 1), st.floats(0.5, 3.0))
def test_bootstrap_ci_contains_point_estimate(seed, overconfidence):
    # reasonable data: a few hundred questions whose confidences are miscalibrated by a visible margin
    rng = np.random.default_rng(seed)
    n, k = 400, 4
    true_logits = rng.normal(size=(n, k)) * 1.5
    a = np.array([rng.choice(k, p=row) for row in softmax(true_logits)])
    p = softmax(true_logits * (1.0 + overconfidence))
    for fn in (accuracy, conf_ece):
        lo, hi = bootstrap_ci(fn, p, a, n_resamples=300, seed=seed)
        assert lo <= fn(p, a) <= hi


@FAST
@given(prob_data(min_n=2), st.integers(0, 2**32 - 1))
def test_metrics_invariant_to_row_permutation(data, seed):
    p, a = data
    perm = np.random.default_rng(seed).permutation(len(a))
    for fn in (accuracy, conf_ece, classwise_ece, equal_mass_ece, mce, brier, nll):
        assert fn(p[perm], a[perm]) == pytest.approx(fn(p, a), abs=1e-12)
    conf, correct = p.max(axis=1), p.argmax(axis=1) == a
    x, y = auroc(conf[perm], correct[perm]), auroc(conf, correct)
    assert (math.isnan(x) and math.isnan(y)) or x == pytest.approx(y, abs=1e-12)
    assert reliability_bins(p[perm], a[perm])["count"] == reliability_bins(p, a)["count"]


# --------------------------------------------------------------------------- smooth ECE, debiased L2, bin sweep

from llmcal.metrics import (  # noqa: E402  (the newer metrics, tested below)
    aurc,
    bootstrap_diff_ci,
    debiased_l2_ce,
    ece_bin_sweep,
    risk_coverage_curve,
    selective_accuracy,
    smooth_ece,
)
from llmcal.metrics.estimators import debiased_l2_ce_squared  # noqa: E402
from llmcal.metrics.selective import accuracy_at_coverage_80  # noqa: E402
from llmcal.metrics.smooth import smooth_ece_at, smooth_ece_fixed_point  # noqa: E402


def reflected_kernel_smece(f, y, sigma, points=20001):
    """smECE_sigma straight from the paper's definition: reflected Gaussian, dense trapezoid integral."""
    from scipy.stats import norm

    t = np.linspace(0.0, 1.0, points)[:, None]
    k = sum(norm.pdf(t - f[None, :] - 2 * j, scale=sigma) + norm.pdf(t + f[None, :] - 2 * j, scale=sigma)
            for j in range(-3, 4))
    return float(np.trapezoid(np.abs((k * (y - f)[None, :]).mean(axis=1)), t[:, 0]))


def miscalibrated(rng, n):
    """Confidences with under- and overconfident regions (so the smoothed residual changes sign)."""
    f = rng.uniform(size=n)
    y = (rng.uniform(size=n) < np.clip(0.5 + (f - 0.5) * 2.5, 0, 1)).astype(float)
    return f, y


@pytest.mark.parametrize("sigma", [0.02, 0.1, 0.3])
def test_smooth_ece_at_matches_the_definition(sigma):
    f, y = miscalibrated(np.random.default_rng(1), 120)
    assert smooth_ece_at(f, y, sigma) == pytest.approx(reflected_kernel_smece(f, y, sigma), abs=2e-6)


def test_smooth_ece_fixed_point_and_relplot():
    relplot = pytest.importorskip("relplot")  # the authors' package: in the test extra
    for seed, n in ((0, 300), (1, 3000)):
        f, y = miscalibrated(np.random.default_rng(seed), n)
        value, sigma = smooth_ece_fixed_point(f, y)
        assert sigma == pytest.approx(value, abs=1e-6)  # the fixed point sigma = smECE_sigma
        assert smooth_ece_at(f, y, sigma) == pytest.approx(value, abs=1e-12)
        assert value == pytest.approx(float(relplot.smECE(f, y)), abs=1e-3)


def test_smooth_ece_one_sided_gap_is_the_mean_gap():
    # when every smoothed residual has one sign, the integral is |mean(y - f)| at any bandwidth
    f = np.full(50, 0.9)
    y = np.r_[np.ones(30), np.zeros(20)]
    assert smooth_ece_at(f, y, 0.05) == pytest.approx(0.3, abs=1e-9)
    p = np.stack([f, 1 - f], axis=1)
    assert smooth_ece(p, np.where(y == 1, 0, 1)) == pytest.approx(0.3, abs=1e-9)


def test_smooth_ece_rejects_bad_input():
    with pytest.raises(LlmcalError):
        smooth_ece_at([0.5], [1.0], 0.0)
    with pytest.raises(LlmcalError):
        smooth_ece_at([1.5], [1.0], 0.1)
    with pytest.raises(LlmcalError):
        smooth_ece_at([0.5, 0.6], [1.0], 0.1)


def test_debiased_l2_hand_case():
    # one bin of 8 at confidence 0.8 with 3 right: (3/8 - 0.8)^2 - (3/8)(5/8)/7
    p = two_column([0.8] * 8)
    a = np.r_[0, 0, 0, 1, 1, 1, 1, 1]
    est = debiased_l2_ce_squared(p, a, n_bins=1)
    assert est == pytest.approx((3 / 8 - 0.8) ** 2 - (3 / 8) * (5 / 8) / 7)
    assert debiased_l2_ce(p, a, n_bins=1) == pytest.approx(np.sqrt(est))
    # two bins of 4 with distinct confidences
    p2 = np.stack([np.r_[[0.6] * 4, [0.9] * 4], np.r_[[0.4] * 4, [0.1] * 4]], axis=1)
    a2 = np.r_[0, 1, 1, 1, 0, 0, 1, 1]
    want = 0.5 * ((0.25 - 0.6) ** 2 - 0.25 * 0.75 / 3) + 0.5 * ((0.5 - 0.9) ** 2 - 0.25 / 3)
    assert debiased_l2_ce_squared(p2, a2, n_bins=2) == pytest.approx(want)


def test_debiased_l2_matches_kumar_et_al_package():
    calibration = pytest.importorskip("calibration")  # uncertainty-calibration (the authors' code)
    rng = np.random.default_rng(3)
    p, a = random_probs(rng, 1500, 4, scale=1.5)
    ref = calibration.lower_bound_scaling_ce(p, a, p=2, debias=True, num_bins=15,
                                             binning_scheme=calibration.get_equal_bins, mode="top-label")
    assert debiased_l2_ce(p, a) == pytest.approx(ref, abs=1e-10)


def test_debiased_l2_is_near_zero_for_a_calibrated_model_where_ece_is_not():
    rng = np.random.default_rng(0)
    vals, eces = [], []
    for _ in range(20):
        p, _ = random_probs(rng, 400, 4, scale=1.0)
        a = (np.cumsum(p, axis=1) < rng.uniform(size=(400, 1))).sum(axis=1).clip(0, 3)  # y ~ p: calibrated
        vals.append(debiased_l2_ce_squared(p, a))
        eces.append(conf_ece(p, a))
    assert abs(np.mean(vals)) < 5e-4
    assert np.mean(eces) > 0.02  # the plug-in estimate is biased upwards


def test_ece_bin_sweep():
    rng = np.random.default_rng(0)
    p, a = random_probs(rng, 300, 4)
    s = ece_bin_sweep(p, a, bins=(5, 10, 20))
    assert s["bins"] == [5, 10, 20]
    assert s["equal_width"] == [conf_ece(p, a, m) for m in (5, 10, 20)]
    assert s["equal_mass"] == [equal_mass_ece(p, a, m) for m in (5, 10, 20)]
    assert s["spread"]["equal_width"] == pytest.approx(max(s["equal_width"]) - min(s["equal_width"]))
    with pytest.raises(LlmcalError):
        ece_bin_sweep(p, a, bins=())


# --------------------------------------------------------------------------- selective prediction

def brute_aurc(conf, correct):
    order = np.argsort(-conf, kind="stable")
    errors = np.cumsum(1 - correct[order])
    return float(np.mean(errors / np.arange(1, len(conf) + 1)))


def two_column(conf):
    conf = np.asarray(conf, dtype=float)
    return np.stack([conf, 1 - conf], axis=1)


def test_aurc_without_ties_is_the_textbook_formula():
    rng = np.random.default_rng(0)
    p, a = random_probs(rng, 500, 4)
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == a).astype(float)
    assert aurc(p, a) == pytest.approx(brute_aurc(conf, correct), abs=1e-12)
    curve = risk_coverage_curve(p, a)
    assert curve.aurc == pytest.approx(aurc(p, a), abs=1e-12)
    assert curve.risk[-1] == pytest.approx(1 - accuracy(p, a))
    perm = rng.permutation(500)
    assert aurc(p[perm], a[perm]) == pytest.approx(aurc(p, a), abs=1e-12)


def test_aurc_ties_are_the_expectation_over_their_order():
    # conf 0.9 (right), 0.9 (wrong), 0.6 (right): risks 1/2, 1/2, 1/3 in expectation -> AURC 4/9
    p = two_column([0.9, 0.9, 0.6])
    a = np.array([0, 1, 0])
    assert aurc(p, a) == pytest.approx(4 / 9)
    # the same as averaging the textbook formula over both orders of the tie
    conf, correct = np.array([0.9, 0.9, 0.6]), np.array([1.0, 0.0, 1.0])
    both = (brute_aurc(conf, correct) + brute_aurc(conf[[1, 0, 2]], correct[[1, 0, 2]])) / 2
    assert aurc(p, a) == pytest.approx(both)


def test_selective_accuracy_hand_cases():
    conf = [0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.52]
    right = [1, 1, 0, 1, 1, 0, 1, 0, 0, 0]
    p = two_column(conf)
    a = np.array([0 if r else 1 for r in right])
    assert accuracy_at_coverage_80(p, a) == pytest.approx(5 / 8)
    assert selective_accuracy(p, a, 0.5) == pytest.approx(4 / 5)
    assert selective_accuracy(p, a, 1.0) == pytest.approx(0.5)
    assert selective_accuracy(p, a, 0.05) == 1.0  # ceil(0.5) = 1 question
    with pytest.raises(LlmcalError):
        selective_accuracy(p, a, 0.0)


@pytest.mark.parametrize("name", ["brier", "nll", "cw_ece", "aurc"])
def test_bootstrap_fast_paths_match_the_slow_path(name):
    rng = np.random.default_rng(0)
    p, a = random_probs(rng, 150, 4)
    fn = {"brier": brier, "nll": nll, "cw_ece": functools.partial(classwise_ece, n_bins=7), "aurc": aurc}[name]
    fast = bootstrap_ci(fn, p, a, n_resamples=200, seed=3)
    slow = bootstrap_ci(lambda pp, aa: fn(pp, aa), p, a, n_resamples=200, seed=3)
    assert fast == pytest.approx(slow, abs=1e-12)


def test_bootstrap_diff_ci_is_paired():
    rng = np.random.default_rng(0)
    p, a = random_probs(rng, 300, 4)
    assert bootstrap_diff_ci(accuracy, p, p, a, n_resamples=200) == (0.0, 0.0)
    # flipping one right answer to wrong changes accuracy by exactly -1/300 in every resample that holds it
    q = p.copy()
    i = int(np.flatnonzero(p.argmax(axis=1) == a)[0])
    q[i] = np.roll(q[i], 1) if q[i].argmax() != (np.roll(q[i], 1)).argmax() else q[i][::-1]
    lo, hi = bootstrap_diff_ci(accuracy, p, q, a, n_resamples=500)
    assert -4 / 300 <= lo <= hi <= 0.0
