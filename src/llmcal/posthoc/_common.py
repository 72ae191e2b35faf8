"""Shared pieces of the post-hoc calibrators: padded logits, answer checks, the estimator base class.

Logits are either an (N, K) array or a ragged sequence of 1-D arrays (questions
with different numbers of options); ragged input is padded with -inf and
masked, and ragged output is returned as a list of 1-D arrays again.
"""
from __future__ import annotations

import math

import numpy as np

from ..errors import LlmcalError


def _as_padded(logits) -> tuple[np.ndarray, np.ndarray, bool]:
    """(N, Kmax) float64 logits (pads -inf), mask of real options, and whether the input was ragged."""
    if isinstance(logits, np.ndarray) and logits.dtype != object:
        z = np.asarray(logits, dtype=np.float64)
        if z.ndim != 2:
            raise LlmcalError(f"logits must be an (N, K) array or a list of 1-D arrays, got shape {z.shape}")
        rows, ragged = None, False
    else:
        try:
            rows = [np.asarray(r, dtype=np.float64) for r in logits]
        except (TypeError, ValueError) as e:
            raise LlmcalError(f"logits must be numeric: {e}") from e
        for i, r in enumerate(rows):
            if r.ndim != 1 or r.size == 0:
                raise LlmcalError(f"logits row {i} must be a non-empty 1-D array, got shape {r.shape}")
        ragged = True
    if rows is None:
        n, k = z.shape
        if n == 0 or k == 0:
            raise LlmcalError(f"logits are empty (shape {z.shape})")
        mask = np.ones((n, k), dtype=bool)
    else:
        if not rows:
            raise LlmcalError("logits are empty")
        kmax = max(r.size for r in rows)
        z = np.full((len(rows), kmax), -np.inf)
        mask = np.zeros((len(rows), kmax), dtype=bool)
        for i, r in enumerate(rows):
            z[i, : r.size] = r
            mask[i, : r.size] = True
    finite = np.isfinite(z) | ~mask
    if not finite.all():
        bad = int(np.flatnonzero(~finite.all(axis=1))[0])
        raise LlmcalError(f"logits row {bad} has a non-finite value")
    return z, mask, ragged


def _masked_softmax(z: np.ndarray, mask: np.ndarray) -> np.ndarray:
    s = np.where(mask, z, -np.inf)
    s = s - s.max(axis=1, keepdims=True)
    e = np.exp(s)
    return e / e.sum(axis=1, keepdims=True)


def _check_temperature(t) -> float:
    try:
        t = float(t)
    except (TypeError, ValueError) as e:
        raise LlmcalError(f"temperature must be a number, got {t!r}") from e
    if not (math.isfinite(t) and t > 0):
        raise LlmcalError(f"temperature must be a finite number > 0, got {t!r}")
    return t


def _check_answers(answers, mask: np.ndarray) -> np.ndarray:
    """Answers as int64, one per row of ``mask``, each within that row's options."""
    a = np.asarray(answers)
    n = mask.shape[0]
    if a.ndim != 1 or a.shape[0] != n:
        raise LlmcalError(f"answers must be a 1-D array with one entry per question ({n}), got shape {a.shape}")
    if a.dtype == bool or not np.issubdtype(a.dtype, np.integer):
        raise LlmcalError(f"answers must be integer option indices, got dtype {a.dtype}")
    a = a.astype(np.int64)
    n_opts = mask.sum(axis=1)
    bad = (a < 0) | (a >= n_opts)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise LlmcalError(f"answer {a[i]} at row {i} is out of range for {n_opts[i]} options")
    return a


def _log_softmax(z: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax over the real options; pads stay -inf."""
    s = np.where(mask, z, -np.inf)
    mx = s.max(axis=1, keepdims=True)
    out = s - mx
    out = out - np.log(np.exp(out).sum(axis=1, keepdims=True))
    return np.where(mask, out, -np.inf)


def _option_counts(mask: np.ndarray) -> np.ndarray:
    return mask.sum(axis=1).astype(np.int64)


def _require_fixed_k(mask: np.ndarray, method: str) -> int:
    """K when every question has K options; else a clear refusal naming the counts found."""
    counts = np.unique(_option_counts(mask))
    if counts.size != 1:
        raise LlmcalError(f"{method} needs the same number of options in every question, but the data mixes "
                          f"K = {', '.join(str(int(c)) for c in counts)}; use a method that handles mixed K "
                          f"(ts, vector, bias, batch, platt, isotonic, histogram) or split the data by K")
    return int(counts[0])


def _unpad(z: np.ndarray, mask: np.ndarray, ragged: bool):
    """Padded output back in the input's shape: the array itself, or one 1-D array per question."""
    if ragged:
        return [z[i, mask[i]] for i in range(z.shape[0])]
    return z


class Calibrator:
    """Base class: scikit-learn style (constructor stores parameters, ``fit`` learns ``*_`` attributes).

    Subclasses implement ``_fit(z, mask, answers)`` (``answers`` may be None for
    label-free methods) and ``_transform(z, mask) -> z'`` on padded arrays; the
    output are *logits*: softmax of a row of ``transform`` is the calibrated
    distribution over that question's options.
    """

    name = "calibrator"
    needs_labels = True
    _fitted_attr = "n_samples_"

    def fit(self, logits, answers=None):
        """Learn the calibration map from calibration ``logits`` ((N, K) or ragged) and ``answers``."""
        z, mask, _ = _as_padded(logits)
        if answers is None:
            if self.needs_labels:
                raise LlmcalError(f"{type(self).__name__}.fit needs the answers of the calibration questions")
            a = None
        else:
            a = _check_answers(answers, mask)
        self._fit(z, mask, a)
        self.n_samples_ = int(z.shape[0])
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, self._fitted_attr):
            raise LlmcalError(f"{type(self).__name__} is not fitted: call fit(logits, answers) first")

    def transform(self, logits):
        """Calibrated logits, an array for array input and a list of 1-D arrays for ragged input."""
        self._check_fitted()
        z, mask, ragged = _as_padded(logits)
        return _unpad(self._transform(z, mask), mask, ragged)

    def predict_proba(self, logits) -> np.ndarray:
        """Calibrated probabilities as an (N, Kmax) array, zero-padded for ragged input."""
        self._check_fitted()
        z, mask, _ = _as_padded(logits)
        return _masked_softmax(self._transform(z, mask), mask)

    def fit_transform(self, logits, answers=None):
        return self.fit(logits, answers).transform(logits)

    def params(self) -> dict:
        """The fitted state as JSON-friendly values (for reports)."""
        self._check_fitted()
        out = {}
        for k, v in vars(self).items():
            if k.endswith("_") and not k.startswith("_"):
                out[k] = v.tolist() if isinstance(v, np.ndarray) else v
        return out

    def _fit(self, z, mask, answers) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _transform(self, z, mask) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.endswith("_"))
        return f"{type(self).__name__}({params})"
