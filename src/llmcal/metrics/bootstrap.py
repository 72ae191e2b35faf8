"""Percentile bootstrap intervals, vectorised for the metrics the reports show.

Resamples of the N questions are drawn with replacement from
``np.random.default_rng(seed)``: the same (N, n_resamples, seed) gives the same
resamples for every metric and every method, so intervals of a *difference*
between two methods on the same questions (a paired bootstrap) come from
subtracting their per-resample values (:func:`bootstrap_diff_ci`).

Metrics with a vectorised path (the rest are called once per resample):
``accuracy``, ``brier``, ``nll`` (means of per-question values), ``conf_ece``
and ``classwise_ece`` (also as ``functools.partial(..., n_bins=M)``; one flat
``bincount`` over (resample, bin) pairs), and ``aurc`` (one ``bincount`` over
(resample, tie group) pairs, then :func:`~llmcal.metrics.selective.aurc_from_group_stats`).
"""
from __future__ import annotations

import functools
from typing import Callable

import numpy as np

from ..errors import LlmcalError
from ..validation import OpenFraction, PositiveInt, check_value
from .core import _check_inputs, _check_n_bins, _conf_correct, accuracy, bin_index, brier, classwise_ece, conf_ece, nll
from .selective import aurc, aurc_from_group_stats, tie_groups

__all__ = ["bootstrap_values", "bootstrap_ci", "bootstrap_diff_ci", "percentile_interval"]

_BOOTSTRAP_CHUNK_ELEMENTS = 4_000_000  # resample indices held in memory at once


