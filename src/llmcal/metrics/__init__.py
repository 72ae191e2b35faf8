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
from .bootstrap import bootstrap_ci, bootstrap_diff_ci, bootstrap_values, percentile_interval
from .core import (BinStats, accuracy, auroc, bin_index, bin_statistics, brier, classwise_ece, conf_ece,
                   ece_from_statistics, equal_mass_bins, equal_mass_ece, mce, mean_confidence, nll, reliability_bins)
from .estimators import DEFAULT_SWEEP_BINS, debiased_l2_ce, debiased_l2_ce_squared, ece_bin_sweep
from .harness import (ece_one_bin, harness_metrics, helm_equal_mass_ece, platt_scaled_ece, rms_calibration_error,
                      selective_accuracy_at_10)
from .selective import (RiskCoverage, accuracy_at_coverage_50, accuracy_at_coverage_80, aurc,
                        aurc_from_group_stats, risk_coverage_curve, selective_accuracy, tie_groups)
from .smooth import smooth_ece, smooth_ece_at, smooth_ece_fixed_point
from .summary import compute_metrics, estimators, metrics_from_predictions

__all__ = [
    "BinStats", "bin_index", "bin_statistics", "ece_from_statistics",
    "accuracy", "conf_ece", "classwise_ece", "equal_mass_ece", "equal_mass_bins", "mce", "brier", "nll", "auroc",
    "mean_confidence", "reliability_bins",
    "debiased_l2_ce", "debiased_l2_ce_squared", "ece_bin_sweep", "DEFAULT_SWEEP_BINS",
    "smooth_ece", "smooth_ece_at", "smooth_ece_fixed_point",
    "RiskCoverage", "risk_coverage_curve", "aurc", "aurc_from_group_stats", "tie_groups", "selective_accuracy",
    "accuracy_at_coverage_80", "accuracy_at_coverage_50",
    "rms_calibration_error", "ece_one_bin", "helm_equal_mass_ece", "platt_scaled_ece", "selective_accuracy_at_10",
    "harness_metrics",
    "bootstrap_ci", "bootstrap_values", "bootstrap_diff_ci", "percentile_interval",
    "compute_metrics", "metrics_from_predictions", "estimators",
]
