"""Affine recalibration of the option log-probabilities: vector scaling, matrix scaling, bias-only.

All three map a question's log-probabilities x = log softmax(z) (the option
logits z up to a per-question constant: the letter logits' common offset says
nothing about the options and would otherwise leak into w * z) to new logits
z' and are fitted by minimising the NLL of softmax(z') on the calibration
split with L-BFGS (scipy) and the analytic gradient. With G = (softmax(z') -
onehot(y)) / N, dNLL/dz' = G, so each gradient is one product with G.

Option *positions* (A, B, C, ...) carry the parameters: a model's preference
for a letter is a property of the position, whatever the option text. With
mixed K a position's parameters are fitted on the questions that have it.
Unlike temperature scaling these can change the argmax (and so the accuracy).
"""
from __future__ import annotations

import logging

import numpy as np

from ..errors import LlmcalError
from ..validation import NonNegativeNumber, check_value
from ._common import Calibrator, _log_softmax, _require_fixed_k

__all__ = ["VectorScaler", "MatrixScaler", "BiasCorrector"]

log = logging.getLogger(__name__)


def _nll_grad(zp: np.ndarray, mask: np.ndarray, answers: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean NLL of softmax(zp) (masked) and its gradient G with respect to zp (0 at pads)."""
    n = zp.shape[0]
    rows = np.arange(n)
    s = np.where(mask, zp, -np.inf)
    mx = s.max(axis=1, keepdims=True)
    e = np.exp(s - mx)
    tot = e.sum(axis=1, keepdims=True)
    lse = (mx + np.log(tot))[:, 0]
    loss = float(np.mean(lse - zp[rows, answers]))
    g = e / tot
    g[rows, answers] -= 1.0
    return loss, np.where(mask, g, 0.0) / n


def _minimise(fun, x0: np.ndarray, what: str, max_iter: int) -> np.ndarray:
    from scipy.optimize import minimize

    res = minimize(fun, x0, jac=True, method="L-BFGS-B", options={"maxiter": int(max_iter), "gtol": 1e-9})
    if not np.all(np.isfinite(res.x)):
        raise LlmcalError(f"{what}: the fit diverged (non-finite parameters)")
    if not res.success:
        log.warning("%s: L-BFGS stopped before convergence (%s)", what, res.message)
    return res.x


def _inputs(z: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Log-probabilities with pads as 0 (so that products with them vanish)."""
    return np.where(mask, _log_softmax(z, mask), 0.0)


class VectorScaler(Calibrator):
    """Vector scaling (Guo et al., "On Calibration of Modern Neural Networks", ICML 2017).

    z'_ik = w_k x_ik + b_k, with x_i = log softmax(z_i) and one scale w_k and
    offset b_k per option position k, fitted by minimum NLL on the calibration
    split (w starts at 1, b at 0: the identity). Softmax ignores a common shift
    of b, so b is reported centred (mean 0). Handles mixed K. ``l2`` adds
    l2 * sum_k ((w_k - 1)^2 + b_k^2) to the NLL (0 by default).

    Fitted attributes: ``scale_`` (w), ``bias_`` (b), ``nll_before_``, ``nll_after_``.
    """

    name = "vector"
    _fitted_attr = "scale_"

    def __init__(self, l2: float = 0.0, max_iter: int = 1000):
        self.l2 = l2
        self.max_iter = max_iter

    def _fit(self, z, mask, answers):
        x = _inputs(z, mask)
        k = z.shape[1]
        lam = float(self.l2)

        def fun(theta):
            w, b = theta[:k], theta[k:]
            loss, g = _nll_grad(x * w + b, mask, answers)
            loss += lam * float(np.sum((w - 1.0) ** 2) + np.sum(b ** 2))
            return loss, np.concatenate([(g * x).sum(axis=0) + 2 * lam * (w - 1.0), g.sum(axis=0) + 2 * lam * b])

        theta0 = np.concatenate([np.ones(k), np.zeros(k)])
        self.nll_before_ = _nll_grad(x, mask, answers)[0]
        theta = _minimise(fun, theta0, "vector scaling", self.max_iter)
        self.bias_ = theta[k:] - theta[k:].mean()
        self.scale_ = theta[:k]
        self.nll_after_ = _nll_grad(x * self.scale_ + self.bias_, mask, answers)[0]

    def _transform(self, z, mask):
        if z.shape[1] > len(self.scale_):
            raise LlmcalError(f"vector scaling was fitted on questions with at most {len(self.scale_)} options, "
                              f"got {z.shape[1]}")
        k = z.shape[1]
        return np.where(mask, _inputs(z, mask) * self.scale_[:k] + self.bias_[:k], -np.inf)


class BiasCorrector(Calibrator):
    """Bias-only (letter-prior) correction: z'_ik = x_ik + b_k, one offset per option position.

    The supervised form of a letter-prior correction: b_k is what must be added
    to letter k's log-probability so that the calibration answers are most
    likely; a model that says "A" too often gets b_A < 0. Fitted by minimum NLL
    (vector scaling with every w_k fixed at 1; Guo et al. 2017 section 4.2 and
    the bias term of Zhao et al. 2021). Handles mixed K; b is reported centred.

    Fitted attributes: ``bias_``, ``nll_before_``, ``nll_after_``.
    """

    name = "bias"
    _fitted_attr = "bias_"

    def __init__(self, max_iter: int = 1000):
        self.max_iter = max_iter

    def _fit(self, z, mask, answers):
        x = _inputs(z, mask)

        def fun(b):
            loss, g = _nll_grad(x + b, mask, answers)
            return loss, g.sum(axis=0)

        self.nll_before_ = _nll_grad(x, mask, answers)[0]
        b = _minimise(fun, np.zeros(z.shape[1]), "bias correction", self.max_iter)
        self.bias_ = b - b.mean()
        self.nll_after_ = _nll_grad(x + self.bias_, mask, answers)[0]

    def _transform(self, z, mask):
        k = z.shape[1]
        if k > len(self.bias_):
            raise LlmcalError(f"bias correction was fitted on questions with at most {len(self.bias_)} options, "
                              f"got {k}")
        return np.where(mask, _inputs(z, mask) + self.bias_[:k], -np.inf)


class MatrixScaler(Calibrator):
    """Matrix scaling with off-diagonal and intercept regularisation (ODIR).

    z'_i = W x_i + b with x_i = log softmax(z_i), W a K x K matrix and b a
    K-vector (Guo et al. 2017; on log-probabilities this is Dirichlet
    calibration, Kull et al., "Beyond temperature scaling", NeurIPS 2019),
    fitted by minimising

        NLL + off_diagonal / (K (K - 1)) * sum_{j != k} W_jk^2 + bias / K * sum_k b_k^2

    (Kull et al.'s ODIR: the diagonal is free, so the fit can always fall back
    to vector scaling; without the penalty K^2 + K parameters overfit a small
    calibration split). W starts at the identity, b at 0. Needs the same K in
    every question: mixed K is refused with an error.

    Fitted attributes: ``weights_`` (W), ``bias_`` (b), ``n_options_``, ``nll_before_``, ``nll_after_``.
    """

    name = "matrix"
    _fitted_attr = "weights_"

    def __init__(self, off_diagonal: float = 1e-2, bias: float = 1e-2, max_iter: int = 2000):
        self.off_diagonal = off_diagonal
        self.bias = bias
        self.max_iter = max_iter

    def _fit(self, z, mask, answers):
        for name in ("off_diagonal", "bias"):
            check_value(NonNegativeNumber, getattr(self, name), f"matrix scaling: {name}")
        k = _require_fixed_k(mask, "matrix scaling")
        x = _inputs(z, mask)
        off = ~np.eye(k, dtype=bool)
        lam_w = float(self.off_diagonal) / (k * (k - 1)) if k > 1 else 0.0
        lam_b = float(self.bias) / k

        def fun(theta):
            w = theta[:k * k].reshape(k, k)
            b = theta[k * k:]
            loss, g = _nll_grad(x @ w.T + b, mask, answers)
            loss += lam_w * float(np.sum(w[off] ** 2)) + lam_b * float(np.sum(b ** 2))
            gw = g.T @ x + 2 * lam_w * np.where(off, w, 0.0)
            return loss, np.concatenate([gw.ravel(), g.sum(axis=0) + 2 * lam_b * b])

        theta0 = np.concatenate([np.eye(k).ravel(), np.zeros(k)])
        self.nll_before_ = _nll_grad(x, mask, answers)[0]
        theta = _minimise(fun, theta0, "matrix scaling", self.max_iter)
        self.weights_ = theta[:k * k].reshape(k, k)
        self.bias_ = theta[k * k:]
        self.n_options_ = k
        self.nll_after_ = _nll_grad(x @ self.weights_.T + self.bias_, mask, answers)[0]

    def _transform(self, z, mask):
        k = _require_fixed_k(mask, "matrix scaling")
        if k != self.n_options_:
            raise LlmcalError(f"matrix scaling was fitted on {self.n_options_}-option questions, got {k} options")
        return _inputs(z, mask) @ self.weights_.T + self.bias_

