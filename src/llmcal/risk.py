"""Abstention with a guarantee: the confidence threshold whose selective error is <= epsilon with probability >= 1 - delta.

A model that answers only when its confidence c is at least a threshold t has
the selective risk R(t) = P(wrong | c >= t). Selection with guaranteed risk
(SGR, Geifman and El-Yaniv, "Selective Classification for Deep Neural
Networks", NeurIPS 2017) picks t on n calibration questions so that

    P( R(t_hat) <= epsilon ) >= 1 - delta        (over the draw of the calibration set)

by binary search over the sorted calibration confidences, k = ceil(log2 n)
steps. At a candidate t (answer when c >= t: n_t answered, e_t of them wrong)
the selective risk's binomial upper bound at level delta / k is

    b*(t) = the b with P(Binomial(n_t, b) <= e_t) = delta / k
          = the (1 - delta/k) quantile of Beta(e_t + 1, n_t - e_t)   (one-sided Clopper-Pearson)

b*(t) < epsilon moves the search to lower thresholds (more answers), else to
higher ones; t_hat is the lowest threshold visited with b*(t) < epsilon. The
union bound over the k tests is what makes the guarantee hold (the paper's
Lemma 3.1 / Theorem 3.2). This is the binomial-upper-bound route the
Learn-then-Test framework (Angelopoulos et al. 2021) also allows; a plain
fixed-sequence test starting at the most confident question cannot reject
anything, since one answered question never certifies a risk below 1 - delta.
When no visited threshold is certified the model abstains on every question
(t_hat = None).

Reported beside t_hat: its coverage (share of questions answered) on the
calibration and the test questions, its bound b*, and the test selective error
with its Clopper-Pearson interval.
"""
from __future__ import annotations

import math

import numpy as np

from .errors import LlmcalError
from .validation import OpenFraction, check_value

__all__ = ["risk_controlled_threshold", "apply_threshold", "risk_control"]


def risk_controlled_threshold(conf, correct, epsilon: float, delta: float) -> dict:
    """SGR threshold on calibration confidences ``conf`` and 0/1 ``correct`` (module docstring).

    Returns ``{"epsilon", "delta", "n", "steps", "threshold", "answered", "errors", "coverage",
    "selective_error", "bound"}``: the certified threshold (None: abstain on everything), the
    calibration counts at it and its upper bound b* on the selective risk.
    """
    eps = float(check_value(OpenFraction, epsilon, "--risk (epsilon)"))
    dlt = float(check_value(OpenFraction, delta, "--delta"))
    from scipy.stats import beta

    c = np.asarray(conf, dtype=np.float64).reshape(-1)
    y = np.asarray(correct).astype(bool).reshape(-1)
    if len(c) == 0 or len(c) != len(y):
        raise LlmcalError(f"risk control needs calibration questions (got {len(c)} confidences, {len(y)} labels)")
    asc = np.sort(c)
    m = len(asc)
    steps = max(1, math.ceil(math.log2(m)))
    level = dlt / steps

    def bound(t: float) -> tuple[int, int, float]:
        answered = c >= t
        n_t, e_t = int(answered.sum()), int((~y[answered]).sum())
        return n_t, e_t, (1.0 if e_t >= n_t else float(beta.ppf(1 - level, e_t + 1, n_t - e_t)))

    lo, hi = 0, m - 1  # indices into the ascending confidences; threshold asc[z]
    best = None
    for _ in range(steps):
        z = math.ceil((lo + hi) / 2)
        n_t, e_t, b = bound(asc[z])
        if b < eps:
            best = (float(asc[z]), n_t, e_t, b)
            hi = z
        else:
            lo = z
        if lo >= hi:
            break
    out = {"epsilon": eps, "delta": dlt, "n": int(m), "steps": int(steps)}
    if best is None:
        return {**out, "threshold": None, "answered": 0, "errors": 0, "coverage": 0.0, "selective_error": None,
                "bound": None}
    t, n_t, e_t, b = best
    return {**out, "threshold": t, "answered": n_t, "errors": e_t, "coverage": n_t / m,
            "selective_error": e_t / n_t, "bound": b}


def apply_threshold(conf, correct, threshold: float | None) -> dict:
    """Coverage and selective error (with its 95% Clopper-Pearson interval) of answering when conf >= threshold."""
    from .conformal import clopper_pearson

    c = np.asarray(conf, dtype=np.float64).reshape(-1)
    y = np.asarray(correct).astype(bool).reshape(-1)
    answered = np.zeros(len(c), dtype=bool) if threshold is None else c >= threshold
    n_ans = int(answered.sum())
    err = int((~y[answered]).sum())
    return {"n": int(len(c)), "answered": n_ans, "coverage": n_ans / len(c) if len(c) else 0.0,
            "selective_error": err / n_ans if n_ans else None,
            "selective_error_ci": list(clopper_pearson(err, n_ans)) if n_ans else None}


def risk_control(calib, test, epsilon: float, delta: float) -> dict:
    """:func:`risk_controlled_threshold` on calibration predictions, :func:`apply_threshold` on the test ones."""
    cal = risk_controlled_threshold([p.conf for p in calib], [p.correct for p in calib], epsilon, delta)
    res = apply_threshold([p.conf for p in test], [p.correct for p in test], cal["threshold"])
    return {"epsilon": cal["epsilon"], "delta": cal["delta"], "threshold": cal["threshold"], "calibration": cal,
            "test": res, "test_within_risk": None if res["selective_error"] is None
            else bool(res["selective_error"] <= cal["epsilon"])}
