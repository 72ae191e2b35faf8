"""Top-label recalibrators: Platt scaling, isotonic regression and histogram binning of the confidence.

Each learns a map g from the confidence c = max_k p_k to the probability that
the argmax answer is right, from (c_i, 1{argmax_i = y_i}) on the calibration
split, and changes *only the confidence*. The other options keep their
relative sizes and share what is left, so that every row sums to 1:

    p'_top = c' = g(c),    p'_j = p_j * (1 - c') / (1 - c)   for j != top

(when 1 - c underflows to 0 the rest is shared equally among the other K - 1
options). To keep the argmax, and with it the accuracy, c' is raised where
needed to the runner-up's rescaled probability: c' >= p2 / (1 - c + p2), p2
the second largest p_j (a bound >= 1/K, so a recalibrated confidence never
falls below chance). ``transform`` returns log p' as the new logits.
"""
from __future__ import annotations

import numpy as np

from ..errors import LlmcalError
from ..metrics.estimators import Binning
from ..validation import PositiveInt, check_value
from ._common import Calibrator, _masked_softmax, _option_counts

__all__ = ["PlattScaler", "IsotonicCalibrator", "HistogramBinning"]

_LOG_FLOOR = 1e-300  # log(0) would make the logits non-finite


def _conf_and_correct(z, mask, answers):
    p = _masked_softmax(z, mask)
    top = np.argmax(p, axis=1)
    conf = p[np.arange(len(p)), top]
    return p, top, conf, (top == answers).astype(np.float64)


