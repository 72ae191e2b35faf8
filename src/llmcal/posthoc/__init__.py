"""Post-hoc calibration: scikit-learn style calibrators fitted on a calibration split, applied to logits.

Every calibrator has ``fit(logits, answers) -> self`` (learned state in
attributes ending in ``_``), ``transform(logits)`` (calibrated logits, same
shape as the input: an (N, K) array or one 1-D array per question for mixed
K), ``predict_proba(logits)`` and ``params()``. Formulas and sources are in
each docstring and in docs/posthoc.md; :mod:`llmcal.posthoc.compare` runs them
all on a finished run's stored predictions.
"""
from .label_free import (CONTENT_FREE_STRINGS, BatchCalibrator, ContextualCalibrator,
                         content_free_distribution)
from .methods import METHODS, MethodInfo, resolve_methods
from .scaling import BiasCorrector, MatrixScaler, VectorScaler
from .temperature import TemperatureScaler, temperature_scale_predictions
from .topconf import HistogramBinning, IsotonicCalibrator, PlattScaler

__all__ = [
    "TemperatureScaler", "temperature_scale_predictions",
    "VectorScaler", "MatrixScaler", "BiasCorrector",
    "BatchCalibrator", "ContextualCalibrator", "content_free_distribution", "CONTENT_FREE_STRINGS",
    "PlattScaler", "IsotonicCalibrator", "HistogramBinning",
    "METHODS", "MethodInfo", "resolve_methods",
    "calibrate_predictions",
    "compare_methods", "compare_run", "MethodComparison", "Comparison", "PosthocReport",
]


def __getattr__(name):
    # the comparison pulls in plotting; load it only when asked for
    if name in ("calibrate_predictions", "compare_methods", "compare_run", "MethodComparison", "Comparison",
                "PosthocReport"):
        from . import compare

        return getattr(compare, name)
    raise AttributeError(name)
