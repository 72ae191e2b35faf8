"""The report of a post-hoc comparison (``llmcal calibrate --from RUN --method ...``): ``report.md`` and a
self-contained ``report.html``, through the one report engine.

It opens with the verdict (``verdict.py``): how miscalibrated the uncalibrated predictions are, and which
post-hoc method to use among those whose paired accuracy change keeps accuracy, with what it buys (conf-ECE
before and after, with intervals); the Pareto plot of accuracy against conf-ECE in the box and the
before/after reliability diagram beside it.  Then where the predictions came from (the model named once), the
table of every method (3 significant digits, 95% intervals), the methods left out and why, one reliability
diagram per method and the risk-coverage curves.

The input is a :class:`llmcal.posthoc.compare.Comparison` (read by attribute, so this module does not import
the post-hoc package) and the ``source`` record of :func:`llmcal.posthoc.compare.select_predictions`.
"""
from __future__ import annotations

from pathlib import Path

from ..io import atomic_write_text
from .engine import Document
from .runreport import REPORT, REPORT_HTML, VERDICT_PARETO_PNG, VERDICT_RELIABILITY_PNG
from .tables import md_text

RELIABILITY_GRID_PNG = "reliability-grid.png"
RISK_COVERAGE_PNG = "risk-coverage.png"

# The methods table: a row key or (key, header); a key with ``<key>_ci`` in the row gets its interval.
COLUMNS = ["method", ("fit_on", "fit on"), "accuracy", "accuracy_change", "conf_ece", "cw_ece", "brier", "nll",
           "aurc", ("smece", "smECE"), "acc_at_80", "acc_at_50"]
CI_COLUMNS = ("accuracy", "conf_ece", "cw_ece", "brier", "nll", "aurc")

DEFINITIONS = (
    "Every method is fitted on the calibration predictions (batch calibration: on the test predictions, answers "
    "unused) and measured on the test predictions; *Δ acc* is the method's accuracy minus the uncalibrated one "
    "on the same questions. Intervals: 95% percentile bootstrap (Δ acc: paired, the same resamples for both). "
    "*conf-ECE*, *cw-ECE*: equal-width confidence bins; *smECE*: smooth ECE; *AURC*: area under the "
    "risk-coverage curve; *acc@X%*: accuracy on the X% most confident questions. Numbers to 3 significant "
    "digits. Formulas and sources: docs/posthoc.md.")


def comparison_rows(comparison) -> list[dict]:
    """One flat row per method for ``tables.markdown_table``/``html_table`` (values and their ``_ci``)."""
    rows = []
    for r in comparison.rows:
        row = {"method": r.method, "fit_on": r.fit_on, **r.scores, "accuracy_change": r.accuracy_change,
               "accuracy_change_ci": None if r.method == "none" else r.accuracy_change_ci}
        if r.method == "none":
            row["accuracy_change"] = None  # the reference itself: no change to show
        row.update({f"{k}_ci": r.ci.get(k) for k in CI_COLUMNS})
        rows.append(row)
    return rows


def posthoc_verdict(comparison, scope: str = ""):
    """The :class:`~llmcal.report.verdict.Verdict` of a comparison: the "none" row is the base, every other
    method an option; the pick follows ``verdict.decide``'s rule (never a method that costs accuracy)."""
    from .verdict import Option, decide, gap_interval

    def option(r) -> Option:
        return Option(label=r.method, kind=r.method, n=r.n_test, accuracy=r.scores.get("accuracy"),
                      accuracy_ci=_pair(r.ci.get("accuracy")), conf_ece=r.scores.get("conf_ece"),
                      conf_ece_ci=_pair(r.ci.get("conf_ece")), mean_conf=r.scores.get("mean_conf"),
                      accuracy_change=r.accuracy_change, accuracy_change_ci=_pair(r.accuracy_change_ci),
                      metrics=r.metrics)

    base_row = comparison.row("none")
    gap_ci = None
    if base_row.predictions and comparison.n_bootstrap > 0:
        from ..predictions import stack_probs

        probs, answers = stack_probs(base_row.predictions)
        gap_ci = gap_interval(probs, answers, n_bootstrap=min(comparison.n_bootstrap, 1000), seed=comparison.seed)
    return decide(scope, option(base_row), [option(r) for r in comparison.rows if r is not base_row], gap_ci)


