"""Compare post-hoc calibrators on stored predictions: no model needed (except contextual calibration).

:func:`compare_methods` fits every named method on the calibration
predictions (or, for batch calibration, on the test predictions without their
labels), applies it to the test predictions and measures the result with
bootstrap intervals. :func:`compare_run` does the same for a finished run
directory and writes ``posthoc.json``, the plots, and ``report.md`` with a
self-contained ``report.html`` that open with the verdict
(:mod:`llmcal.report.posthocreport`).
"""
from __future__ import annotations

import functools
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ..errors import LlmcalError
from ..predictions import Prediction, load_predictions, stack_probs
from .methods import METHODS, resolve_methods

__all__ = ["MethodComparison", "Comparison", "PosthocReport", "calibrate_predictions", "compare_methods",
           "posthoc_split", "select_predictions", "compare_run", "CALIB_FILE", "DEFAULT_CALIB_FRACTION"]

log = logging.getLogger(__name__)

CALIB_FILE = "predictions-calib.jsonl"
DEFAULT_CALIB_FRACTION = 0.2
CI_METRICS = ("accuracy", "conf_ece", "cw_ece", "brier", "nll", "aurc")
SCALARS = ("accuracy", "conf_ece", "cw_ece", "em_ece", "brier", "nll", "aurc", "smece", "l2_ce_debiased",
           "acc_at_80", "acc_at_50", "mean_conf", "auroc", "mce")


@dataclass
class MethodComparison:
    """One method's numbers on the test predictions (``metrics`` is the full metrics dict)."""

    method: str
    label: str
    source: str
    fit_on: str
    n_test: int
    accuracy_change: float
    accuracy_change_ci: list[float] | None
    scores: dict[str, float]
    ci: dict[str, list[float] | None]
    params: dict
    metrics: dict
    risk_coverage: dict
    seconds: float
    predictions: list[Prediction] = field(default_factory=list, repr=False, compare=False)

    def __getattr__(self, name):  # row.accuracy, row.conf_ece, ... read from scores
        scores = self.__dict__.get("scores") or {}
        if name in scores:
            return scores[name]
        raise AttributeError(name)

    def to_dict(self) -> dict:
        return {"method": self.method, "label": self.label, "source": self.source, "fit_on": self.fit_on,
                "n_test": self.n_test, **self.scores, "accuracy_change": self.accuracy_change,
                "accuracy_change_ci": self.accuracy_change_ci, "ci": self.ci, "params": self.params,
                "seconds": self.seconds, "risk_coverage": self.risk_coverage, "metrics": self.metrics}


@dataclass
class Comparison:
    """Every method's :class:`MethodComparison` ("none" first) and the methods left out, with why."""

    rows: list[MethodComparison]
    skipped: dict[str, str]
    n_calib: int
    n_test: int
    n_bins: int
    n_bootstrap: int
    seed: int

    def row(self, method: str) -> MethodComparison:
        for r in self.rows:
            if r.method == method:
                return r
        raise LlmcalError(f"no result for method {method!r} (have {', '.join(r.method for r in self.rows)})")

    def to_dict(self) -> dict:
        return {"n_calib": self.n_calib, "n_test": self.n_test, "n_bins": self.n_bins,
                "n_bootstrap": self.n_bootstrap, "seed": self.seed, "skipped": self.skipped,
                "methods": [r.to_dict() for r in self.rows]}

    def table_markdown(self) -> str:
        """The comparison as a Markdown table: the report's methods table (3 significant digits, 95% intervals)."""
        from ..report.posthocreport import COLUMNS, comparison_rows
        from ..report.tables import SIG, markdown_table

        return markdown_table(comparison_rows(self), COLUMNS, sig=SIG)


@dataclass
class PosthocReport:
    """What :func:`compare_run` read, computed and wrote."""

    run: Path
    source: dict
    comparison: Comparison
    out_dir: Path
    files: dict[str, Path]
    verdict: object = None  # the report's llmcal.report.verdict.Verdict: which method to use, if any


# ---------------------------------------------------------------------------- applying one method

def _option_counts(preds: Sequence[Prediction]) -> set[int]:
    return {len(p.logits) for p in preds}


def _logits(preds: Sequence[Prediction]) -> list[np.ndarray]:
    return [np.asarray(p.logits, dtype=np.float64) for p in preds]


