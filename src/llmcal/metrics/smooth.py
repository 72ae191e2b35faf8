"""Smooth ECE (Blasiok and Nakkiran, "Smooth ECE: Principled Reliability Diagrams via Kernel Smoothing", ICLR 2024).

Binned ECE jumps with the bin edges; smooth ECE replaces the bins by a kernel.
With confidences f_i, correctness y_i (0/1) and residuals r_i = y_i - f_i:

    smECE_sigma = integral_0^1 | (1/N) sum_i K_sigma(t, f_i) r_i | dt

where K_sigma is the *reflected* Gaussian kernel on [0, 1], the density at t of
f + eta (eta ~ N(0, sigma^2)) folded back into [0, 1] at both ends:
K_sigma(t, f) = sum_{k in Z} [phi_sigma(t - f - 2k) + phi_sigma(t + f - 2k)].
(Equivalently: the kernel-smoothed residual r_hat(t) weighted by the smoothed
density delta_hat(t), integrated.) The bandwidth is not a free choice: smooth
ECE is smECE at the unique fixed point sigma* = smECE_{sigma*}, which exists
because smECE_sigma does not increase with sigma.

Estimator used here: the masses r_i / N are spread linearly onto a uniform grid
of G points on [0, 1] (each point splits its mass between the two nearest grid
points), mirrored into the even, period-2 extension of [0, 1], and convolved
with the Gaussian on that circle by FFT, which sums every reflection exactly;
the integral is the trapezoid rule on the grid. sigma* is found by Brent's
method on [SIGMA_MIN, 1]. The ``relplot`` package (the authors' code) computes
the same quantity with its own discretisation; tests compare the two.
"""
from __future__ import annotations

import math
from typing import Annotated

import numpy as np
from pydantic import Field

from ..errors import LlmcalError
from ..validation import Int, PositiveNumber, check_value, says, validated
from .core import _check_inputs, _conf_correct

__all__ = ["SIGMA_MIN", "smooth_ece_at", "smooth_ece_fixed_point", "smooth_ece"]

SIGMA_MIN = 1e-3  # below this the grid cannot resolve the kernel; the paper's code stops there too
GRID_POINTS = 4097
GridPoints = Annotated[Int, Field(ge=3), says("an integer >= 3")]


def _grid_masses(conf: np.ndarray, weights: np.ndarray, g: int) -> np.ndarray:
    """Masses on the 2(G-1)-point circle that represents the even, period-2 extension of [0, 1]."""
    m = 2 * (g - 1)
    pos = np.clip(conf, 0.0, 1.0) * (g - 1)
    j = np.minimum(np.floor(pos).astype(np.int64), g - 2)
    frac = pos - j
    half = np.bincount(j, weights=(1.0 - frac) * weights, minlength=g)
    half += np.bincount(j + 1, weights=frac * weights, minlength=g)
    ext = np.zeros(m)
    ext[:g] += half
    # the mirror image of grid point j is -j = m - j on the circle; j = 0 and j = g-1 are their own
    # mirrors, so their mass counts twice there, as the reflected kernel requires
    ext[(m - np.arange(g)) % m] += half
    return ext


def _wrapped_gaussian(sigma: float, g: int) -> np.ndarray:
    """phi_sigma summed over all shifts by 2k, sampled at the 2(G-1) circle points (distances d*h)."""
    m = 2 * (g - 1)
    h = 1.0 / (g - 1)
    d = np.arange(m, dtype=np.float64)
    d = np.where(d <= m // 2, d, d - m) * h  # signed distance in [-1, 1)
    reach = int(math.ceil(8.0 * sigma / 2.0)) + 1
    out = np.zeros(m)
    for k in range(-reach, reach + 1):
        x = d - 2.0 * k
        out += np.exp(-0.5 * (x / sigma) ** 2)
    return out / (sigma * math.sqrt(2.0 * math.pi))


def _smece(ext_fft: np.ndarray, sigma: float, g: int) -> float:
    kernel = np.fft.rfft(_wrapped_gaussian(sigma, g))
    smoothed = np.fft.irfft(ext_fft * kernel, n=2 * (g - 1))[:g]
    a = np.abs(smoothed)
    h = 1.0 / (g - 1)
    return float(h * (a.sum() - 0.5 * (a[0] + a[-1])))


def _prepare(conf, correct, g: int) -> np.ndarray:
    f = np.asarray(conf, dtype=np.float64).reshape(-1)
    y = np.asarray(correct, dtype=np.float64).reshape(-1)
    if f.shape != y.shape or f.size == 0:
        raise LlmcalError(f"smooth ECE needs equally many confidences and outcomes (got {f.size} and {y.size})")
    if not np.all(np.isfinite(f)) or f.min() < -1e-9 or f.max() > 1 + 1e-9:
        raise LlmcalError("smooth ECE: confidences must be finite and in [0, 1]")
    g = check_value(GridPoints, g, "smooth ECE: grid")
    return np.fft.rfft(_grid_masses(f, (y - f) / f.size, g))


@validated
def smooth_ece_at(conf, correct, sigma: PositiveNumber, grid: int = GRID_POINTS) -> float:
    """smECE_sigma at a fixed bandwidth ``sigma`` (the reflected-Gaussian formula of the module docstring)."""
    return _smece(_prepare(conf, correct, grid), float(sigma), grid)


def smooth_ece_fixed_point(conf, correct, grid: int = GRID_POINTS) -> tuple[float, float]:
    """(smooth ECE, sigma*) with sigma* the fixed point sigma = smECE_sigma, searched in [SIGMA_MIN, 1].

    When smECE_sigma < sigma already at SIGMA_MIN (a very well calibrated,
    large sample) the value at SIGMA_MIN is returned, as in the authors' code.
    """
    from scipy.optimize import brentq

    ext_fft = _prepare(conf, correct, grid)

    def gap(s: float) -> float:
        return _smece(ext_fft, s, grid) - s

    if gap(SIGMA_MIN) <= 0.0:
        return _smece(ext_fft, SIGMA_MIN, grid), SIGMA_MIN
    if gap(1.0) >= 0.0:
        return _smece(ext_fft, 1.0, grid), 1.0
    s = brentq(gap, SIGMA_MIN, 1.0, xtol=1e-7, rtol=1e-7, maxiter=200)
    return _smece(ext_fft, s, grid), float(s)


def smooth_ece(probs, answers) -> float:
    """Smooth ECE of the confidence max_k p_ik against correctness, at the fixed-point bandwidth sigma*."""
    p, a = _check_inputs(probs, answers)
    conf, correct = _conf_correct(p, a)
    return smooth_ece_fixed_point(conf, correct)[0]
