"""The E-step's bin-accuracy estimator: shrinkage toward the gap-corrected confidence beats the raw bin accuracy
on small estimation sets, and agrees with it on large ones."""
from __future__ import annotations

import math

import numpy as np
import pytest

from llmcal.errors import LlmcalError
from llmcal.metrics import BinStats, bin_statistics
from llmcal.train.estimate import DEFAULT_PRIOR_STRENGTH, estimate_bin_accuracy, too_few

M = 10

# True calibration curves acc(c) and the confidence distribution 0.25 + 0.75 * Beta(a, b) of a 4-option model.
CURVES = {
    "overconfident": (lambda c: np.clip(c - 0.15 - 0.1 * (c - 0.5) ** 2, 0, 1), (6, 2)),
    "calibrated": (lambda c: c, (4, 2)),
    "underconfident": (lambda c: np.clip(0.3 + 0.9 * (c - 0.25), 0, 1), (2, 3)),
    "not monotone": (lambda c: np.clip(0.25 + 0.5 * np.sin(3 * c) ** 2, 0, 1), (3, 3)),
}


def _true_bin_accuracy(acc, shape) -> np.ndarray:
    """E[acc(c) | c in bin b] under the confidence distribution (Monte Carlo, 400k draws)."""
    c = 0.25 + 0.75 * np.random.default_rng(0).beta(*shape, 400_000)
    b = np.minimum((c * M).astype(int), M - 1)
    return np.array([acc(c[b == k]).mean() if (b == k).any() else np.nan for k in range(M)])


def _mse(acc, shape, n: int, estimator, reps: int = 600) -> float:
    """Mean squared error against the true bin accuracies over (draw, non-empty bin) pairs."""
    truth = _true_bin_accuracy(acc, shape)
    rng = np.random.default_rng(1)  # the same draws for every estimator
    errors = []
    for _ in range(reps):
        c = 0.25 + 0.75 * rng.beta(*shape, n)
        y = rng.random(n) < acc(c)
        est = estimator(bin_statistics(c, y, M))
        errors += [(v - truth[b]) ** 2 for b, v in enumerate(est) if v is not None]
    return float(np.mean(errors))


def _raw(stats: BinStats):  # the E-step before this estimator: sum_correct / count per bin
    return [None if math.isnan(a) else float(a) for a in stats.accuracy]


def _shrunk(stats: BinStats):
    return estimate_bin_accuracy(stats, DEFAULT_PRIOR_STRENGTH).accuracy


@pytest.mark.parametrize("curve", sorted(CURVES))
@pytest.mark.parametrize("n", [3, 10, 30])
def test_shrunk_estimate_has_lower_error_on_small_sets(curve, n):
    acc, shape = CURVES[curve]
    raw, shrunk = _mse(acc, shape, n, _raw), _mse(acc, shape, n, _shrunk)
    assert shrunk < 0.75 * raw, f"{curve}, n={n}: MSE shrunk {shrunk:.4f} vs raw {raw:.4f}"


def test_the_comparison_can_fail_with_a_wrong_prior():
    """Shrinking as strongly toward a wrong prior (accuracy 0) is worse than the raw estimate: the test above
    measures the prior, not just any shrinkage."""
    acc, shape = CURVES["calibrated"]

    def toward_zero(stats: BinStats):
        k = DEFAULT_PRIOR_STRENGTH
        return [None if c == 0 else float(s / (c + k)) for c, s in zip(stats.count, stats.sum_correct)]

    assert _mse(acc, shape, 10, toward_zero) > _mse(acc, shape, 10, _raw)


def test_large_sets_give_the_raw_estimate():
    rng = np.random.default_rng(3)
    c = rng.uniform(0.25, 1.0, 20_000)
    stats = bin_statistics(c, rng.random(20_000) < c - 0.1, M)
    est = estimate_bin_accuracy(stats)
    assert np.nanmax(np.abs(np.array(est.accuracy, dtype=float) - stats.accuracy)) < 0.002
    assert estimate_bin_accuracy(stats, 0.0).accuracy == _raw(stats)


def test_formula_empty_bins_and_record():
    stats = bin_statistics([0.95, 0.95, 0.55], [1, 0, 0], M)
    est = estimate_bin_accuracy(stats, 2.0)
    gap = (1 - 2.45) / 3
    assert est.gap == pytest.approx(gap)
    assert est.prior[9] == pytest.approx(0.95 + gap) and est.prior[5] == pytest.approx(0.55 + gap)
    assert est.accuracy[9] == pytest.approx((1 + 2 * (0.95 + gap)) / 4)
    assert est.accuracy[5] == pytest.approx((0 + 2 * (0.55 + gap)) / 3)
    assert est.accuracy[0] is None and est.raw[0] is None and est.count[0] == 0  # empty bins: no estimate
    assert est.n == 3 and est.to_dict()["count"] == est.count
    clipped = estimate_bin_accuracy(bin_statistics([0.05, 0.95], [0, 1], M), 4.0)
    assert all(0.0 <= p <= 1.0 for p in clipped.prior if p is not None)
    with pytest.raises(LlmcalError, match=r"prior_strength must be a finite number >= 0 \(got -1.0\)"):
        estimate_bin_accuracy(stats, -1.0)


def test_too_few():
    assert too_few(10, 10) and too_few(49, 10) and not too_few(50, 10) and not too_few(15, 3)
