"""Tests for llmcal.metrics.harness: HELM's numbers against the package HELM calls, RMS-CE against torchmetrics."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torchmetrics.functional.classification import binary_calibration_error

from llmcal.metrics import compute_metrics
from llmcal.metrics.harness import (ece_one_bin, helm_equal_mass_ece, platt_scaled_ece, rms_calibration_error,
                                    selective_accuracy_at_10)
from llmcal.predictions import softmax

cal = pytest.importorskip("calibration")  # uncertainty-calibration: what HELM's calibration_metrics.py calls


def _data(seed, n=300, k=4, scale=2.0, shift=0.0):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, k)) * scale
    p = softmax(z)
    a = rng.integers(0, k, size=n)
    # make correctness depend on confidence, so Platt scaling has something to fit
    top = p.argmax(axis=1)
    right = rng.random(n) < np.clip(p.max(axis=1) + shift, 0, 1)
    a = np.where(right, top, (top + 1 + rng.integers(0, k - 1, size=n)) % k)
    return p, a


def _conf_correct(p, a):
    return p.max(axis=1), (p.argmax(axis=1) == a).astype(np.int64)


def _away_from_edges(p, a, m):
    c = p.max(axis=1) * m
    keep = np.abs(c - np.round(c)) > 1e-2
    return p[keep], a[keep]


def test_rms_ce_hand_case():
    # bins of 10: {0.35 right, 0.35 wrong} gap 0.15 (conf 0.35 vs acc 0.5); {0.95 wrong} gap 0.95
    p = np.array([[0.35, 0.33, 0.32], [0.35, 0.33, 0.32], [0.95, 0.03, 0.02]])
    a = np.array([0, 1, 1])
    expected = np.sqrt(2 / 3 * 0.15 ** 2 + 1 / 3 * 0.95 ** 2)
    assert rms_calibration_error(p, a, 10) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("n_bins", [5, 10, 15])
def test_rms_ce_matches_torchmetrics_l2_and_the_plugin_l2_of_uncertainty_calibration(seed, n_bins):
    p, a = _away_from_edges(*_data(seed, n=400), n_bins)
    conf, correct = _conf_correct(p, a)
    ours = rms_calibration_error(p, a, n_bins)
    tm = float(binary_calibration_error(torch.tensor(conf), torch.tensor(correct), n_bins=n_bins, norm="l2"))
    plugin = cal.lower_bound_scaling_ce(conf, correct, p=2, debias=False, num_bins=n_bins,
                                        binning_scheme=cal.utils.get_equal_prob_bins)
    assert ours == pytest.approx(tm, abs=1e-6)
    assert ours == pytest.approx(plugin, abs=1e-10)
    assert ours >= compute_metrics(p, a, n_bins=n_bins, n_bootstrap=0)["conf_ece"] - 1e-12


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_ece_one_bin_is_helms_get_ece_with_one_bin(seed):
    p, a = _data(seed, shift=-0.2)
    conf, correct = _conf_correct(p, a)
    assert ece_one_bin(p, a) == pytest.approx(cal.get_ece(conf, correct, num_bins=1), abs=1e-12)
    assert ece_one_bin(p, a) == pytest.approx(abs(conf.mean() - correct.mean()), abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("n", [7, 55, 300])
def test_helm_equal_mass_ece_matches_get_ece_em_also_with_ties(seed, n):
    p, a = _data(seed, n=n)
    # duplicate rows so that ties straddle the equal-mass cuts
    p = np.concatenate([p, p[: n // 3]])
    a = np.concatenate([a, a[: n // 3]])
    conf, correct = _conf_correct(p, a)
    assert helm_equal_mass_ece(p, a, 10) == pytest.approx(cal.get_ece_em(conf, correct, num_bins=10), abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_platt_scaled_ece_matches_helm_computation(seed):
    p, a = _data(seed, n=500, shift=-0.25)
    conf, correct = _conf_correct(p, a)
    ours = platt_scaled_ece(p, a)
    # HELM: platt_scaler, clf = cal.get_platt_scaler(max_probs, correct, get_clf=True); ECEs of its output
    scaler, clf = cal.get_platt_scaler(conf, correct, get_clf=True)
    assert ours["platt_coef"] == pytest.approx(clf.coef_[0][0], abs=1e-3)
    assert ours["platt_intercept"] == pytest.approx(clf.intercept_[0], abs=1e-3)
    c2 = scaler(conf)
    assert ours["platt_ece_1_bin"] == pytest.approx(cal.get_ece(c2, correct, num_bins=1), abs=1e-4)
    assert ours["platt_ece_10_bin"] == pytest.approx(cal.get_ece_em(c2, correct, num_bins=10), abs=1e-4)
    # in-sample Platt scaling matches the mean exactly (the intercept's score equation): 1-bin ECE ~ 0
    assert ours["platt_ece_1_bin"] < 1e-8 < ece_one_bin(p, a)


def test_platt_scaled_ece_all_right_or_all_wrong_is_zero_as_helm_stores_it():
    p = softmax(np.random.default_rng(0).normal(size=(20, 4)))
    for a in (p.argmax(axis=1), (p.argmax(axis=1) + 1) % 4):
        r = platt_scaled_ece(p, a)
        assert r == {"platt_ece_1_bin": 0.0, "platt_ece_10_bin": 0.0, "platt_coef": None, "platt_intercept": None}


@pytest.mark.parametrize("n", [1, 5, 9, 10, 37, 200, 1001])
def test_selective_acc_at_10_is_helms_get_selective_stats_without_ties(n):
    p, a = _data(n, n=n)
    conf, correct = _conf_correct(p, a)
    assert len(np.unique(conf)) == n
    _, acc10 = cal.get_selective_stats(conf, correct)
    assert selective_accuracy_at_10(p, a) == pytest.approx(acc10, abs=1e-12)


def test_selective_acc_at_10_ties_are_the_expectation():
    # 20 questions, k = int(2) + 1 = 3; the top 4 share one confidence, 2 of them right: E = 3 * 2/4
    p = np.array([[0.9, 0.1]] * 4 + [[0.6, 0.4]] * 16)
    a = np.array([0, 0, 1, 1] + [0] * 16)
    assert selective_accuracy_at_10(p, a) == pytest.approx(0.5)


def test_compute_metrics_carries_the_harness_numbers_with_estimators():
    p, a = _data(0)
    r = compute_metrics(p, a, n_bootstrap=0)
    for key in ("rms_ce", "ece_1_bin", "platt_ece_1_bin", "platt_ece_10_bin", "platt_coef", "platt_intercept",
                "selective_acc_at_10"):
        assert key in r and key in r["estimators"]
    assert r["rms_ce"] == rms_calibration_error(p, a, 10)
    assert r["ece_1_bin"] == pytest.approx(abs(r["mean_conf"] - r["accuracy"]), abs=1e-12)
