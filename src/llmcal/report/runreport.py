"""Reports: ``report.md`` and a self-contained ``report.html`` for one run, and a comparison of several runs.

Both are :class:`~llmcal.report.engine.Document` s rendered by the shared templates.  A run report opens with
the verdict (``verdict.py``: over- or underconfident by how much, which method to use among those that keep
accuracy, the Pareto front of accuracy against conf-ECE and the before/after reliability diagram), then
the header, the results table and the run's sections.

``write_run_report`` works from the run's config and results in memory, so a run can write its report
before ``metrics.json`` (its last file).  The comparison reads finished runs back with ``load_run``.
"""
from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Sequence

from ..errors import LlmcalError
from ..io import atomic_write_text
from ..runs import CONFIG, RunRecord, RunResult, load_run, main_label
from .engine import Document
from .plots import reliability_grid, save_reliability
from .tables import extra_columns, format_value, md_text, result_row, results_rows, run_names

REPORT = "report.md"
REPORT_HTML = "report.html"
RISK_COVERAGE_PNG = "risk-coverage.png"
VERDICT_PARETO_PNG = "verdict-pareto.png"
VERDICT_RELIABILITY_PNG = "verdict-reliability.png"

log = logging.getLogger(__name__)

# Per-subject tables longer than this show only the best and worst SUBJECTS_SHOWN.
SUBJECTS_MAX = 20
SUBJECTS_SHOWN = 10

COMPARISON_COLUMNS = ["run", "method", "dataset", "split", "n", "accuracy", "conf_ece", "cw_ece", "brier", "nll"]

DEFINITIONS = (
    "**Metrics.** The model's distribution over the options is the softmax of the option-letter logits; "
    "prediction = argmax, confidence = max probability. *accuracy*: fraction of questions answered correctly. "
    "*conf-ECE*: questions are put in M equal-width confidence bins; "
    "ECE = Σ_m |B_m|/N · |acc(B_m) − conf(B_m)|. "
    "*cw-ECE*: the same per option position k on p_k against 1{y=k}, averaged over the K positions. "
    "*Brier*: squared error summed over options, averaged over questions. *NLL*: mean −log p(answer). "
    "*mean conf*: average confidence; mean conf > accuracy means overconfident. "
    "Intervals are 95% bootstrap intervals. In a reliability diagram, bars are per-bin accuracy, the dashed "
    "line is perfect calibration, and the shaded gap up to each bin's mean confidence is over- (red) or "
    "under-confidence (green). Numbers are shown to 3 significant digits."
)


# ---- one run -------------------------------------------------------------------
def write_run_report(run_dir: str | os.PathLike, config: dict, results: Sequence[RunResult | dict],
                     meta: dict | None = None, sections: Sequence = ()) -> Path:
    """Write ``RUN/report.md`` and ``RUN/report.html``: the verdict, header, results table, the run's sections,
    per-subject tables, diagrams, definitions.  Returns the path of ``report.md``.

    ``sections``: objects with ``title`` and ``body`` (Markdown), e.g. ``llmcal.pipeline.Section``.

    Needs only the run's config and results, not ``metrics.json``. Result
    reliability paths are taken relative to ``run_dir``.
    """
    run_dir = Path(run_dir)
    meta = meta or {}
    if "created" not in config:  # RunDir.start stamps it into config.json, not into the caller's dict
        config = {**config, "created": _created(run_dir)}
    results = [RunResult(**r) if isinstance(r, dict) else r for r in results]
    rows = [{**result_row(r, run=run_dir.name), **coverage_columns(r)} for r in results]
    preds = _Predictions(run_dir)

    name = run_dir.name.replace("`", "'")  # a code span: a backtick would end it
    doc = Document(run_dir, f"llmcal run {run_dir.name}")
    doc.h(1, f"llmcal run `{name}`")
    _run_verdict(doc, run_dir, config, results, preds)

    data = _first(config, "data", "dataset", "datasets")
    if data is not None:
        selection = {k: config.get(k) for k in ("split", "subjects", "limit", "seed") if config.get(k) is not None}
        data = f"{_inline(data)} ({_inline(selection)})" if selection else _inline(data)
    template = config.get("template")
    if meta.get("template") and meta["template"] != template:
        template = f"{template} (resolved: {meta['template']})" if template else meta["template"]
    header = {
        "model": _first(config, "model", "base_model") or meta.get("model"),
        "kind": _first(config, "kind", "command") or meta.get("kind"),
        "data": data,
        "template": template,
        "created": config.get("created"),
    }
    items = [f"**{key}**: {md_text(_inline(value))}" for key, value in header.items()
             if value not in (None, "", [], {})]
    items += [f"**{key}**: {md_text(_inline(value))}" for key, value in meta.items()
              if key not in header and isinstance(value, (str, int, float, bool))]
    doc.ul(items)

    doc.h(2, "Results")
    if rows:
        doc.table(rows, _with_extras(["method", "dataset", "split", "n", "accuracy", "conf_ece", "cw_ece", "brier",
                                      "nll", "mean_conf"], rows))
    else:
        doc.p("No results.")

    letter_coverage_section(doc, results)
    selective_section(doc, run_dir, results, preds)

    for sec in sections:
        doc.h(2, sec.title)
        doc.markdown_section(sec.body)

    for res in results:
        if len(res.metrics.get("per_subject") or {}) >= 2:
            doc.h(2, f"Per subject: {md_text(res.label)}")
            per_subject_section(doc, res.metrics["per_subject"])

    pictures = [(r.label, _relative(r.reliability, run_dir)) for r in results if r.reliability]
    if pictures:
        doc.h(2, "Reliability diagrams")
        doc.figures([(rel, f"reliability diagram: {md_text(label)}", md_text(label)) for label, rel in pictures])

    doc.h(2, "Definitions")
    doc.p(DEFINITIONS)
    atomic_write_text(run_dir / REPORT_HTML, doc.html())
    return atomic_write_text(run_dir / REPORT, doc.markdown())