def calibrate_predictions(method: str, calib: Sequence[Prediction], test: Sequence[Prediction], *,
                          contextual_priors: Mapping[int, Sequence[float]] | None = None,
                          ) -> tuple[list[Prediction], dict]:
    """Fit ``method`` and apply it to ``test``: (calibrated test predictions, fitted parameters).

    Fitted on ``calib`` (logits and answers), except ``batch`` (fitted on the
    test logits, answers unused) and ``contextual`` (needs
    ``contextual_priors``, {K: prior}, from
    :func:`~llmcal.posthoc.content_free_distribution`). "none" returns ``test``.
    """
    if method not in METHODS:
        raise LlmcalError(f"unknown post-hoc method {method!r}; known: {', '.join(METHODS)}")
    info = METHODS[method]
    if not test:
        raise LlmcalError("no test predictions to calibrate")
    if info.factory is None:
        return list(test), {}
    if info.fit_on == "calib" and len(calib) < 2:
        raise LlmcalError(f"{info.label} needs calibration predictions (got {len(calib)})")
    if info.fixed_k:
        ks = _option_counts(calib) | _option_counts(test)
        if len(ks) > 1:
            raise LlmcalError(f"{info.label} needs the same number of options in every question, but the "
                              f"predictions mix K = {', '.join(map(str, sorted(ks)))}")
    if method == "contextual":
        if not contextual_priors:
            raise LlmcalError("contextual calibration needs the model's content-free prior: compute it with "
                              "llmcal.posthoc.content_free_distribution (llmcal calibrate loads the model for it)")
        cal = info.factory(contextual_priors).fit(_logits(test))
    elif info.fit_on == "test":
        cal = info.factory().fit(_logits(test))
    else:
        cal = info.factory().fit(_logits(calib), np.array([p.answer for p in calib], dtype=np.int64))
    z = cal.transform(_logits(test))
    out = [Prediction.from_logits(p.id, p.subject, p.answer, zi) for p, zi in zip(test, z)]
    return out, cal.params()


# ---------------------------------------------------------------------------- measuring

def _measure(method: str, preds: list[Prediction], base_probs: np.ndarray, answers: np.ndarray, *,
             n_bins: int, n_bootstrap: int, seed: int) -> tuple[dict, dict, dict, float, list | None, dict]:
    from ..metrics import (accuracy, aurc, bootstrap_ci, bootstrap_diff_ci, brier, classwise_ece, compute_metrics,
                           conf_ece, nll, risk_coverage_curve)

    probs, _ = stack_probs(preds)
    if probs.shape[1] < base_probs.shape[1]:  # a method never drops options, but keep the shapes paired
        probs = np.pad(probs, ((0, 0), (0, base_probs.shape[1] - probs.shape[1])))
    m = compute_metrics(probs, answers, n_bins=n_bins, n_bootstrap=0, seed=seed)
    scores = {k: m[k] for k in SCALARS}
    fns = {"accuracy": accuracy, "conf_ece": functools.partial(conf_ece, n_bins=n_bins),
           "cw_ece": functools.partial(classwise_ece, n_bins=n_bins), "brier": brier, "nll": nll, "aurc": aurc}
    if n_bootstrap > 0:
        ci = {k: list(bootstrap_ci(fn, probs, answers, n_resamples=n_bootstrap, seed=seed)) for k, fn in fns.items()}
        change_ci = (list(bootstrap_diff_ci(accuracy, base_probs, probs, answers, n_resamples=n_bootstrap,
                                            seed=seed)) if method != "none" else [0.0, 0.0])
    else:
        ci = {k: None for k in fns}
        change_ci = None
    m["ci"] = ci
    change = scores["accuracy"] - accuracy(base_probs, answers)
    return m, scores, ci, float(change), change_ci, risk_coverage_curve(probs, answers).to_dict()