def _pair(ci):
    return tuple(ci) if isinstance(ci, (list, tuple)) and len(ci) == 2 and None not in ci else None


def write_posthoc_report(comparison, source: dict, out_dir: str | Path, verdict=None) -> dict[str, Path]:
    """Write ``report.md``, ``report.html`` and the verdict's two plots into ``out_dir``, which already holds
    ``reliability-grid.png`` and ``risk-coverage.png`` (``compare_run`` draws them).  ``verdict``: the
    comparison's :func:`posthoc_verdict` when the caller has it.  Returns the paths: ``markdown``, ``html``,
    ``pareto`` and ``reliability`` (the last two absent without the numbers to draw them)."""
    from .plots import pareto_plot, reliability_grid
    from .verdict import RULE_TEXT, advice_text, confidence_text

    out = Path(out_dir)
    dataset = str(source.get("dataset") or "")
    verdict = verdict if verdict is not None else posthoc_verdict(comparison, scope=dataset)
    written: dict[str, Path] = {}

    for old in (VERDICT_PARETO_PNG, VERDICT_RELIABILITY_PNG):  # a rerun with other methods draws them anew
        (out / old).unlink(missing_ok=True)
    run_path = Path(str(source.get("run") or "run"))
    # the run's directory and its parent (a study's runs/MODEL/CELL): a name, never the machine's path
    run_name = "/".join(part for part in (run_path.parent.name, run_path.name) if part)
    doc = Document(out, f"llmcal post-hoc calibration of {run_name}")
    doc.h(1, f"Post-hoc calibration of `{run_name.replace('`', chr(39))}`")
    inner, side = [], []
    if verdict.options and verdict.base.accuracy is not None and verdict.base.conf_ece is not None:
        written["pareto"] = pareto_plot([verdict], out / VERDICT_PARETO_PNG)
        inner.append((VERDICT_PARETO_PNG, "accuracy against conf-ECE: the Pareto front", RULE_TEXT))
    if (verdict.base.metrics or {}).get("reliability"):
        cells = [("before: none", verdict.base.metrics)]
        if verdict.pick is not None and (verdict.pick.metrics or {}).get("reliability"):
            cells.append((f"after: {verdict.pick.label}", verdict.pick.metrics))
        written["reliability"] = reliability_grid(None, out / VERDICT_RELIABILITY_PNG, grid=[cells])
        side.append((VERDICT_RELIABILITY_PNG, "reliability diagram before and after",
                     ("Before and after the pick" if len(cells) > 1 else "The predictions as they are")
                     + ": bars are per-bin accuracy, the dashed line perfect calibration, red over- and green "
                     "underconfidence."))
    doc.verdict("Verdict", [confidence_text(verdict) + " " + advice_text(verdict)], side=side, inner=inner)

    where = [f"**model**: {md_text(source.get('model'))}",
             f"**data**: {md_text(dataset)}, {comparison.n_test} test predictions "
             f"(`{md_text(source.get('test_file'))}`)",
             f"**calibration**: {comparison.n_calib} predictions ({md_text(source.get('split'))})",
             f"**intervals**: {comparison.n_bootstrap} bootstrap resamples, seed {comparison.seed}; "
             f"{comparison.n_bins} confidence bins"]
    if source.get("template"):
        where.insert(1, f"**template**: {md_text(source['template'])}")
    doc.ul(where)

    doc.h(2, "Methods")
    doc.table(comparison_rows(comparison), COLUMNS)
    if comparison.skipped:
        doc.p("Left out:")
        doc.ul([f"**{md_text(k)}**: {md_text(v)}" for k, v in comparison.skipped.items()])
    doc.h(2, "Reliability per method")
    doc.img(RELIABILITY_GRID_PNG, "reliability per method",
            "One diagram per method on the test predictions, with its accuracy change.")
    doc.h(2, "Selective prediction")
    doc.img(RISK_COVERAGE_PNG, "risk-coverage curves",
            "Error rate on the answered questions when the least confident are left out, per method.")
    doc.h(2, "Definitions")
    doc.p(DEFINITIONS)
    written["html"] = atomic_write_text(out / REPORT_HTML, doc.html())
    written["markdown"] = atomic_write_text(out / REPORT, doc.markdown())
    return written
