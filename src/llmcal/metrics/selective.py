"""Selective prediction: the risk-coverage curve, AURC and accuracy at a given coverage.

A selective classifier answers only the questions whose confidence is above a
threshold and abstains on the rest. Ranking the N questions by confidence
(most confident first), answering the top k gives coverage k/N and selective
risk r_k = (errors among the top k) / k (Geifman and El-Yaniv 2017). The
risk-coverage curve is r_k against k/N for k = 1..N; the area under it is

    AURC = (1/N) sum_{k=1..N} r_k                 (Geifman et al. 2019, ICLR)

(lower is better; a confidence that ranks every correct answer above every
wrong one reaches the minimum for the given accuracy).

Ties: questions with equal confidence have no order, so the top k is not
defined inside a tie group. We use the expectation over a random order of the
tied questions, which is exact and independent of row order: when position k
falls in tie group g (questions N_{g-1}+1..N_g of the ranking, c_g of them
correct), the expected number of correct answers in the top k is
C_{g-1} + (k - N_{g-1}) c_g / n_g, with C and N the cumulative correct and
question counts of the groups before g. Without ties this is the plain formula.

Everything is computed from per-tie-group sufficient statistics (n_g, c_g), so
the bootstrap (``llmcal.metrics.bootstrap``) gets every resample's AURC from
one ``bincount``: summing over the positions of group g needs only harmonic
numbers, sum_{k in g} E_k / k = c_g + (C_{g-1} - N_{g-1} c_g/n_g)(H_{N_g} - H_{N_{g-1}}).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import LlmcalError
from ..validation import PositiveFraction, check_value
from .core import _check_inputs, _conf_correct

__all__ = [
    "RiskCoverage",
    "tie_groups",
    "aurc_from_group_stats",
    "risk_coverage_curve",
    "aurc",
    "selective_accuracy",
    "accuracy_at_coverage_80",
    "accuracy_at_coverage_50",
]


def tie_groups(conf) -> tuple[np.ndarray, int]:
    """Tie group of each question, numbered by decreasing confidence (0 = most confident), and the count."""
    c = np.asarray(conf, dtype=np.float64).reshape(-1)
    values, inverse = np.unique(-c, return_inverse=True)  # ascending -c = descending c
    return inverse.reshape(-1).astype(np.int64), int(values.size)


def _harmonic(n: int) -> np.ndarray:
    """H_0..H_n (H_0 = 0)."""
    return np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, n + 1))])


def aurc_from_group_stats(n_g, c_g) -> np.ndarray:
    """AURC from per-tie-group question counts ``n_g`` and correct counts ``c_g`` (groups by decreasing confidence).

    Both arrays have shape (..., G); leading axes are independent samples (e.g.
    bootstrap resamples) that must all hold the same number of questions N.
    AURC = 1 - (1/N) sum_g [c_g + (C_{g-1} - N_{g-1} c_g / n_g) (H_{N_g} - H_{N_{g-1}})].
    """
    n = np.asarray(n_g, dtype=np.float64)
    c = np.asarray(c_g, dtype=np.float64)
    total = n.sum(axis=-1)
    big_n = int(round(float(np.max(total))))
    if big_n < 1 or not np.allclose(total, big_n):
        raise LlmcalError("AURC: every sample must hold the same, non-zero number of questions")
    h = _harmonic(big_n)
    n_cum = np.cumsum(n, axis=-1)
    c_cum = np.cumsum(c, axis=-1)
    n_prev = n_cum - n
    c_prev = c_cum - c
    with np.errstate(invalid="ignore", divide="ignore"):
        rate = np.where(n > 0, c / np.where(n > 0, n, 1.0), 0.0)
    hi = h[np.rint(n_cum).astype(np.int64)]
    lo = h[np.rint(n_prev).astype(np.int64)]
    expected = c + (c_prev - n_prev * rate) * (hi - lo)
    return 1.0 - expected.sum(axis=-1) / big_n


@dataclass(frozen=True)
class RiskCoverage:
    """A risk-coverage curve: ``coverage[k-1] = k/N`` and the selective ``risk`` of the top k, k = 1..N."""

    coverage: np.ndarray
    risk: np.ndarray
    aurc: float

    def at(self, coverage: float) -> float:
        """Selective risk at ``coverage`` (the top ceil(coverage * N) questions)."""
        n = len(self.risk)
        return float(self.risk[_top_k(coverage, n) - 1])

    def to_dict(self, points: int = 101) -> dict:
        """JSON-friendly summary: AURC and the risk on a grid of ``points`` coverages from 1/points to 1."""
        grid = np.linspace(1.0 / points, 1.0, points)
        return {"aurc": self.aurc, "coverage": [float(g) for g in grid], "risk": [self.at(g) for g in grid]}


def _top_k(coverage: float, n: int) -> int:
    """Number of questions answered at ``coverage``: ceil(coverage * N), at least 1."""
    c = float(check_value(PositiveFraction, coverage, "coverage"))
    return max(1, min(n, math.ceil(c * n - 1e-9)))


def _expected_correct(conf: np.ndarray, correct: np.ndarray) -> np.ndarray:
    """E_k, the expected number of correct answers among the top k (k = 1..N), ties in random order."""
    gid, g = tie_groups(conf)
    n_g = np.bincount(gid, minlength=g).astype(np.float64)
    c_g = np.bincount(gid, weights=correct.astype(np.float64), minlength=g)
    n_prev = np.cumsum(n_g) - n_g
    c_prev = np.cumsum(c_g) - c_g
    k = np.arange(1, len(conf) + 1, dtype=np.float64)
    group_of_k = np.repeat(np.arange(g), n_g.astype(np.int64))  # position k-1 -> its tie group
    return c_prev[group_of_k] + (k - n_prev[group_of_k]) * (c_g / n_g)[group_of_k]


def risk_coverage_curve(probs, answers) -> RiskCoverage:
    """Risk-coverage curve of confidence = max_k p_ik: risk_k = 1 - E_k / k at coverage k/N (ties: see module)."""
    p, a = _check_inputs(probs, answers)
    conf, correct = _conf_correct(p, a)
    n = len(conf)
    k = np.arange(1, n + 1, dtype=np.float64)
    risk = 1.0 - _expected_correct(conf, correct) / k
    return RiskCoverage(coverage=k / n, risk=risk, aurc=float(risk.mean()))


def aurc(probs, answers) -> float:
    """Area under the risk-coverage curve, AURC = (1/N) sum_k r_k (Geifman et al. 2019); lower is better."""
    p, a = _check_inputs(probs, answers)
    conf, correct = _conf_correct(p, a)
    gid, g = tie_groups(conf)
    n_g = np.bincount(gid, minlength=g)
    c_g = np.bincount(gid, weights=correct.astype(np.float64), minlength=g)
    return float(aurc_from_group_stats(n_g, c_g))


def selective_accuracy(probs, answers, coverage: float) -> float:
    """Accuracy on the ceil(coverage * N) most confident questions, E_k / k (ties: expected over their order)."""
    p, a = _check_inputs(probs, answers)
    conf, correct = _conf_correct(p, a)
    k = _top_k(coverage, len(conf))
    return float(_expected_correct(conf, correct)[k - 1] / k)


def accuracy_at_coverage_80(probs, answers) -> float:
    """:func:`selective_accuracy` at 80% coverage (the model abstains on its 20% least confident answers)."""
    return selective_accuracy(probs, answers, 0.8)


def accuracy_at_coverage_50(probs, answers) -> float:
    """:func:`selective_accuracy` at 50% coverage."""
    return selective_accuracy(probs, answers, 0.5)