def compare_methods(calib: Sequence[Prediction], test: Sequence[Prediction], methods: str | Sequence[str] = "all",
                    *, contextual_priors: Mapping[int, Sequence[float]] | None = None, n_bins: int = 10,
                    n_bootstrap: int = 1000, seed: int = 0) -> Comparison:
    """Fit each method, apply it to ``test`` and measure it; "none" (no calibration) is always the first row.

    ``methods``: names (a list or a comma-separated string) from
    :data:`~llmcal.posthoc.METHODS`, or "all". With "all", methods the inputs
    cannot serve are left out and listed in ``Comparison.skipped`` with the
    reason (matrix scaling on mixed K, contextual calibration without
    ``contextual_priors``, a fit that fails); a method named explicitly raises
    instead. Scores come from :func:`llmcal.metrics.compute_metrics` on the
    calibrated test predictions; ``ci`` holds 95% percentile bootstrap
    intervals of accuracy, conf-ECE, cw-ECE, Brier, NLL and AURC
    (``n_bootstrap`` resamples, ``seed``), and ``accuracy_change_ci`` a paired
    interval of the accuracy change (same resamples for both).
    """
    names, want_all = resolve_methods(methods)
    test = list(test)
    calib = list(calib)
    if not test:
        raise LlmcalError("no test predictions to compare methods on")
    base_probs, answers = stack_probs(test)
    rows: list[MethodComparison] = []
    skipped: dict[str, str] = {}
    for name in names:
        info = METHODS[name]
        if want_all and name == "contextual" and not contextual_priors:
            skipped[name] = "needs the model's content-free prior (not given)"
            continue
        t0 = time.perf_counter()
        try:
            preds, params = calibrate_predictions(name, calib, test, contextual_priors=contextual_priors)
        except LlmcalError as e:
            if not want_all:
                raise
            skipped[name] = str(e)
            log.info("post-hoc %s left out: %s", name, e)
            continue
        metrics, scores, ci, change, change_ci, rc = _measure(name, preds, base_probs, answers, n_bins=n_bins,
                                                              n_bootstrap=int(n_bootstrap), seed=seed)
        rows.append(MethodComparison(
            method=name, label=info.label, source=info.source,
            fit_on={"calib": "calibration split", "test": "test (no labels)", "model": "model (content-free)",
                    "-": "-"}[info.fit_on],
            n_test=len(test), accuracy_change=change, accuracy_change_ci=change_ci, scores=scores, ci=ci,
            params=params, metrics=metrics, risk_coverage=rc, seconds=time.perf_counter() - t0, predictions=preds))
    return Comparison(rows=rows, skipped=skipped, n_calib=len(calib), n_test=len(test), n_bins=int(n_bins),
                      n_bootstrap=int(n_bootstrap), seed=int(seed))


# ---------------------------------------------------------------------------- a finished run

def posthoc_split(preds: Sequence[Prediction], seed: int, calib_fraction: float = DEFAULT_CALIB_FRACTION,
                  ) -> tuple[list[Prediction], list[Prediction]]:
    """(calibration slice, test part) of one predictions list: llmcal's held-out slice.

    The calibration slice is ``llmcal.data.splits.split_heldout(preds,
    calib_fraction, seed)``'s held-out side (``hash_unit(id, seed) >= 1 -
    calib_fraction``), the same questions ``llmcal calibrate --method ts`` fits
    its temperature on for the same data and seed.  Named splits (``--split
    test``) hash with another key, so a run on a named split still holds about
    ``calib_fraction`` of calibration questions.  Deterministic, independent of row order.
    """
    from ..data.splits import split_heldout

    f = float(calib_fraction)
    if not (math.isfinite(f) and 0.0 < f < 1.0):
        raise LlmcalError(f"calib fraction must be between 0 and 1 (exclusive), got {calib_fraction!r}")
    test, calib = split_heldout(list(preds), f, int(seed))
    return list(calib), list(test)


def select_predictions(run_dir: str | Path, *, calib_fraction: float = DEFAULT_CALIB_FRACTION,
                       result: str | None = None) -> tuple[list[Prediction], list[Prediction], dict]:
    """The calibration and test predictions of a finished run, and a record of how they were chosen.

    Test: the predictions file of the run's result labelled ``result`` (default:
    the first result whose method is "none", else the first result). Calibration:
    ``predictions-calib.jsonl`` when the run has one (``llmcal calibrate`` and
    study TS cells write it); otherwise the test file is split by
    :func:`posthoc_split` with the run's seed (config.json) and ``calib_fraction``.
    """
    from ..runs import load_run

    run = Path(run_dir)
    rec = load_run(run)
    if not rec.results:
        raise LlmcalError(f"{run}: the run has no results")
    if result is not None:
        chosen = [r for r in rec.results if r.label == result]
        if not chosen:
            raise LlmcalError(f"{run}: no result labelled {result!r} (have {', '.join(r.label for r in rec.results)})")
        res = chosen[0]
    else:
        res = next((r for r in rec.results if r.method == "none"), rec.results[0])
    test_file = run / res.predictions
    preds = load_predictions(test_file)
    seed = int(rec.config.get("seed") or 0)
    source = {"run": str(run), "result": res.label, "dataset": res.dataset, "test_file": res.predictions,
              "model": rec.model, "template": rec.meta.get("template", rec.config.get("template")), "seed": seed}
    if (run / CALIB_FILE).exists():
        calib = load_predictions(run / CALIB_FILE)
        test = preds
        source.update(calib_file=CALIB_FILE, split="the run's own calibration split")
    else:
        calib, test = posthoc_split(preds, seed, calib_fraction)
        source.update(calib_file=None, calib_fraction=float(calib_fraction),
                      split=f"{res.predictions} split by the held-out rule hash_unit(id, seed) >= "
                            f"{1 - calib_fraction:g} (seed {seed})")
    if len(calib) < 2 or not test:
        raise LlmcalError(f"{run}: {len(calib)} calibration and {len(test)} test predictions; need at least 2 and 1 "
                          f"(use a larger run or change the calib fraction)")
    return calib, test, source


