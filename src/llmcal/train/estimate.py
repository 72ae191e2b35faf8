"""Scoring a question set with the current model during training: per-bin statistics, summed over ranks.

The E-step (bin accuracies a_b), the regime check of ``--method auto`` and
the held-out training curve all need the same thing: the scoring engine run
on a fixed set of encoded questions with the model as it is now, reduced to
``BinStats`` (count, sum of confidence, sum of correctness per bin) plus the
summed NLL and each question's correctness (the regime check's bootstrap).  Each process scores its shard of the batches
(``ScoreOptions.shard``) and the sums are all-reduced, so every rank gets
identical statistics.  ``Probe`` caches the last result per set, so two
callbacks asking at the same step score once.

``estimate_bin_accuracy`` turns the E-step's statistics into the bin targets
a_b: each bin's accuracy shrunk toward a prior built from the whole set
(docs/estep.md states the estimator and why).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from .. import distributed
from ..metrics import BinStats, bin_statistics, ece_from_statistics
from ..prompts import EncodedQuestion
from ..scoring import ScoreOptions, score
from ..validation import NonNegativeNumber, validated

log = logging.getLogger(__name__)

# The E-step's Beta prior weighs as much as this many questions in each bin (see estimate_bin_accuracy).
DEFAULT_PRIOR_STRENGTH = 4.0
# Fewer E-step questions than this many per bin: the estimate rests mostly on the prior; a warning says so.
MIN_QUESTIONS_PER_BIN = 5


@dataclass(frozen=True)
class SetStats:
    bins: BinStats
    nll_sum: float
    correct: np.ndarray | None = None  # per question, in the set's order, over all ranks (the regime's bootstrap)

    @property
    def n(self) -> int:
        return self.bins.n

    @property
    def accuracy(self) -> float:
        return float(self.bins.sum_correct.sum() / self.n) if self.n else math.nan

    @property
    def mean_conf(self) -> float:
        return float(self.bins.sum_conf.sum() / self.n) if self.n else math.nan

    @property
    def ece(self) -> float:
        return ece_from_statistics(self.bins) if self.n else math.nan

    @property
    def nll(self) -> float:
        return self.nll_sum / self.n if self.n else math.nan

    def summary(self) -> dict:
        return {"n": self.n, "accuracy": self.accuracy, "ece": self.ece, "nll": self.nll, "mean_conf": self.mean_conf}


def score_stats(model: Any, tokenizer: Any, encoded: Sequence[EncodedQuestion], *, n_bins: int,
                batch_tokens: int, description: str = "scoring", progress: bool = False) -> SetStats:
    """Score ``encoded`` (this rank's shard), reduce to statistics, sum them over all ranks."""
    w = distributed.current_world() if distributed.is_initialized() else distributed.World()
    rank, world = w.rank, w.world_size
    preds = score(model, tokenizer, encoded, options=ScoreOptions(
        batch_tokens=batch_tokens, progress=progress and rank == 0, description=description, shard=(rank, world)))
    conf = [p.conf for p in preds]
    correct = [p.correct for p in preds]
    nll = float(sum(-math.log(max(p.probs[p.answer], 1e-12)) for p in preds))
    local = bin_statistics(conf, correct, n_bins).to_array()
    where = {e.question.id: i for i, e in enumerate(encoded)}
    each = np.zeros(len(encoded))  # this rank's questions filled in: the sum over ranks is every question
    for p in preds:
        each[where[p.id]] = float(p.correct)
    packed = np.concatenate([local.reshape(-1), [nll], each])
    total = distributed.all_reduce_numpy(packed)
    k = 3 * n_bins
    return SetStats(bins=BinStats.from_array(total[:k].reshape(3, n_bins)), nll_sum=float(total[k]),
                    correct=total[k + 1:].copy())


class Probe:
    """``score_stats`` with a one-entry cache per named set, keyed by the global step."""

    def __init__(self, tokenizer: Any, *, n_bins: int, batch_tokens: int, progress: bool = False):
        self.tokenizer = tokenizer
        self.n_bins = n_bins
        self.batch_tokens = batch_tokens
        self.progress = progress
        self._cache: dict[str, tuple[int, SetStats]] = {}

    def __call__(self, name: str, model: Any, encoded: Sequence[EncodedQuestion], step: int) -> SetStats:
        hit = self._cache.get(name)
        if hit is not None and hit[0] == step:
            return hit[1]
        stats = score_stats(model, self.tokenizer, encoded, n_bins=self.n_bins, batch_tokens=self.batch_tokens,
                            description=f"{name} (step {step})", progress=self.progress)
        self._cache[name] = (step, stats)
        return stats


@dataclass(frozen=True)
class BinEstimate:
    """The E-step's per-bin accuracy estimates and what they were computed from."""

    accuracy: list[float | None]  # a_b, the targets (None: empty bin, no estimate)
    raw: list[float | None]  # sum_correct / count per bin (the estimate before shrinkage)
    prior: list[float | None]  # the prior mean m_b per bin
    count: list[int]  # questions per bin
    n: int  # questions in all
    prior_strength: float
    gap: float  # pooled accuracy minus pooled mean confidence (negative: overconfident)

    def to_dict(self) -> dict:
        return {"n_questions": self.n, "count": self.count, "raw_accuracy": self.raw, "prior": self.prior,
                "prior_strength": self.prior_strength, "pooled_gap": self.gap}


def _listed(x: np.ndarray, keep: np.ndarray) -> list[float | None]:
    return [float(v) if k else None for v, k in zip(x, keep)]


@validated
def estimate_bin_accuracy(bins: BinStats, prior_strength: NonNegativeNumber = DEFAULT_PRIOR_STRENGTH) -> BinEstimate:
    """Per-bin accuracy a_b, shrunk toward the bin's confidence corrected by the set's overall calibration gap.

    With n_b questions in bin b, S_b of them correct, mean confidence cbar_b in
    the bin, and over the whole set accuracy A and mean confidence C::

        m_b = clip(cbar_b + (A - C), 0, 1)                 (prior mean)
        a_b = (S_b + kappa * m_b) / (n_b + kappa)          (posterior mean of Beta(kappa m_b, kappa (1 - m_b)))

    Why this prior: the raw bin accuracy S_b / n_b has variance a(1 - a) / n_b,
    so with a few questions per bin (10 held-out questions over 10 bins) the
    targets are mostly 0 or 1 and RCFT fits noise.  The gap A - C is estimated
    from all n questions, not n_b, and says how far the model's confidence sits
    from its accuracy overall; the prior assumes each bin is off by that much
    (exact when miscalibration is a uniform shift), and each bin's own questions
    pull the estimate away from it as they accumulate (kappa pseudo-questions
    against n_b real ones).  As n_b grows a_b tends to the raw accuracy, so large
    estimation sets give the unshrunk E-step; ``prior_strength=0`` gives it
    exactly.  Empty bins stay without an estimate, as before.
    """
    count = np.asarray(bins.count, dtype=np.float64)
    n = float(count.sum())
    keep = count > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        raw = np.where(keep, bins.sum_correct / count, np.nan)
        conf = np.where(keep, bins.sum_conf / count, np.nan)
    gap = float((bins.sum_correct.sum() - bins.sum_conf.sum()) / n) if n > 0 else 0.0
    prior = np.clip(conf + gap, 0.0, 1.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        post = np.where(keep, (bins.sum_correct + prior_strength * prior) / (count + prior_strength), np.nan)
    return BinEstimate(accuracy=_listed(post, keep), raw=_listed(raw, keep), prior=_listed(prior, keep),
                       count=[int(round(c)) for c in count], n=int(round(n)), prior_strength=float(prior_strength),
                       gap=gap)


def too_few(n: int, n_bins: int) -> bool:
    """Fewer than MIN_QUESTIONS_PER_BIN questions per bin on average."""
    return n < MIN_QUESTIONS_PER_BIN * n_bins