def _replace_confidence(p: np.ndarray, mask: np.ndarray, new_conf: np.ndarray) -> np.ndarray:
    """Rows with the top probability set to ``new_conf`` (floored to keep the argmax), the rest rescaled."""
    n = p.shape[0]
    rows = np.arange(n)
    top = np.argmax(p, axis=1)
    others = p.copy()
    others[rows, top] = 0.0
    rest = others.sum(axis=1)  # 1 - c, without the cancellation of 1 - c
    second = others.max(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        floor = np.where(rest + second > 0, second / (rest + second), 0.0)
    # a hair above the floor: at the floor itself the runner-up ties the top and argmax could flip
    c = np.clip(np.maximum(np.asarray(new_conf, dtype=np.float64), floor * (1.0 + 1e-12)), 0.0, 1.0)
    k = _option_counts(mask)
    out = np.empty_like(p)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(rest[:, None] > 0, others / np.where(rest > 0, rest, 1.0)[:, None],
                         np.where(mask, 1.0, 0.0) / np.maximum(k - 1, 1)[:, None])
    share[rows, top] = 0.0
    out = share * (1.0 - c)[:, None]
    out[rows, top] = c
    return np.where(mask, out, 0.0)


class _TopLabel(Calibrator):
    """Base: fit a confidence map on (confidence, correctness), apply it by :func:`_replace_confidence`."""

    def _fit(self, z, mask, answers):
        _, _, conf, correct = _conf_and_correct(z, mask, answers)
        self._fit_map(conf, correct)

    def _transform(self, z, mask):
        p = _masked_softmax(z, mask)
        conf = p.max(axis=1)
        q = _replace_confidence(p, mask, self.map_confidence(conf))
        return np.where(mask, np.log(np.maximum(q, _LOG_FLOOR)), -np.inf)

    def map_confidence(self, conf) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def _fit_map(self, conf, correct) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


class PlattScaler(_TopLabel):
    """Platt scaling of the confidence (Platt 1999): c' = sigmoid(a * logit(c) + b).

    a and b maximise the Bernoulli likelihood of correctness,
    sum_i [y_i log c'_i + (1 - y_i) log(1 - c'_i)], on the calibration split:
    a logistic regression of correctness on logit(c) without regularisation
    (``scipy.optimize.minimize``, trust-region Newton; convex). c is clipped to [1e-12, 1 - 1e-12] first.
    HELM reports ECE after this map ("Platt-scaled ECE"). Then the other
    options are rescaled (module docstring).

    Fitted attributes: ``slope_`` (a), ``intercept_`` (b).
    """

    name = "platt"
    _fitted_attr = "slope_"

    def __init__(self, max_iter: int = 100):
        self.max_iter = max_iter

    @staticmethod
    def _features(conf) -> np.ndarray:
        c = np.clip(np.asarray(conf, dtype=np.float64), 1e-12, 1.0 - 1e-12)
        return np.log(c) - np.log1p(-c)

    def _fit_map(self, conf, correct):
        from scipy.optimize import minimize

        x = self._features(conf)
        y = correct
        if np.all(y == y[0]):
            raise LlmcalError("Platt scaling needs both right and wrong answers in the calibration split "
                              f"(all {len(y)} are {'right' if y[0] else 'wrong'})")
        design = np.stack([x, np.ones_like(x)], axis=1)

        def nll(theta):  # sum_i log(1 + e^u_i) - y_i u_i and its gradient, u = a x + b
            u = design @ theta
            return float(np.sum(np.logaddexp(0.0, u) - y * u)), design.T @ (_sigmoid(u) - y)

        def hess(theta):
            s = _sigmoid(design @ theta)
            return design.T @ (design * (s * (1 - s))[:, None])

        # trust-region Newton: convex, so it converges to the optimum; on separable data (no finite optimum) the
        # slope grows until the gradient is below gtol or max_iter is reached
        res = minimize(nll, np.zeros(2), jac=True, hess=hess, method="trust-exact",
                       options={"gtol": 1e-10, "maxiter": int(self.max_iter)})
        self.slope_, self.intercept_ = float(res.x[0]), float(res.x[1])

    def map_confidence(self, conf) -> np.ndarray:
        self._check_fitted()
        return _sigmoid(self.slope_ * self._features(conf) + self.intercept_)


def _sigmoid(u) -> np.ndarray:
    from scipy.special import expit

    return expit(u)


class IsotonicCalibrator(_TopLabel):
    """Isotonic regression of correctness on confidence (Zadrozny and Elkan 2002).

    g is the non-decreasing function that minimises sum_i (g(c_i) - y_i)^2 on
    the calibration split: equal confidences are merged into one point (mean
    correctness, weight = count), fitted by pool-adjacent-violators
    (``scipy.optimize.isotonic_regression``), and g is
    linear between the fitted points and constant beyond them (what
    scikit-learn's ``IsotonicRegression(out_of_bounds="clip")`` predicts).
    Then the other options are rescaled (module docstring).

    Fitted attributes: ``x_`` (distinct calibration confidences), ``y_`` (g there).
    """

    name = "isotonic"
    _fitted_attr = "x_"

    def _fit_map(self, conf, correct):
        xs, inverse, counts = np.unique(conf, return_inverse=True, return_counts=True)
        sums = np.bincount(inverse.reshape(-1), weights=correct, minlength=len(xs))
        self.x_ = xs
        from scipy.optimize import isotonic_regression

        self.y_ = isotonic_regression(sums / counts, weights=counts.astype(np.float64), increasing=True).x

    def map_confidence(self, conf) -> np.ndarray:
        self._check_fitted()
        return np.interp(np.asarray(conf, dtype=np.float64), self.x_, self.y_)


class HistogramBinning(_TopLabel):
    """Histogram binning of the confidence (Zadrozny and Elkan 2001).

    The confidence axis is cut into M bins, equal-width ([m/M, (m+1)/M), last
    bin closed, like the ECE's) or equal-mass (edges halfway between the
    calibration confidences that the equal-mass runs end and start on); a test
    confidence c becomes the calibration accuracy of its bin,
    c' = (number right in the bin) / (number in the bin). A bin with no
    calibration question leaves c as it is. Then the other options are rescaled
    (module docstring; c' may be raised to keep the argmax).

    Fitted attributes: ``edges_`` (M+1), ``bin_accuracy_`` (M, NaN where empty), ``bin_count_``.
    """

    name = "histogram"
    _fitted_attr = "edges_"

    def __init__(self, n_bins: int = 10, binning: Binning = "equal_width"):
        self.n_bins = n_bins
        self.binning = binning

    def _fit_map(self, conf, correct):
        m = check_value(PositiveInt, self.n_bins, "histogram binning: n_bins")
        if check_value(Binning, self.binning, "histogram binning: binning") == "equal_width":
            edges = np.linspace(0.0, 1.0, m + 1)
        else:
            runs = [r for r in np.array_split(np.sort(conf), m) if len(r)]
            inner = [(a[-1] + b[0]) / 2.0 for a, b in zip(runs[:-1], runs[1:])]
            edges = np.unique(np.concatenate([[0.0], inner, [1.0]]))
        self.edges_ = edges
        b = self._bin(conf)
        nb = len(edges) - 1
        self.bin_count_ = np.bincount(b, minlength=nb).astype(np.int64)
        right = np.bincount(b, weights=correct, minlength=nb)
        with np.errstate(invalid="ignore", divide="ignore"):
            self.bin_accuracy_ = np.where(self.bin_count_ > 0, right / np.maximum(self.bin_count_, 1), np.nan)

    def _bin(self, conf) -> np.ndarray:
        if self.binning == "equal_width":  # the ECE's own bins, so that edges fall the same way
            from ..metrics.core import bin_index

            return bin_index(conf, len(self.edges_) - 1)
        inner = self.edges_[1:-1]
        return np.searchsorted(inner, np.asarray(conf, dtype=np.float64), side="right").astype(np.int64)

    def map_confidence(self, conf) -> np.ndarray:
        self._check_fitted()
        c = np.asarray(conf, dtype=np.float64)
        acc = self.bin_accuracy_[self._bin(c)]
        return np.where(np.isnan(acc), c, acc)
