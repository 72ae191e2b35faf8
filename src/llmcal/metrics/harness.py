"""The calibration numbers the two best-known LLM harnesses report, computed as they compute them.

So that an llmcal run can be read next to a HELM or an lm-evaluation-harness
table without re-running either. Notation: confidence c_i = max_k p_ik,
correctness y_i = 1{argmax_k p_ik = answer_i}, N questions.

lm-evaluation-harness (PR 3913, "add ECE and RMS calibration error metrics"):

- ``rms_ce``: the root-mean-square calibration error over M equal-width bins B_m,

      RMS-CE = sqrt( sum_m (|B_m| / N) (acc(B_m) - conf(B_m))^2 )
             = sqrt( (1/N) sum_m (S_y,m - S_c,m)^2 / |B_m| )

  with S_y,m and S_c,m the sums of correctness and confidence in bin m: the L2
  version of conf-ECE, from the same per-bin sufficient statistics (bins as
  llmcal's, [m/M, (m+1)/M), last closed; M = the run's ``n_bins``). Empty bins
  add nothing. RMS-CE >= conf-ECE (Jensen).

HELM (``calibration_metrics.py``, which calls the ``uncertainty-calibration``
package on the 1-D arrays of confidences and correctness):

- ``ece_1_bin``: ECE with one bin, |mean_i c_i - mean_i y_i|, i.e. |mean
  confidence - accuracy|, the overall over- or under-confidence.
- ``platt_ece_1_bin`` and ``platt_ece_10_bin``: the ECE after Platt scaling
  fitted *on the same questions*: c'_i = sigmoid(a logit(c_i) + b), (a, b) the
  unregularised logistic regression of y_i on logit(c_i) (HELM: scikit-learn
  with C = 1e10), c clipped to [1e-12, 1 - 1e-12]. It measures how much
  calibration error is left after the best monotone two-parameter remap: what
  the confidence's ranking cannot fix. When every answer is right, or every
  one wrong, HELM stores 0 for both (the fit does not exist); so do we.
  ``platt_ece_10_bin`` uses HELM's 10 equal-mass bins: the sorted confidences
  are cut into 10 runs of sizes differing by at most one (numpy's
  ``array_split``; fewer runs when N < 10), the boundary between two runs is
  the midpoint of the last value of one and the first of the next, repeated
  boundaries are merged, and a confidence equal to a boundary goes to the lower
  bin. (llmcal's own ``em_ece`` cuts the sorted list itself, so the two differ
  only when a tie straddles a cut.)
- ``selective_acc_at_10``: HELM's ``selective_acc@10``, the accuracy of the
  floor(0.1 N) + 1 most confident questions (HELM sorts by confidence and reads
  the running accuracy at index int(0.1 N)). HELM's sort leaves tied questions
  in an arbitrary order; llmcal takes the expectation over the order of the tied
  questions (``llmcal.metrics.selective``), which is HELM's number when there
  are no ties at the cut. HELM's ``selective_cov_acc_area`` is 1 - AURC.
"""
from __future__ import annotations

import math

import numpy as np

from .core import _check_inputs, _check_n_bins, _conf_correct, bin_statistics
from .selective import _expected_correct

__all__ = ["rms_calibration_error", "ece_one_bin", "helm_equal_mass_ece", "platt_scaled_ece",
           "selective_accuracy_at_10", "harness_metrics", "harness_estimators"]

_PLATT_EPS = 1e-12  # HELM's (the uncertainty-calibration package's) clip of c before the logit


def _conf_y(probs, answers) -> tuple[np.ndarray, np.ndarray]:
    p, a = _check_inputs(probs, answers)
    conf, correct = _conf_correct(p, a)
    return conf, correct.astype(np.float64)


def rms_calibration_error(probs, answers, n_bins: int = 10) -> float:
    """RMS calibration error, sqrt((1/N) sum_m (S_y,m - S_c,m)^2 / n_m) over M equal-width bins (lm-eval PR 3913)."""
    m = _check_n_bins(n_bins)
    conf, y = _conf_y(probs, answers)
    stats = bin_statistics(conf, y, m)
    full = stats.count > 0
    gap2 = (stats.sum_correct[full] - stats.sum_conf[full]) ** 2 / stats.count[full]
    return float(math.sqrt(gap2.sum() / len(conf)))


def ece_one_bin(probs, answers) -> float:
    """HELM's ``ece_1_bin``: |mean confidence - accuracy| (ECE with a single bin)."""
    conf, y = _conf_y(probs, answers)
    return float(abs(conf.mean() - y.mean()))


def _helm_bin_boundaries(conf: np.ndarray, n_bins: int) -> np.ndarray:
    """HELM's equal-mass upper boundaries: midpoints between consecutive array_split runs, then 1.0, deduplicated."""
    s = np.sort(conf)
    runs = np.array_split(s, min(n_bins, len(s)))
    cuts = [(runs[i][-1] + runs[i + 1][0]) / 2.0 for i in range(len(runs) - 1)]
    return np.unique(np.asarray(cuts + [1.0], dtype=np.float64))


def _helm_ece(conf: np.ndarray, y: np.ndarray, n_bins: int) -> float:
    """Equal-mass ECE as HELM's ``get_ece_em``: bin b holds boundaries[b-1] < c <= boundaries[b]."""
    edges = _helm_bin_boundaries(conf, n_bins)
    b = np.searchsorted(edges, conf, side="left")
    gap = np.bincount(b, weights=conf - y, minlength=len(edges))
    return float(np.abs(gap).sum() / len(conf))