class _Predictions:
    """A run's predictions files, each read once: ``get(result)`` is (ids, probs, answers) or None."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.cache: dict[Path, tuple | None] = {}

    def path(self, r: RunResult) -> Path | None:
        return self.run_dir / _relative(r.predictions, self.run_dir) if r.predictions else None

    def get(self, r: RunResult):
        from ..predictions import load_predictions, stack_probs

        path = self.path(r)
        if path is None:
            return None
        if path not in self.cache:
            self.cache[path] = None
            if path.is_file():
                try:
                    loaded = load_predictions(path)
                    probs, answers = stack_probs(loaded)
                    self.cache[path] = ([p.id for p in loaded], probs, answers)
                except LlmcalError as e:  # an unreadable file costs the numbers drawn from it, not the report
                    log.warning("%s: not read for the report (%s)", path, e)
        return self.cache[path]


def _option(r: RunResult, base: RunResult | None, preds: _Predictions, n_bootstrap: int, seed: int):
    """A result as a verdict Option; its accuracy change against ``base`` paired by question id."""
    from .verdict import Option

    m = r.metrics or {}
    ci = m.get("ci") or {}
    change, change_ci = None, None
    if base is not None:
        if base is r:
            change, change_ci = 0.0, (0.0, 0.0)
        else:
            change, change_ci = _paired_change(preds.get(base), preds.get(r), n_bootstrap, seed)
            if change is None and m.get("n") == (base.metrics or {}).get("n") and None not in (
                    m.get("accuracy"), (base.metrics or {}).get("accuracy")):
                change = m["accuracy"] - base.metrics["accuracy"]
    return Option(label=r.label, kind=r.method, n=m.get("n"), accuracy=m.get("accuracy"),
                  accuracy_ci=_pair(ci.get("accuracy")), conf_ece=m.get("conf_ece"),
                  conf_ece_ci=_pair(ci.get("conf_ece")), mean_conf=m.get("mean_conf"), accuracy_change=change,
                  accuracy_change_ci=change_ci, metrics=m)


def _pair(ci):
    return tuple(ci) if isinstance(ci, (list, tuple)) and len(ci) == 2 and None not in ci else None


def _paired_change(before, after, n_bootstrap: int, seed: int):
    """Accuracy change after − before on the same questions (matched by id) with its paired interval."""
    import numpy as np

    from ..metrics import accuracy, bootstrap_diff_ci

    if before is None or after is None:
        return None, None
    ids_b, pb, ab = before
    ids_a, pa, aa = after
    index = {q: i for i, q in enumerate(ids_b)}
    if len(index) != len(ids_a) or any(q not in index for q in ids_a) or pb.shape[1:] != pa.shape[1:]:
        return None, None
    order = np.array([index[q] for q in ids_a])
    if not np.array_equal(ab[order], aa):
        return None, None
    pb = pb[order]
    change = accuracy(pa, aa) - accuracy(pb, aa)
    if n_bootstrap < 1:
        return change, None
    return change, tuple(bootstrap_diff_ci(accuracy, pb, pa, aa, n_resamples=n_bootstrap, seed=seed))


def _run_verdict(doc: Document, run_dir: Path, config: dict, results: Sequence[RunResult],
                 preds: _Predictions) -> None:
    """The verdict box: per dataset, the uncalibrated result's confidence and the method to use."""
    from .plots import pareto_plot
    from .verdict import RULE_TEXT, advice_text, confidence_text

    for old in (VERDICT_PARETO_PNG, VERDICT_RELIABILITY_PNG):
        (run_dir / old).unlink(missing_ok=True)
    if not results:
        return
    n_bootstrap = min(int(config.get("n_bootstrap") or 1000), 1000)
    seed = int(config.get("seed") or 0)
    main = main_label(config)
    groups: dict[tuple, list[RunResult]] = {}
    for r in results:
        groups.setdefault((r.dataset, r.split), []).append(r)
    keys = sorted(groups, key=lambda k: not any(r.label == main for r in groups[k]))
    verdicts = []
    for key in keys:
        members = groups[key]
        base = next((r for r in members if r.label == "none"), None)
        if base is None:  # nothing to compare with: each result's confidence on its own
            named = len(groups) > 1 or len(members) > 1
            verdicts += [_decide_one(r, None, [], preds, n_bootstrap, seed, named) for r in members]
            continue
        verdicts.append(_decide_one(base, base, [r for r in members if r is not base], preds, n_bootstrap, seed,
                                    len(groups) > 1))
    lines = [(f"**{md_text(v.scope)}**: " if v.scope else "") + confidence_text(v) + " " + advice_text(v)
             for v in verdicts]
    inner, side = [], []
    if any(v.options for v in verdicts):
        with_options = [v for v in verdicts if v.options]
        pareto_plot(with_options, run_dir / VERDICT_PARETO_PNG)
        inner.append((VERDICT_PARETO_PNG, "accuracy against conf-ECE: the Pareto front", RULE_TEXT))
    first = verdicts[0]
    if first.base.metrics and first.base.metrics.get("reliability"):
        cells = [(f"before: {first.base.label}", first.base.metrics)]
        if first.pick is not None and (first.pick.metrics or {}).get("reliability"):
            cells.append((f"after: {first.pick.label}", first.pick.metrics))
        reliability_grid(None, run_dir / VERDICT_RELIABILITY_PNG, grid=[cells])
        side.append((VERDICT_RELIABILITY_PNG, "reliability diagram before and after",
                     ("Before and after the pick" if len(cells) > 1 else "The model as it is")
                     + (f" ({md_text(first.scope)})" if first.scope else "") + ": bars are per-bin accuracy, "
                     "the dashed line perfect calibration, red over- and green underconfidence."))
    doc.verdict("Verdict", lines, side=side, inner=inner)


