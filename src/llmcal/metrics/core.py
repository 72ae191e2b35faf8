"""Core calibration metrics: validation, per-bin sufficient statistics, the binned ECEs, Brier, NLL.

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

from dataclasses import dataclass

import numpy as np

from ..errors import LlmcalError
from ..validation import PositiveInt, check_value

__all__ = [
    "BinStats",
    "bin_index",
    "bin_statistics",
    "ece_from_statistics",
    "accuracy",
    "conf_ece",
    "classwise_ece",
    "equal_mass_ece",
    "equal_mass_bins",
    "mce",
    "brier",
    "nll",
    "auroc",
    "mean_confidence",
    "reliability_bins",
]

_ROW_SUM_TOL = 1e-3


# --------------------------------------------------------------------------- validation

def _check_n_bins(n_bins: int) -> int:
    # every metric checks its n_bins, bootstrap loops included: one cached TypeAdapter, no signature binding
    return check_value(PositiveInt, n_bins, "n_bins")


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


def equal_mass_bins(conf, correct, n_bins: int = 10) -> list[np.ndarray]:
    """Row indices of the M equal-mass bins of confidences ``conf`` (non-empty bins only).

    Rows are sorted by confidence (ties by correctness, so the bins do not depend
    on row order) and cut with ``np.array_split`` into M runs whose sizes differ
    by at most one; with N < M the empty runs are dropped.
    """
    m = _check_n_bins(n_bins)
    order = np.lexsort((np.asarray(correct), np.asarray(conf)))
    return [chunk for chunk in np.array_split(order, m) if len(chunk)]


def equal_mass_ece(probs, answers, n_bins: int = 10) -> float:
    """Equal-mass ECE = sum_m |B_m|/N * |acc(B_m) - mean conf(B_m)|, bins of equal size.

    The bins are :func:`equal_mass_bins`: questions sorted by confidence (ties
    by correctness) and split into M bins of sizes differing by at most one;
    empty bins (N < M) are skipped.
    """
    m = _check_n_bins(n_bins)
    p, a = _check_inputs(probs, answers)
    conf, correct = _conf_correct(p, a)
    total = 0.0
    for chunk in equal_mass_bins(conf, correct, m):
        total += abs(float(correct[chunk].sum()) - float(conf[chunk].sum()))
    return float(total / len(conf))


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