def helm_equal_mass_ece(probs, answers, n_bins: int = 10) -> float:
    """Top-label ECE with HELM's equal-mass bins (``ece_10_bin`` for ``n_bins=10``; see the module docstring)."""
    m = _check_n_bins(n_bins)
    conf, y = _conf_y(probs, answers)
    return _helm_ece(conf, y, m)


def _logit(c: np.ndarray) -> np.ndarray:
    c = np.clip(c, _PLATT_EPS, 1.0 - _PLATT_EPS)
    return np.log(c) - np.log1p(-c)


def _logistic_fit(x: np.ndarray, y: np.ndarray, max_iter: int = 100) -> tuple[float, float]:
    """Unregularised logistic regression y ~ sigmoid(a x + b) by damped Newton steps; returns (a, b)."""
    design = np.stack([x, np.ones_like(x)], axis=1)

    def nll(theta):
        u = design @ theta
        return float(np.sum(np.logaddexp(0.0, u) - y * u))

    theta = np.zeros(2)
    for _ in range(max_iter):
        s = 1.0 / (1.0 + np.exp(-(design @ theta)))
        grad = design.T @ (s - y)
        hess = design.T @ (design * (s * (1.0 - s))[:, None]) + 1e-12 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        base, t = nll(theta), 1.0
        while t > 1e-8 and nll(theta - t * step) > base + 1e-15:  # separable data would diverge
            t /= 2.0
        theta = theta - t * step
        if np.max(np.abs(t * step)) < 1e-12:
            break
    return float(theta[0]), float(theta[1])


def platt_scaled_ece(probs, answers, n_bins: int = 10) -> dict:
    """HELM's Platt-rescaled ECE: ``{"platt_ece_1_bin", "platt_ece_10_bin", "platt_coef", "platt_intercept"}``.

    c' = sigmoid(a logit(c) + b) fitted in-sample by maximum likelihood of the
    correctness; then the 1-bin ECE and HELM's equal-mass ECE (``n_bins`` bins,
    HELM uses 10) of c'. All answers right or all wrong: both ECEs 0 and the
    coefficients None, as HELM stores them.
    """
    m = _check_n_bins(n_bins)
    conf, y = _conf_y(probs, answers)
    if np.all(y == y[0]):
        return {"platt_ece_1_bin": 0.0, "platt_ece_10_bin": 0.0, "platt_coef": None, "platt_intercept": None}
    a, b = _logistic_fit(_logit(conf), y)
    c2 = 1.0 / (1.0 + np.exp(-(a * _logit(conf) + b)))
    return {"platt_ece_1_bin": float(abs(c2.mean() - y.mean())), "platt_ece_10_bin": _helm_ece(c2, y, m),
            "platt_coef": a, "platt_intercept": b}


def selective_accuracy_at_10(probs, answers) -> float:
    """HELM's ``selective_acc@10``: accuracy of the floor(0.1 N) + 1 most confident questions (ties: expectation)."""
    conf, y = _conf_y(probs, answers)
    k = min(len(conf), int(0.1 * len(conf)) + 1)
    return float(_expected_correct(conf, y.astype(bool))[k - 1] / k)


def harness_metrics(probs, answers, n_bins: int = 10) -> dict:
    """The harness numbers of a run's metrics: rms_ce, ece_1_bin, platt_ece_1_bin, platt_ece_10_bin,
    platt_coef, platt_intercept, selective_acc_at_10 (RMS-CE with ``n_bins`` equal-width bins;
    HELM's numbers with HELM's fixed 1 and 10 bins)."""
    out = {"rms_ce": rms_calibration_error(probs, answers, n_bins), "ece_1_bin": ece_one_bin(probs, answers)}
    out.update(platt_scaled_ece(probs, answers, 10))
    out["selective_acc_at_10"] = selective_accuracy_at_10(probs, answers)
    return out


def harness_estimators(n_bins: int = 10) -> dict[str, str]:
    """How each number of :func:`harness_metrics` is estimated, in words (docs/posthoc.md, "The harnesses' numbers")."""
    return {
        "rms_ce": f"RMS calibration error (lm-evaluation-harness PR 3913): sqrt(sum_m |B_m|/N (acc_m - conf_m)^2), "
                  f"{n_bins} equal-width bins [m/M, (m+1)/M), last bin closed",
        "ece_1_bin": "HELM ece_1_bin: |mean confidence - accuracy|",
        "platt_ece_1_bin": "HELM platt_ece_1_bin: ece_1_bin after Platt scaling of the confidence fitted on the same "
                           "questions (unregularised logistic regression of correctness on logit(c)); 0 when all "
                           "answers are right or all wrong",
        "platt_ece_10_bin": "HELM platt_ece_10_bin: ECE after the same Platt scaling, HELM's 10 equal-mass bins "
                            "(midpoint boundaries between array_split runs of the sorted confidences)",
        "platt_coef": "slope a of HELM's in-sample Platt map sigmoid(a logit(c) + b) (None: no fit)",
        "platt_intercept": "intercept b of the same map (None: no fit)",
        "selective_acc_at_10": "HELM selective_acc@10: accuracy of the floor(0.1 N) + 1 most confident questions "
                               "(ties: expectation over their order)",
    }