def _decide_one(r: RunResult, base: RunResult | None, others: list[RunResult], preds: _Predictions,
                n_bootstrap: int, seed: int, named: bool):
    from .verdict import decide, gap_interval

    got = preds.get(r)
    gap_ci = gap_interval(got[1], got[2], n_bootstrap=n_bootstrap, seed=seed) if got is not None else None
    scope = ""
    if named:
        scope = r.dataset + (f" ({r.split})" if r.split not in (None, "", "all") else "")
        if base is None:
            scope = f"{r.label}, {scope}"
    return decide(scope, _option(r, base, preds, n_bootstrap, seed),
                  [_option(o, base, preds, n_bootstrap, seed) for o in others], gap_ci)


LETTER_COVERAGE_TEXT = (
    "A served model returns only its top-N log-probabilities for the first answer token. *letter mass* is the "
    "probability the option letters carried among them (mean and minimum over questions); *missing_share* is the "
    "share of questions where some option letter was not among them (such a letter gets an upper bound of its "
    "log-probability, so the model's confidence is if anything understated); *none_found_share*: no letter at all (a "
    "uniform distribution). Every metric above is computed from these renormalised option distributions; "
    "a low letter mass means the model mostly wanted to answer something other than a letter.")


def coverage_columns(result: RunResult) -> dict:
    """The results table's letter-coverage columns of a served model's result (none for a local model)."""
    cov = (result.metrics or {}).get("letter_coverage")
    if not cov:
        return {}
    return {"letter_mass": cov.get("mean_letter_mass"), "min_letter_mass": cov.get("min_letter_mass"),
            "missing_share": cov.get("missing_share")}


