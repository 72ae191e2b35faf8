"""The post-hoc methods by name: what ``--method`` accepts and what each needs."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from ..errors import LlmcalError
from .label_free import BatchCalibrator, ContextualCalibrator
from .scaling import BiasCorrector, MatrixScaler, VectorScaler
from .temperature import TemperatureScaler
from .topconf import HistogramBinning, IsotonicCalibrator, PlattScaler

__all__ = ["MethodInfo", "METHODS", "resolve_methods"]


@dataclass(frozen=True)
class MethodInfo:
    """One post-hoc method: its name, a label for tables, its source and how it is fitted.

    ``fit_on``: "calib" (fitted on the labelled calibration split), "test"
    (label-free, fitted on the test questions themselves, answers unused),
    "model" (needs the model's content-free prior), or "-" (no calibration).
    """

    name: str
    label: str
    source: str
    fit_on: str
    fixed_k: bool
    changes_argmax: bool
    factory: Callable[..., object] | None


METHODS: dict[str, MethodInfo] = {m.name: m for m in (
    MethodInfo("none", "none", "-", "-", False, False, None),
    MethodInfo("ts", "temperature scaling", "Guo et al. 2017", "calib", False, False, TemperatureScaler),
    MethodInfo("vector", "vector scaling", "Guo et al. 2017", "calib", False, True, VectorScaler),
    MethodInfo("matrix", "matrix scaling (ODIR)", "Guo et al. 2017; Kull et al. 2019", "calib", True, True,
               MatrixScaler),
    MethodInfo("bias", "bias-only (letter prior)", "Guo et al. 2017; Zhao et al. 2021", "calib", False, True,
               BiasCorrector),
    MethodInfo("contextual", "contextual calibration", "Zhao et al. 2021", "model", False, True,
               ContextualCalibrator),
    MethodInfo("batch", "batch calibration", "Zhou et al. 2024", "test", False, True, BatchCalibrator),
    MethodInfo("platt", "Platt scaling (top conf.)", "Platt 1999", "calib", False, False, PlattScaler),
    MethodInfo("isotonic", "isotonic regression (top conf.)", "Zadrozny & Elkan 2002", "calib", False, False,
               IsotonicCalibrator),
    MethodInfo("histogram", "histogram binning (top conf.)", "Zadrozny & Elkan 2001", "calib", False, False,
               HistogramBinning),
)}


def resolve_methods(methods: str | Sequence[str]) -> tuple[list[str], bool]:
    """Method names in registry order, "none" first; and whether "all" was asked for.

    ``methods`` is a comma-separated string or a list of names; "all" means
    every method (the caller drops the ones the data or the inputs cannot
    serve). An unknown name is an error listing the known ones.
    """
    items = methods.split(",") if isinstance(methods, str) else list(methods)
    names = [str(m).strip().lower() for m in items if str(m).strip()]
    if not names:
        raise LlmcalError(f"no post-hoc method given; choose from {', '.join(METHODS)} or all")
    unknown = [n for n in names if n != "all" and n not in METHODS]
    if unknown:
        raise LlmcalError(f"unknown post-hoc method{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                          f"known: {', '.join(METHODS)}, all")
    want_all = "all" in names
    chosen = set(METHODS) if want_all else set(names) | {"none"}
    return [n for n in METHODS if n in chosen], want_all
