"""Scoring a question set with the current model during training: per-bin statistics, summed over ranks.

The E-step (bin accuracies a_b), the regime check of ``--method auto`` and
the held-out training curve all need the same thing: the scoring engine run
on a fixed set of encoded questions with the model as it is now, reduced to
``BinStats`` (count, sum of confidence, sum of correctness per bin) plus the
summed NLL.  Each process scores its shard of the batches
(``ScoreOptions.shard``) and the sums are all-reduced, so every rank gets
identical statistics.  ``Probe`` caches the last result per set, so two
callbacks asking at the same step score once.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from .. import distributed
from ..metrics import BinStats, bin_statistics, ece_from_statistics
from ..prompts import EncodedQuestion
from ..scoring import ScoreOptions, score


@dataclass(frozen=True)
class SetStats:
    bins: BinStats
    nll_sum: float

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
    packed = np.concatenate([local.reshape(-1), [nll]])
    total = distributed.all_reduce_numpy(packed)
    return SetStats(bins=BinStats.from_array(total[:-1].reshape(3, n_bins)), nll_sum=float(total[-1]))


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