def letter_coverage_section(doc: Document, results: Sequence[RunResult]) -> None:
    """The report's "Letter coverage" section for a served model's results (nothing for a local model)."""
    rows = []
    for r in results:
        cov = (r.metrics or {}).get("letter_coverage")
        if cov:
            rows.append({"result": r.label, "dataset": r.dataset, "n": cov.get("n"),
                         "letter_mass": cov.get("mean_letter_mass"), "min_letter_mass": cov.get("min_letter_mass"),
                         "missing_share": cov.get("missing_share"), "none_found_share": cov.get("none_found_share"),
                         "missing_letters": cov.get("missing_letters")})
    if not rows:
        return
    doc.h(2, "Letter coverage")
    doc.p(LETTER_COVERAGE_TEXT)
    doc.table(rows, ["result", "dataset", "n", "letter_mass", "min_letter_mass", "missing_share",
                     "none_found_share", "missing_letters"])


SELECTIVE_TEXT = (
    "Answering only the most confident questions: *AURC* is the area under the risk-coverage curve, "
    "(1/N) Σ_k (errors among the k most confident)/k, lower is better (Geifman et al. 2019); *acc@80%* and "
    "*acc@50%* are the accuracy on the 80% and 50% most confident questions (ties: expected over their order). "
    "A confidence that ranks right answers above wrong ones gives a curve that rises late.")


def selective_section(doc: Document, run_dir: Path, results: Sequence[RunResult],
                      preds: _Predictions | None = None) -> None:
    """The report's "Selective prediction" section: AURC and accuracy at 80% / 50% coverage per result, and
    ``RUN/risk-coverage.png`` with one curve per result.

    Numbers come from the result's metrics; the curves (and the numbers of a
    run recorded before llmcal computed them) from its predictions file. A
    result whose file is missing keeps its numbers and has no curve. Nothing
    when no result has either.
    """
    from ..metrics import risk_coverage_curve, selective_accuracy

    preds = preds or _Predictions(run_dir)
    labels = [r.label for r in results]
    curves_of: dict[Path, object] = {}
    rows, curves = [], []
    for r in results:
        m = r.metrics or {}
        name = r.label if labels.count(r.label) == 1 else f"{r.label} ({r.dataset})"
        ci = m.get("ci") or {}
        row = {"result": name, "dataset": r.dataset, "n": m.get("n"), "accuracy": m.get("accuracy"),
               "accuracy_ci": ci.get("accuracy"), "aurc": m.get("aurc"), "aurc_ci": ci.get("aurc"),
               "acc_at_80": m.get("acc_at_80"), "acc_at_50": m.get("acc_at_50")}
        got = preds.get(r)
        if got is not None:
            _, probs, answers = got
            path = preds.path(r)
            if path not in curves_of:
                curves_of[path] = risk_coverage_curve(probs, answers)
            curve = curves_of[path]
            if row["aurc"] is None:
                row.update(aurc=curve.aurc, acc_at_80=selective_accuracy(probs, answers, 0.8),
                           acc_at_50=selective_accuracy(probs, answers, 0.5))
            curves.append((name, curve.to_dict()))
        if row["aurc"] is not None:
            rows.append(row)
    if not rows:
        return
    doc.h(2, "Selective prediction")
    doc.p(SELECTIVE_TEXT)
    doc.table(rows, ["result", "dataset", "n", "accuracy", "aurc", "acc_at_80", "acc_at_50"])
    if curves:
        from .plots import risk_coverage_plot

        risk_coverage_plot(curves, run_dir / RISK_COVERAGE_PNG, title=f"{run_dir.name}: risk-coverage")
        doc.img(RISK_COVERAGE_PNG, "risk-coverage curves")


def per_subject_section(doc: Document, per_subject: dict) -> None:
    """Subjects by accuracy (best first); with many subjects, the best and the worst only.

    Nothing when there are fewer than two subjects (the results table says it all).
    """
    if len(per_subject) < 2:
        return
    rows = [{"subject": str(s), **{k: v.get(k) for k in ("n", "accuracy", "conf_ece")}}
            for s, v in per_subject.items()]
    rows.sort(key=lambda r: (-(r["accuracy"] if r["accuracy"] is not None else -1.0), r["subject"]))
    cols = ["subject", "n", "accuracy", "conf_ece"]
    if len(rows) <= SUBJECTS_MAX:
        doc.table(rows, cols)
        return
    k = SUBJECTS_SHOWN
    doc.p(f"{len(rows)} subjects; the {k} with the highest and the {k} with the lowest accuracy.")
    doc.p("Highest:")
    doc.table(rows[:k], cols)
    doc.p("Lowest:")
    doc.table(rows[-k:], cols)


