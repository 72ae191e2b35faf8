"""Temperature scaling (Guo et al., "On Calibration of Modern Neural Networks", ICML 2017).

One temperature T > 0 is fitted by minimising the NLL of softmax(z / T) on a
calibration split and then applied to logits. Dividing by a positive number
does not change the argmax, so accuracy is unchanged by construction.

Logits are either an (N, K) array or a ragged sequence of 1-D arrays (questions
with different numbers of options); ragged input is padded with -inf and masked.
"""
from __future__ import annotations

import logging
import math
from typing import Sequence

import numpy as np

from ..errors import LlmcalError
from ..predictions import Prediction
from ._common import Calibrator, _check_temperature, _masked_softmax

__all__ = ["TemperatureScaler", "temperature_scale_predictions"]

log = logging.getLogger(__name__)


class TemperatureScaler(Calibrator):
    """Temperature scaling: probs = softmax(logits / T) with T fitted by minimum NLL.

    ``fit(logits, answers)`` minimises NLL(T) = (1/N) sum_i [logsumexp_k(z_ik/T) - z_iy/T]
    over T in ``bounds``. NLL is convex in beta = 1/T, with derivative
    g(beta) = (1/N) sum_i (E_{softmax(beta z_i)}[z_i] - z_iy), non-decreasing in
    beta, so the optimum is the root of g (found with ``scipy.optimize.brentq``),
    or a bound when g does not change sign there. ``init_temperature`` is kept
    when the NLL does not depend on T at all (every question's logits are tied).

    Fitted attributes: ``temperature_``, ``nll_before_`` (T = 1), ``nll_after_``.
    ``fit``/``transform``/``predict_proba`` are the :class:`Calibrator` base's.
    """

    name = "ts"
    _fitted_attr = "temperature_"

    def __init__(self, init_temperature: float = 1.0, bounds: tuple[float, float] = (0.05, 100.0)):
        self.init_temperature = init_temperature
        self.bounds = bounds

    def _check_params(self) -> tuple[float, float, float]:
        try:
            lo, hi = (float(b) for b in self.bounds)
        except (TypeError, ValueError) as e:
            raise LlmcalError(f"bounds must be a pair (low, high), got {self.bounds!r}") from e
        if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo < hi):
            raise LlmcalError(f"bounds must satisfy 0 < low < high, got {self.bounds!r}")
        t0 = _check_temperature(self.init_temperature)
        if not lo <= t0 <= hi:
            raise LlmcalError(f"init_temperature {t0} is outside bounds {self.bounds!r}")
        return lo, hi, t0

    @staticmethod
    def _nll(z: np.ndarray, mask: np.ndarray, rows: np.ndarray, answers: np.ndarray, t: float) -> float:
        s = np.where(mask, z / t, -np.inf)
        mx = s.max(axis=1)
        lse = mx + np.log(np.exp(s - mx[:, None]).sum(axis=1))
        return float(np.mean(lse - s[rows, answers]))

    def _fit(self, z: np.ndarray, mask: np.ndarray, a: np.ndarray) -> None:
        from scipy.optimize import brentq

        lo, hi, t0 = self._check_params()
        rows = np.arange(len(a))
        # Shift each row so its max is 0: NLL and its derivative are unchanged, numbers stay small.
        zs = z - np.where(mask, z, -np.inf).max(axis=1, keepdims=True)
        z0 = np.where(mask, zs, 0.0)  # pads as 0 so that p * z is 0 there, not nan
        zy = z0[rows, a]

        def grad(beta: float) -> float:
            p = _masked_softmax(beta * z0, mask)
            return float(np.mean((p * z0).sum(axis=1) - zy))

        b_lo, b_hi = 1.0 / hi, 1.0 / lo
        g_lo, g_hi = grad(b_lo), grad(b_hi)
        if np.all(z0 == 0.0):
            t = t0  # every row's logits are tied: the NLL does not depend on T
        elif g_lo >= 0.0:
            t = hi
        elif g_hi <= 0.0:
            t = lo
        else:
            t = 1.0 / brentq(grad, b_lo, b_hi, xtol=1e-14, rtol=1e-13, maxiter=500)
        if t in (lo, hi) and t != t0:
            log.warning("temperature scaling hit the bound T=%g (bounds %s); consider wider bounds", t, self.bounds)
        self.temperature_ = float(t)
        self.nll_before_ = self._nll(zs, mask, rows, a, 1.0)
        self.nll_after_ = self._nll(zs, mask, rows, a, self.temperature_)

    def _transform(self, z: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return z / self.temperature_

    def params(self) -> dict:
        """The fitted state as JSON-friendly values (for reports)."""
        self._check_fitted()
        return {"temperature_": self.temperature_, "nll_before_": self.nll_before_, "nll_after_": self.nll_after_}


def temperature_scale_predictions(preds: Sequence[Prediction], temperature: float) -> list[Prediction]:
    """New predictions with logits divided by ``temperature`` (same ids, subjects, answers, argmax)."""
    t = _check_temperature(temperature)
    return [Prediction.from_logits(p.id, p.subject, p.answer, np.asarray(p.logits, dtype=np.float64) / t)
            for p in preds]
