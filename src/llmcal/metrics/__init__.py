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

Modules: ``core`` (validation, bin statistics, ECEs, Brier, NLL, AUROC),
``estimators`` (debiased L2 calibration error, ECE bin-count sweep), ``smooth``
(smooth ECE), ``selective`` (risk-coverage, AURC, accuracy at a coverage),
``harness`` (the numbers HELM and lm-evaluation-harness report),
``bootstrap`` (intervals), ``summary`` (the metrics dict of a run). The
formulas and sources are in each docstring and in docs/posthoc.md.
"""
from .bootstrap import bootstrap_ci, bootstrap_diff_ci
from .core import (BinStats, accuracy, auroc, bin_statistics, brier, classwise_ece, conf_ece, ece_from_statistics,
                   equal_mass_ece, mce, mean_confidence, nll, reliability_bins)
from .estimators import debiased_l2_ce, ece_bin_sweep
from .harness import harness_metrics
from .selective import aurc, risk_coverage_curve, selective_accuracy
from .smooth import smooth_ece
from .summary import compute_metrics, metrics_from_predictions

# The public metrics. Helpers (bin_index, tie_groups, smooth_ece_at, ...) and the single harness numbers
# (ece_one_bin, platt_scaled_ece, ...; harness_metrics gives them all) are imported from their modules, e.g.
# ``from llmcal.metrics.core import bin_index``; ``llmcal.metrics.estimators`` is the module of that name.
__all__ = [
    "accuracy", "conf_ece", "classwise_ece", "equal_mass_ece", "mce", "brier", "nll", "auroc", "mean_confidence",
    "reliability_bins", "smooth_ece", "debiased_l2_ce", "ece_bin_sweep",
    "risk_coverage_curve", "aurc", "selective_accuracy", "harness_metrics",
    "bootstrap_ci", "bootstrap_diff_ci",
    "BinStats", "bin_statistics", "ece_from_statistics",
    "compute_metrics", "metrics_from_predictions",
]
