"""Calibration metrics for multiple-choice predictions (pure numpy).

Every function takes ``probs`` (N x K, rows summing to 1, possibly zero-padded
for questions with fewer than K options) and ``answers`` (N integer indices).
The prediction is the argmax, the confidence the max probability.

Binned metrics follow one pipeline: validate, reduce to per-bin sufficient
statistics (:class:`BinStats`: counts, sums of confidence, sums of
correctness), compute the number from those statistics. Statistics add, so the
same code serves one process, a sharded evaluation (sum across ranks) and the
RCFT E-step.

Bins are equal-width and left-closed, the last one closed: a confidence c falls
in bin ``min(floor(c * M), M - 1)``.
"""
from __future__ import annotations

import functools
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from .errors import LlmcalError
from .predictions import Prediction, stack_probs

__all__ = [
    "BinStats",
    "bin_index",
    "bin_statistics",
    "ece_from_statistics",
    "accuracy",
    "conf_ece",
    "classwise_ece",
    "equal_mass_ece",
    "mce",
    "brier",
    "nll",
    "auroc",
    "mean_confidence",
    "reliability_bins",
    "bootstrap_ci",
    "compute_metrics",
    "metrics_from_predictions",
]

_ROW_SUM_TOL = 1e-3


# --------------------------------------------------------------------------- validation

def _check_n_bins(n_bins: int) -> int:
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise LlmcalError(f"n_bins must be an integer >= 1, got {n_bins!r}")
    return int(n_bins)


def _check_inputs(probs, answers) -> tuple[np.ndarray, np.ndarray]:
    """Validate and return ``probs`` as float64 (N, K) and ``answers`` as int64 (N,)."""
    p = np.asarray(probs, dtype=np.float64)
    a = np.asarray(answers)
    if p.ndim != 2:
        raise LlmcalError(f"probs must be a 2-D array (questions x options), got shape {p.shape}")
    if a.ndim != 1:
        raise LlmcalError(f"answers must be a 1-D array, got shape {a.shape}")
    n, k = p.shape
    if n == 0:
        raise LlmcalError("no questions: probs and answers are empty")
    if k == 0:
        raise LlmcalError("probs has no option columns")
    if a.shape[0] != n:
        raise LlmcalError(f"probs has {n} rows but answers has {a.shape[0]} entries")
    if not np.all(np.isfinite(p)):
        bad = int(np.flatnonzero(~np.isfinite(p).all(axis=1))[0])
        raise LlmcalError(f"probs has a non-finite value (row {bad})")
    if p.min() < -1e-9 or p.max() > 1 + 1e-9:
        raise LlmcalError(f"probs must lie in [0, 1], found values in [{p.min():.6g}, {p.max():.6g}]")
    row_sums = p.sum(axis=1)
    off = np.abs(row_sums - 1.0) > _ROW_SUM_TOL
    if off.any():
        bad = int(np.flatnonzero(off)[0])
        raise LlmcalError(f"probs rows must sum to 1 (row {bad} sums to {row_sums[bad]:.6g})")
    if a.dtype == bool or not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        raise LlmcalError(f"answers must be integer option indices, got dtype {a.dtype}")
    if np.issubdtype(a.dtype, np.floating):
        if not np.all(np.isfinite(a)) or not np.all(a == np.round(a)):
            raise LlmcalError("answers must be integer option indices, got non-integer values")
    a = a.astype(np.int64)
    out = (a < 0) | (a >= k)
    if out.any():
        bad = int(np.flatnonzero(out)[0])
        raise LlmcalError(f"answer {a[bad]} at row {bad} is out of range for {k} options (0..{k - 1})")
    return p, a