def compare_run(run_dir: str | Path, methods: str | Sequence[str] = "all", out_dir: str | Path | None = None, *,
                calib_fraction: float = DEFAULT_CALIB_FRACTION,
                contextual_priors: Mapping[int, Sequence[float]] | None = None, result: str | None = None,
                n_bins: int | None = None, n_bootstrap: int | None = None, seed: int | None = None,
                ) -> PosthocReport:
    """Compare ``methods`` on a finished run's stored predictions and write the comparison.

    Predictions are chosen by :func:`select_predictions`; ``n_bins``,
    ``n_bootstrap`` and ``seed`` default to the run's config (10, 1000, 0 when
    absent). Writes into ``out_dir`` (default ``RUN_DIR/posthoc``; not a run
    directory, whose own report it would replace), atomically:
    ``posthoc.json`` (everything, predictions aside), ``reliability-grid.png``
    (one panel per method), ``risk-coverage.png``, and the report
    (:mod:`llmcal.report.posthocreport`): ``report.md`` and a self-contained
    ``report.html`` opening with the verdict (which method to use, among those
    that keep accuracy), ``verdict-pareto.png`` and ``verdict-reliability.png``.
    """
    from ..io import atomic_write_json
    from ..report.plots import method_reliability_grid, risk_coverage_plot
    from ..report.posthocreport import (RELIABILITY_GRID_PNG, RISK_COVERAGE_PNG, posthoc_verdict,
                                          write_posthoc_report)
    from ..runs import CONFIG, load_run

    run = Path(run_dir)
    out = Path(out_dir) if out_dir is not None else run / "posthoc"
    if (out / CONFIG).exists():
        raise LlmcalError(f"{out}: a run directory (it has {CONFIG}); the comparison's report.md would replace the "
                          f"run's own: write it elsewhere (the default is RUN_DIR/posthoc)")
    calib, test, source = select_predictions(run, calib_fraction=calib_fraction, result=result)
    cfg = load_run(run).config
    n_bins = int(n_bins if n_bins is not None else cfg.get("n_bins") or 10)
    n_bootstrap = int(n_bootstrap if n_bootstrap is not None else cfg.get("n_bootstrap") or 1000)
    seed = int(seed if seed is not None else source["seed"])
    t0 = time.perf_counter()
    comp = compare_methods(calib, test, methods, contextual_priors=contextual_priors, n_bins=n_bins,
                           n_bootstrap=n_bootstrap, seed=seed)
    title = f"{source['dataset']}: n={comp.n_test}"
    files = {
        "json": atomic_write_json(out / "posthoc.json", {"source": source, **comp.to_dict(),
                                                         "seconds": time.perf_counter() - t0}),
        "grid": method_reliability_grid([(r.method, r.metrics, None if r.method == "none" else r.accuracy_change)
                                         for r in comp.rows], out / RELIABILITY_GRID_PNG, title=title),
        "risk_coverage": risk_coverage_plot([(r.method, r.risk_coverage) for r in comp.rows],
                                            out / RISK_COVERAGE_PNG, title=title),
    }
    verdict = posthoc_verdict(comp, scope=str(source.get("dataset") or ""))
    files.update(write_posthoc_report(comp, source, out, verdict))
    return PosthocReport(run=run, source=source, comparison=comp, out_dir=out, files=files, verdict=verdict)
