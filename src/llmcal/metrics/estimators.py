"""More calibration-error estimators: the debiased L2 calibration error and ECE's sensitivity to the bin count.

Binned ECE is biased upwards on finite samples (even a perfectly calibrated
model has ECE > 0, by about sqrt(acc(1-acc)/n_b) per bin) and its value moves
with the number of bins. The debiased L2 estimator of Kumar, Liang and Ma
("Verified Uncertainty Calibration", NeurIPS 2019) removes the first bias; the
bin sweep shows the second.
"""
from __future__ import annotations

import typing
from typing import Literal, Sequence

import numpy as np

from ..errors import LlmcalError
from ..validation import check_value
from .core import _check_inputs, _check_n_bins, _conf_correct, bin_index, equal_mass_bins

__all__ = ["debiased_l2_ce_squared", "debiased_l2_ce", "ece_bin_sweep", "DEFAULT_SWEEP_BINS"]

DEFAULT_SWEEP_BINS = (5, 10, 15, 20, 30, 50)
Binning = Literal["equal_mass", "equal_width"]
BINNINGS = typing.get_args(Binning)


def _bins_of(conf: np.ndarray, correct: np.ndarray, n_bins: int, binning: str) -> list[np.ndarray]:
    if check_value(Binning, binning, "binning") == "equal_mass":
        return equal_mass_bins(conf, correct, n_bins)
    b = bin_index(conf, n_bins)
    return [np.flatnonzero(b == m) for m in range(n_bins) if np.any(b == m)]


def debiased_l2_ce_squared(probs, answers, n_bins: int = 15, binning: str = "equal_mass") -> float:
    """Debiased estimate of the squared top-label L2 calibration error (Kumar et al. 2019, section 5).

    With bins B_b of the confidence c_i = max_k p_ik, correctness y_i, bin means
    ybar_b and cbar_b and n_b = |B_b|:

        CE^2 = sum_b (n_b / N) [ (ybar_b - cbar_b)^2 - ybar_b (1 - ybar_b) / (n_b - 1) ]

    The subtracted term is the unbiased estimate of Var(ybar_b), the part of
    the plug-in (ybar_b - cbar_b)^2 that sampling noise alone contributes. Bins
    with fewer than 2 questions contribute 0 (as in the authors' code). The
    estimate can be negative when the model is close to calibrated.
    """
    m = _check_n_bins(n_bins)
    p, a = _check_inputs(probs, answers)
    conf, correct = _conf_correct(p, a)
    y = correct.astype(np.float64)
    n = len(conf)
    total = 0.0
    for rows in _bins_of(conf, y, m, binning):
        nb = len(rows)
        if nb < 2:
            continue
        ybar = float(y[rows].mean())
        cbar = float(conf[rows].mean())
        total += nb / n * ((ybar - cbar) ** 2 - ybar * (1.0 - ybar) / (nb - 1))
    return float(total)


def debiased_l2_ce(probs, answers, n_bins: int = 15, binning: str = "equal_mass") -> float:
    """Debiased L2 calibration error, sqrt(max(CE^2, 0)) of :func:`debiased_l2_ce_squared` (15 equal-mass bins)."""
    return float(np.sqrt(max(debiased_l2_ce_squared(probs, answers, n_bins, binning), 0.0)))


def ece_bin_sweep(probs, answers, bins: Sequence[int] = DEFAULT_SWEEP_BINS) -> dict:
    """ECE for several bin counts, equal-width and equal-mass: how much of an ECE is the binning.

    Returns ``{"bins": [M...], "equal_width": [ECE...], "equal_mass": [ECE...],
    "spread": {"equal_width": max - min, "equal_mass": max - min}}``.
    """
    from .core import conf_ece, equal_mass_ece

    ms = [_check_n_bins(b) for b in bins]
    if not ms:
        raise LlmcalError("ECE bin sweep: give at least one bin count")
    p, a = _check_inputs(probs, answers)
    ew = [conf_ece(p, a, m) for m in ms]
    em = [equal_mass_ece(p, a, m) for m in ms]
    return {"bins": ms, "equal_width": ew, "equal_mass": em,
            "spread": {"equal_width": float(max(ew) - min(ew)), "equal_mass": float(max(em) - min(em))}}