def _conf_correct(p: np.ndarray, a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Confidence (max prob) and correctness (argmax == answer) of validated inputs."""
    pred = np.argmax(p, axis=1)
    return p[np.arange(p.shape[0]), pred], (pred == a)


# --------------------------------------------------------------------------- sufficient statistics

def bin_index(conf, n_bins: int = 10) -> np.ndarray:
    """Bin of each confidence: ``min(floor(c * M), M - 1)``, clipped to ``[0, M - 1]``.

    Bins are ``[0, 1/M), [1/M, 2/M), ..., [(M-1)/M, 1]`` (left-closed, last closed).
    """
    m = _check_n_bins(n_bins)
    c = np.asarray(conf, dtype=np.float64)
    if c.size and not np.all(np.isfinite(c)):
        raise LlmcalError("confidences must be finite")
    return np.clip(np.floor(c * m), 0, m - 1).astype(np.int64)


@dataclass(frozen=True, eq=False)
class BinStats:
    """Per-bin sufficient statistics: ``count``, ``sum_conf``, ``sum_correct`` (length M each).

    ``a + b`` sums two statistics bin by bin (shards, processes); ``sum([...])``
    works too. ``accuracy`` and ``confidence`` are the per-bin means (NaN for
    empty bins).
    """

    count: np.ndarray
    sum_conf: np.ndarray
    sum_correct: np.ndarray

    def __post_init__(self):
        arrays = [np.asarray(x, dtype=np.float64).reshape(-1) for x in (self.count, self.sum_conf, self.sum_correct)]
        if not (len(arrays[0]) == len(arrays[1]) == len(arrays[2])) or len(arrays[0]) == 0:
            raise LlmcalError("BinStats arrays must be non-empty and of equal length")
        for name, arr in zip(("count", "sum_conf", "sum_correct"), arrays):
            arr.setflags(write=False)
            object.__setattr__(self, name, arr)

    @classmethod
    def zeros(cls, n_bins: int = 10) -> "BinStats":
        m = _check_n_bins(n_bins)
        return cls(np.zeros(m), np.zeros(m), np.zeros(m))

    @property
    def n_bins(self) -> int:
        return len(self.count)

    @property
    def n(self) -> int:
        """Total number of samples."""
        return int(round(float(self.count.sum())))

    @property
    def accuracy(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.count > 0, self.sum_correct / self.count, np.nan)

    @property
    def confidence(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.count > 0, self.sum_conf / self.count, np.nan)

    def to_array(self) -> np.ndarray:
        """(3, M) array ``[count, sum_conf, sum_correct]``, e.g. for an all-reduce."""
        return np.stack([self.count, self.sum_conf, self.sum_correct])

    @classmethod
    def from_array(cls, arr) -> "BinStats":
        arr = np.asarray(arr, dtype=np.float64)
        if arr.ndim != 2 or arr.shape[0] != 3:
            raise LlmcalError(f"BinStats.from_array expects shape (3, M), got {arr.shape}")
        return cls(arr[0], arr[1], arr[2])

    def __add__(self, other):
        if isinstance(other, (int, float)) and other == 0:
            return self
        if not isinstance(other, BinStats):
            return NotImplemented
        if other.n_bins != self.n_bins:
            raise LlmcalError(f"cannot add BinStats with {self.n_bins} and {other.n_bins} bins")
        return BinStats(self.count + other.count, self.sum_conf + other.sum_conf,
                        self.sum_correct + other.sum_correct)

    __radd__ = __add__

    def __repr__(self) -> str:
        return f"BinStats(n_bins={self.n_bins}, n={self.n})"


def bin_statistics(conf, correct, n_bins: int = 10) -> BinStats:
    """Per-bin ``count``, ``sum_conf`` and ``sum_correct`` of confidences ``conf`` and 0/1 ``correct``.

    An empty input gives all-zero statistics (a shard with no data).
    """
    m = _check_n_bins(n_bins)
    c = np.asarray(conf, dtype=np.float64).reshape(-1)
    y = np.asarray(correct, dtype=np.float64).reshape(-1)
    if c.shape != y.shape:
        raise LlmcalError(f"conf has {c.size} entries but correct has {y.size}")
    b = bin_index(c, m)
    return BinStats(
        count=np.bincount(b, minlength=m).astype(np.float64),
        sum_conf=np.bincount(b, weights=c, minlength=m),
        sum_correct=np.bincount(b, weights=y, minlength=m),
    )


def ece_from_statistics(stats: BinStats) -> float:
    """ECE = sum_m |B_m|/N * |acc(B_m) - conf(B_m)| = (1/N) sum_m |sum_correct_m - sum_conf_m|."""
    total = float(stats.count.sum())
    if total <= 0:
        raise LlmcalError("cannot compute ECE from empty bin statistics")
    return float(np.abs(stats.sum_correct - stats.sum_conf).sum() / total)


# --------------------------------------------------------------------------- metrics

def accuracy(probs, answers) -> float:
    """Accuracy = (1/N) sum_i 1{argmax_k p_ik = y_i}."""
    p, a = _check_inputs(probs, answers)
    return float(np.mean(np.argmax(p, axis=1) == a))


def conf_ece(probs, answers, n_bins: int = 10) -> float:
    """Confidence ECE = sum_m |B_m|/N * |acc(B_m) - mean conf(B_m)|, conf = max_k p_ik, M equal-width bins."""
    p, a = _check_inputs(probs, answers)
    conf, correct = _conf_correct(p, a)
    return ece_from_statistics(bin_statistics(conf, correct, n_bins))


def classwise_ece(probs, answers, n_bins: int = 10) -> float:
    """Classwise ECE = (1/K) sum_k sum_m |B_mk|/N * |mean_{B_mk} 1{y=k} - mean_{B_mk} p_k|.

    B_mk are the equal-width bins of column k of ``probs``. Every question takes
    part for every column k: a zero-padded column counts as p_k = 0 with
    1{y=k} = 0, so K is the number of columns.
    """
    p, a = _check_inputs(probs, answers)
    k = p.shape[1]
    total = 0.0
    for j in range(k):
        total += ece_from_statistics(bin_statistics(p[:, j], a == j, n_bins))
    return float(total / k)


def equal_mass_ece(probs, answers, n_bins: int = 10) -> float:
    """Equal-mass ECE = sum_m |B_m|/N * |acc(B_m) - mean conf(B_m)|, bins of equal size.

    Questions are sorted by confidence (ties by correctness, so the result does
    not depend on row order) and split with ``np.array_split`` into M bins of
    sizes differing by at most one; empty bins (N < M) are skipped.
    """
    m = _check_n_bins(n_bins)
    p, a = _check_inputs(probs, answers)
    conf, correct = _conf_correct(p, a)
    order = np.lexsort((correct, conf))
    n = len(conf)
    total = 0.0
    for chunk in np.array_split(order, m):
        if len(chunk):
            total += abs(float(correct[chunk].sum()) - float(conf[chunk].sum()))
    return float(total / n)


def mce(probs, answers, n_bins: int = 10) -> float:
    """Maximum calibration error = max over non-empty bins m of |acc(B_m) - mean conf(B_m)|."""
    p, a = _check_inputs(probs, answers)
    conf, correct = _conf_correct(p, a)
    stats = bin_statistics(conf, correct, n_bins)
    nonempty = stats.count > 0
    return float(np.max(np.abs(stats.accuracy[nonempty] - stats.confidence[nonempty])))


def brier(probs, answers) -> float:
    """Brier score = (1/N) sum_i sum_k (p_ik - 1{y_i = k})^2 (range [0, 2])."""
    p, a = _check_inputs(probs, answers)
    onehot = np.zeros_like(p)
    onehot[np.arange(len(a)), a] = 1.0
    return float(np.mean(np.sum((p - onehot) ** 2, axis=1)))


def nll(probs, answers, eps: float = 1e-12) -> float:
    """Negative log-likelihood = -(1/N) sum_i log max(p_{i, y_i}, eps)."""
    p, a = _check_inputs(probs, answers)
    py = p[np.arange(len(a)), a]
    return float(-np.mean(np.log(np.maximum(py, eps))))


def auroc(conf, correct) -> float:
    """AUROC of confidence for correctness (Mann-Whitney U with average ranks for ties).

    AUROC = (R_+ - n_+(n_+ + 1)/2) / (n_+ n_-), R_+ the sum of the ranks of the
    correct answers' confidences; equals P(c_correct > c_wrong) + 0.5 P(tie).
    NaN when all answers are correct or all are wrong.
    """
    from scipy.stats import rankdata

    c = np.asarray(conf, dtype=np.float64).reshape(-1)
    y = np.asarray(correct).reshape(-1).astype(bool)
    if c.shape != y.shape:
        raise LlmcalError(f"conf has {c.size} entries but correct has {y.size}")
    if c.size == 0:
        raise LlmcalError("no questions: conf and correct are empty")
    if not np.all(np.isfinite(c)):
        raise LlmcalError("confidences must be finite")
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(c, method="average")
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def mean_confidence(probs) -> float:
    """Mean confidence = (1/N) sum_i max_k p_ik."""
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] == 0 or p.shape[1] == 0:
        raise LlmcalError(f"probs must be a non-empty 2-D array, got shape {p.shape}")
    return float(np.mean(np.max(p, axis=1)))


def reliability_bins(probs, answers, n_bins: int = 10) -> dict:
    """Reliability-diagram data: edges (M+1), per-bin count, accuracy and mean confidence.

    Accuracy and confidence are None for empty bins (JSON-friendly).
    """
    m = _check_n_bins(n_bins)
    p, a = _check_inputs(probs, answers)
    conf, correct = _conf_correct(p, a)
    stats = bin_statistics(conf, correct, m)

    def _opt(values):
        return [None if c == 0 else float(v) for c, v in zip(stats.count, values)]

    return {
        "n_bins": m,
        "edges": [float(e) for e in np.linspace(0.0, 1.0, m + 1)],
        "count": [int(c) for c in stats.count],
        "accuracy": _opt(stats.accuracy),
        "confidence": _opt(stats.confidence),
    }


# --------------------------------------------------------------------------- bootstrap

_BOOTSTRAP_CHUNK_ELEMENTS = 4_000_000  # resample indices held in memory at once


def _resample_batches(rng: np.random.Generator, n: int, n_resamples: int):
    """Yield (B, n) arrays of bootstrap indices, n_resamples rows in all."""
    per_chunk = max(1, _BOOTSTRAP_CHUNK_ELEMENTS // n)
    done = 0
    while done < n_resamples:
        b = min(per_chunk, n_resamples - done)
        yield rng.integers(0, n, size=(b, n))
        done += b


def _fast_bootstrap_kind(metric_fn) -> tuple[str, int] | None:
    """Recognise metrics with a vectorised bootstrap: ('accuracy', 0) or ('conf_ece', n_bins)."""
    if metric_fn is accuracy:
        return ("accuracy", 0)
    if metric_fn is conf_ece:
        return ("conf_ece", 10)
    if (isinstance(metric_fn, functools.partial) and metric_fn.func is conf_ece and not metric_fn.args
            and set(metric_fn.keywords) <= {"n_bins"}):
        return ("conf_ece", _check_n_bins(metric_fn.keywords.get("n_bins", 10)))
    return None


def bootstrap_ci(metric_fn: Callable[[np.ndarray, np.ndarray], float], probs, answers,
                 n_resamples: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of ``metric_fn(probs, answers)``.

    Draws ``n_resamples`` resamples of the N questions with replacement from
    ``np.random.default_rng(seed)`` and returns the (1-level)/2 and (1+level)/2
    percentiles of the metric over them (NaN resample values are ignored).
    ``accuracy`` and ``conf_ece`` (also as ``functools.partial(conf_ece,
    n_bins=...)``) are computed vectorised from per-question statistics; any
    other metric is called once per resample. Both paths use the same resamples.
    """
    p, a = _check_inputs(probs, answers)
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, (int, np.integer)) or n_resamples < 1:
        raise LlmcalError(f"n_resamples must be an integer >= 1, got {n_resamples!r}")
    if not 0.0 < float(level) < 1.0:
        raise LlmcalError(f"level must be in (0, 1), got {level!r}")
    n = p.shape[0]
    rng = np.random.default_rng(seed)
    kind = _fast_bootstrap_kind(metric_fn)
    values = np.empty(int(n_resamples), dtype=np.float64)
    pos = 0
    if kind is not None:
        conf, correct = _conf_correct(p, a)
        correct = correct.astype(np.float64)
        m = kind[1]
        bins = bin_index(conf, m) if kind[0] == "conf_ece" else None
        for idx in _resample_batches(rng, n, int(n_resamples)):
            b = idx.shape[0]
            if kind[0] == "accuracy":
                values[pos:pos + b] = correct[idx].mean(axis=1)
            else:
                # one flat bincount over (resample, bin) pairs gives every resample's bin sums
                flat = (np.arange(b)[:, None] * m + bins[idx]).ravel()
                diff = np.bincount(flat, weights=(correct - conf)[idx].ravel(), minlength=b * m)
                values[pos:pos + b] = np.abs(diff.reshape(b, m)).sum(axis=1) / n
            pos += b
    else:
        for idx in _resample_batches(rng, n, int(n_resamples)):
            for row in idx:
                values[pos] = float(metric_fn(p[row], a[row]))
                pos += 1
    finite = values[~np.isnan(values)]
    if finite.size == 0:
        return (float("nan"), float("nan"))
    alpha = (1.0 - float(level)) / 2.0
    lo, hi = np.percentile(finite, [100.0 * alpha, 100.0 * (1.0 - alpha)])
    return (float(lo), float(hi))