def _resample_batches(rng: np.random.Generator, n: int, n_resamples: int):
    """Yield (B, n) arrays of bootstrap indices, n_resamples rows in all."""
    per_chunk = max(1, _BOOTSTRAP_CHUNK_ELEMENTS // n)
    done = 0
    while done < n_resamples:
        b = min(per_chunk, n_resamples - done)
        yield rng.integers(0, n, size=(b, n))
        done += b


def _unwrap(metric_fn) -> tuple[Callable, int | None] | None:
    """(function, n_bins or None) for a metric given bare or as ``partial(fn, n_bins=M)``."""
    if isinstance(metric_fn, functools.partial):
        if metric_fn.args or not set(metric_fn.keywords) <= {"n_bins"}:
            return None
        return metric_fn.func, metric_fn.keywords.get("n_bins")
    return metric_fn, None


def _fast_reducer(metric_fn, p: np.ndarray, a: np.ndarray) -> Callable[[np.ndarray], np.ndarray] | None:
    """A function from (B, n) resample indices to B metric values, or None when there is no fast path."""
    unwrapped = _unwrap(metric_fn)
    if unwrapped is None:
        return None
    fn, m = unwrapped
    n = p.shape[0]
    rows = np.arange(n)
    conf, correct = _conf_correct(p, a)
    correct = correct.astype(np.float64)
    if m is not None and fn not in (conf_ece, classwise_ece):
        return None
    if fn is accuracy:
        return lambda idx: correct[idx].mean(axis=1)
    if fn is brier:
        onehot = np.zeros_like(p)
        onehot[rows, a] = 1.0
        per_q = np.sum((p - onehot) ** 2, axis=1)
        return lambda idx: per_q[idx].mean(axis=1)
    if fn is nll:
        per_q = -np.log(np.maximum(p[rows, a], 1e-12))  # nll's default eps
        return lambda idx: per_q[idx].mean(axis=1)
    if fn is conf_ece or fn is classwise_ece:
        m = _check_n_bins(10 if m is None else m)
        if fn is conf_ece:
            columns = [(bin_index(conf, m), correct - conf)]
        else:
            columns = [(bin_index(p[:, j], m), (a == j) - p[:, j]) for j in range(p.shape[1])]

        def binned(idx: np.ndarray) -> np.ndarray:
            b = idx.shape[0]
            out = np.zeros(b)
            offset = (np.arange(b)[:, None] * m)
            for bins, diff in columns:
                flat = (offset + bins[idx]).ravel()
                sums = np.bincount(flat, weights=diff[idx].ravel(), minlength=b * m)
                out += np.abs(sums.reshape(b, m)).sum(axis=1) / n
            return out / len(columns)

        return binned
    if fn is aurc:
        gid, g = tie_groups(conf)

        def by_group(idx: np.ndarray) -> np.ndarray:
            b = idx.shape[0]
            flat = (np.arange(b)[:, None] * g + gid[idx]).ravel()
            n_g = np.bincount(flat, minlength=b * g).reshape(b, g)
            c_g = np.bincount(flat, weights=correct[idx].ravel(), minlength=b * g).reshape(b, g)
            return aurc_from_group_stats(n_g, c_g)

        return by_group
    return None


def _check_resampling(n_resamples, level) -> None:
    check_value(PositiveInt, n_resamples, "n_resamples")
    check_value(OpenFraction, level, "level")


def bootstrap_values(metric_fn: Callable[[np.ndarray, np.ndarray], float], probs, answers,
                     n_resamples: int = 1000, seed: int = 0) -> np.ndarray:
    """The metric on each of ``n_resamples`` bootstrap resamples (fast path where one exists)."""
    p, a = _check_inputs(probs, answers)
    _check_resampling(n_resamples, 0.5)
    n = p.shape[0]
    rng = np.random.default_rng(seed)
    reducer = _fast_reducer(metric_fn, p, a)
    values = np.empty(int(n_resamples), dtype=np.float64)
    pos = 0
    for idx in _resample_batches(rng, n, int(n_resamples)):
        b = idx.shape[0]
        if reducer is not None:
            values[pos:pos + b] = reducer(idx)
        else:
            for j, row in enumerate(idx):
                values[pos + j] = float(metric_fn(p[row], a[row]))
        pos += b
    return values


def percentile_interval(values, level: float = 0.95) -> tuple[float, float]:
    """The (1-level)/2 and (1+level)/2 percentiles of ``values``, NaNs ignored ((nan, nan) if all are NaN)."""
    v = np.asarray(values, dtype=np.float64)
    finite = v[~np.isnan(v)]
    if finite.size == 0:
        return (float("nan"), float("nan"))
    alpha = (1.0 - float(level)) / 2.0
    lo, hi = np.percentile(finite, [100.0 * alpha, 100.0 * (1.0 - alpha)])
    return (float(lo), float(hi))


def bootstrap_ci(metric_fn: Callable[[np.ndarray, np.ndarray], float], probs, answers,
                 n_resamples: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of ``metric_fn(probs, answers)``.

    Draws ``n_resamples`` resamples of the N questions with replacement from
    ``np.random.default_rng(seed)`` and returns the (1-level)/2 and (1+level)/2
    percentiles of the metric over them (NaN resample values are ignored).
    The metrics listed in the module docstring are computed vectorised from
    per-question statistics; any other metric is called once per resample.
    Both paths use the same resamples.
    """
    _check_resampling(n_resamples, level)
    return percentile_interval(bootstrap_values(metric_fn, probs, answers, n_resamples, seed), level)


def bootstrap_diff_ci(metric_fn: Callable[[np.ndarray, np.ndarray], float], probs_before, probs_after, answers,
                      n_resamples: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Paired percentile interval of metric(after) - metric(before) on the same questions.

    Both are evaluated on the same resamples (same seed and N), so the interval
    reflects the change itself, not the spread of either number.
    """
    _check_resampling(n_resamples, level)
    pb = np.asarray(probs_before)
    pa = np.asarray(probs_after)
    if pb.shape[0] != pa.shape[0]:
        raise LlmcalError(f"paired bootstrap: {pb.shape[0]} and {pa.shape[0]} questions differ")
    before = bootstrap_values(metric_fn, pb, answers, n_resamples, seed)
    after = bootstrap_values(metric_fn, pa, answers, n_resamples, seed)
    return percentile_interval(after - before, level)