# ---- several runs ------------------------------------------------------------
def write_comparison(run_dirs: Sequence[str | os.PathLike], out_dir: str | os.PathLike) -> dict[str, Path]:
    """Compare finished runs: ``report.md``, ``reliability_grid.png`` and a self-contained ``report.html``.

    The table has one row per run and evaluated split (accuracy, conf-ECE,
    cw-ECE, Brier, NLL, with intervals); then every result's reliability
    diagram (the run's own PNG where it has one, otherwise drawn from its
    metrics into ``out_dir``). The HTML page embeds all images as data URIs
    and needs nothing else. Returns the written paths: ``md``, ``html``, ``grid``
    (when any result has reliability data) and ``diagram:<file>`` for each
    diagram drawn here.
    """
    if not run_dirs:
        raise LlmcalError("comparison: no run directories given")
    records: list[RunRecord] = []
    for d in run_dirs:
        p = Path(d)
        if not p.exists():
            raise LlmcalError(f"{p}: no such run directory")
        records.append(load_run(p))  # raises LlmcalError naming the path when incomplete
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}

    rows = results_rows(records)
    columns = _with_extras(COMPARISON_COLUMNS, rows)
    names = run_names([r.path for r in records])

    cells = [(f"{row['run']} · {row['label']}", res.metrics)
             for row, res in zip(rows, (res for rec in records for res in rec.results))
             if (res.metrics or {}).get("reliability")]
    if cells:
        written["grid"] = reliability_grid(cells, out_dir / "reliability_grid.png", ncols=min(4, len(cells)))

    # One diagram per result: the run's own, or drawn here.
    diagrams: list[tuple[str, str, Path]] = []  # (run, label, png)
    for rec, name in zip(records, names):
        for res in rec.results:
            png = Path(rec.path) / res.reliability if res.reliability else None
            if png is None or not png.is_file():
                if not (res.metrics or {}).get("reliability"):
                    continue
                stem = f"reliability_{_slug(name)}_{_slug(res.label)}"
                png, k = out_dir / f"{stem}.png", 1
                while f"diagram:{png.name}" in written:
                    k += 1
                    png = out_dir / f"{stem}_{k}.png"
                save_reliability(res.metrics["reliability"], png, f"{name} · {res.label}", res.metrics)
                written[f"diagram:{png.name}"] = png
            diagrams.append((name, res.label, png))

    doc = Document(out_dir, "llmcal comparison")
    doc.h(1, "llmcal comparison")
    doc.h(2, "Runs")
    doc.ul([f"**{md_text(name)}**: {md_text(_inline(rec.model))} ({md_text(rec.kind)}); created "
            f"{md_text(rec.config.get('created', '?'))}; `{rec.path}`" for rec, name in zip(records, names)])
    doc.h(2, "Results")
    doc.table(rows, columns, group=("run",))
    if "grid" in written:
        doc.h(2, "Reliability diagrams")
        doc.img("reliability_grid.png", "reliability grid")
    doc.figures([(Path(os.path.relpath(png, out_dir)).as_posix(),
                  f"reliability diagram: {md_text(name)} {md_text(label)}", f"{md_text(name)} · {md_text(label)}")
                 for name, label, png in diagrams])
    doc.h(2, "Definitions")
    doc.p(DEFINITIONS)
    written["md"] = atomic_write_text(out_dir / "report.md", doc.markdown())
    written["html"] = atomic_write_text(out_dir / "report.html", doc.html())
    return written


# ---- helpers ---------------------------------------------------------------
def _with_extras(columns: list[str], rows: list[dict]) -> list[str]:
    return columns + [c for c in extra_columns(rows) if c not in columns]


def _first(d: dict, *keys: str):
    for k in keys:
        if d.get(k) not in (None, "", [], {}):
            return d[k]
    return None


def _created(run_dir: Path) -> str | None:
    try:
        return json.loads((run_dir / CONFIG).read_text(encoding="utf-8")).get("created")
    except (OSError, ValueError, AttributeError):
        return None


def _inline(value: object) -> str:
    """A config value on one line: dicts as ``k=v, ...``, lists comma-separated."""
    if isinstance(value, dict):
        return ", ".join(f"{k}={_inline(v)}" for k, v in value.items() if v not in (None, "", [], {}))
    if isinstance(value, (list, tuple)):
        return ", ".join(_inline(v) for v in value)
    return format_value(value) if isinstance(value, float) else str(value)


def _relative(p: str, base: Path) -> str:
    path = Path(p)
    if path.is_absolute():
        try:
            path = path.relative_to(base)
        except ValueError:
            pass
    return path.as_posix()


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(s)).strip("-") or "result"