# --------------------------------------------------------------------------- summaries

def compute_metrics(probs, answers, n_bins: int = 10, n_bootstrap: int = 1000, seed: int = 0,
                    subjects: Sequence[str | None] | None = None) -> dict:
    """Every metric of DESIGN.md as a JSON-serialisable dict of plain Python values.

    Keys: n, accuracy, conf_ece, cw_ece, em_ece, mce, brier, nll, auroc (NaN
    when all answers are right or all wrong), mean_conf, ci ({"accuracy": [lo,
    hi], "conf_ece": [lo, hi]}, percentile bootstrap with ``n_bootstrap``
    resamples; values None when ``n_bootstrap`` is 0), reliability
    (:func:`reliability_bins`), per_subject (subject -> {n, accuracy, conf_ece};
    None subjects under "(none)"; {} when ``subjects`` is None), n_bins.
    """
    m = _check_n_bins(n_bins)
    p, a = _check_inputs(probs, answers)
    if isinstance(n_bootstrap, bool) or not isinstance(n_bootstrap, (int, np.integer)) or n_bootstrap < 0:
        raise LlmcalError(f"n_bootstrap must be an integer >= 0, got {n_bootstrap!r}")
    conf, correct = _conf_correct(p, a)

    if n_bootstrap > 0:
        ci = {
            "accuracy": list(bootstrap_ci(accuracy, p, a, n_resamples=int(n_bootstrap), seed=seed)),
            "conf_ece": list(bootstrap_ci(functools.partial(conf_ece, n_bins=m), p, a,
                                          n_resamples=int(n_bootstrap), seed=seed)),
        }
    else:
        ci = {"accuracy": None, "conf_ece": None}

    per_subject: dict = {}
    if subjects is not None:
        subj = list(subjects)
        if len(subj) != len(a):
            raise LlmcalError(f"subjects has {len(subj)} entries but there are {len(a)} questions")
        groups: dict[str, list[int]] = defaultdict(list)
        for i, s in enumerate(subj):
            groups["(none)" if s is None else str(s)].append(i)
        for name in sorted(groups):
            rows = np.asarray(groups[name])
            per_subject[name] = {
                "n": int(len(rows)),
                "accuracy": accuracy(p[rows], a[rows]),
                "conf_ece": conf_ece(p[rows], a[rows], m),
            }

    return {
        "n": int(len(a)),
        "accuracy": accuracy(p, a),
        "conf_ece": conf_ece(p, a, m),
        "cw_ece": classwise_ece(p, a, m),
        "em_ece": equal_mass_ece(p, a, m),
        "mce": mce(p, a, m),
        "brier": brier(p, a),
        "nll": nll(p, a),
        "auroc": auroc(conf, correct),
        "mean_conf": mean_confidence(p),
        "ci": ci,
        "reliability": reliability_bins(p, a, m),
        "per_subject": per_subject,
        "n_bins": m,
    }


def metrics_from_predictions(preds: Sequence[Prediction], **kw) -> dict:
    """:func:`compute_metrics` on predictions (zero-padded probs, their answers and subjects)."""
    probs, answers = stack_probs(preds)
    kw.setdefault("subjects", [p.subject for p in preds])
    return compute_metrics(probs, answers, **kw)
