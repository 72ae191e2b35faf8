"""Reports: ``report.md`` for one run, and a comparison of several runs (md + one self-contained html).

``write_run_report`` works from the run's config and results in memory, so a
run can write its report before ``metrics.json`` (its last file). The
comparison reads finished runs back with ``load_run``.
"""
from __future__ import annotations

import base64
import html
import json
import logging
import os
import re
from pathlib import Path
from typing import Sequence

from ..errors import LlmcalError
from ..io import atomic_write_text
from ..runs import CONFIG, RunRecord, RunResult, load_run
from .plots import reliability_grid, save_reliability
from .tables import (extra_columns, format_value, html_table, markdown_table, md_text, result_row, results_rows,
                     run_names)

REPORT = "report.md"
RISK_COVERAGE_PNG = "risk-coverage.png"

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
    "under-confidence (green)."
)


# ---- one run -------------------------------------------------------------------
def write_run_report(run_dir: str | os.PathLike, config: dict, results: Sequence[RunResult | dict],
                     meta: dict | None = None, sections: Sequence = ()) -> Path:
    """Write ``RUN/report.md``: header, results table, the run's sections, per-subject tables, diagrams,
    definitions.

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

    name = run_dir.name.replace("`", "'")  # a code span: a backtick would end it
    lines = [f"# llmcal run `{name}`", ""]
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
    for key, value in header.items():
        if value not in (None, "", [], {}):
            lines.append(f"- **{key}**: {md_text(_inline(value))}")
    for key, value in meta.items():
        if key not in header and isinstance(value, (str, int, float, bool)):
            lines.append(f"- **{key}**: {md_text(_inline(value))}")
    lines.append("")

    lines += ["## Results", ""]
    if rows:
        lines.append(markdown_table(rows, _with_extras(["method", "dataset", "split", "n", "accuracy", "conf_ece",
                                                        "cw_ece", "brier", "nll", "mean_conf"], rows)))
    else:
        lines += ["No results.", ""]

    lines += letter_coverage_section(results)
    lines += selective_section(run_dir, results)

    for sec in sections:
        lines += [f"## {sec.title}", "", sec.body.strip("\n"), ""]

    for res in results:
        table = per_subject_markdown(res.metrics.get("per_subject") or {})
        if table:
            lines += [f"## Per subject: {md_text(res.label)}", "", table]

    pictures = [(r.label, _relative(r.reliability, run_dir)) for r in results if r.reliability]
    if pictures:
        lines += ["## Reliability diagrams", ""]
        for label, rel in pictures:
            lines += [f"### {md_text(label)}", "", f"![reliability diagram: {md_text(label)}]({_md_url(rel)})", ""]

    lines += ["## Definitions", "", DEFINITIONS, ""]
    return atomic_write_text(run_dir / REPORT, "\n".join(lines))


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


def letter_coverage_section(results: Sequence[RunResult]) -> list[str]:
    """The report's "Letter coverage" lines for a served model's results (empty for a local model)."""
    rows = []
    for r in results:
        cov = (r.metrics or {}).get("letter_coverage")
        if cov:
            rows.append({"result": r.label, "dataset": r.dataset, "n": cov.get("n"),
                         "letter_mass": cov.get("mean_letter_mass"), "min_letter_mass": cov.get("min_letter_mass"),
                         "missing_share": cov.get("missing_share"), "none_found_share": cov.get("none_found_share"),
                         "missing_letters": cov.get("missing_letters")})
    if not rows:
        return []
    return ["## Letter coverage", "", LETTER_COVERAGE_TEXT, "",
            markdown_table(rows, ["result", "dataset", "n", "letter_mass", "min_letter_mass", "missing_share",
                                  "none_found_share", "missing_letters"])]


SELECTIVE_TEXT = (
    "Answering only the most confident questions: *AURC* is the area under the risk-coverage curve, "
    "(1/N) Σ_k (errors among the k most confident)/k, lower is better (Geifman et al. 2019); *acc@80%* and "
    "*acc@50%* are the accuracy on the 80% and 50% most confident questions (ties: expected over their order). "
    "A confidence that ranks right answers above wrong ones gives a curve that rises late.")


def selective_section(run_dir: Path, results: Sequence[RunResult]) -> list[str]:
    """The report's "Selective prediction" lines: AURC and accuracy at 80% / 50% coverage per result, and
    ``RUN/risk-coverage.png`` with one curve per result.

    Numbers come from the result's metrics; the curves (and the numbers of a
    run recorded before llmcal computed them) from its predictions file. A
    result whose file is missing keeps its numbers and has no curve. Empty
    when no result has either.
    """
    from ..metrics import risk_coverage_curve, selective_accuracy
    from ..predictions import load_predictions, stack_probs

    labels = [r.label for r in results]
    loaded: dict[Path, tuple] = {}
    rows, curves = [], []
    for r in results:
        m = r.metrics or {}
        name = r.label if labels.count(r.label) == 1 else f"{r.label} ({r.dataset})"
        ci = m.get("ci") or {}
        row = {"result": name, "dataset": r.dataset, "n": m.get("n"), "accuracy": m.get("accuracy"),
               "accuracy_ci": ci.get("accuracy"), "aurc": m.get("aurc"), "aurc_ci": ci.get("aurc"),
               "acc_at_80": m.get("acc_at_80"), "acc_at_50": m.get("acc_at_50")}
        path = run_dir / _relative(r.predictions, run_dir) if r.predictions else None
        if path is not None and path not in loaded and path.is_file():
            try:
                probs, answers = stack_probs(load_predictions(path))
                loaded[path] = (probs, answers, risk_coverage_curve(probs, answers))
            except LlmcalError as e:  # an unreadable file costs the curve, not the report
                log.warning("%s: no risk-coverage curve (%s)", path, e)
        if path in loaded:
            probs, answers, curve = loaded[path]
            if row["aurc"] is None:
                row.update(aurc=curve.aurc, acc_at_80=selective_accuracy(probs, answers, 0.8),
                           acc_at_50=selective_accuracy(probs, answers, 0.5))
            curves.append((name, curve.to_dict()))
        if row["aurc"] is not None:
            rows.append(row)
    if not rows:
        return []
    lines = ["## Selective prediction", "", SELECTIVE_TEXT, "",
             markdown_table(rows, ["result", "dataset", "n", "accuracy", "aurc", "acc_at_80", "acc_at_50"])]
    if curves:
        from .plots import risk_coverage_plot

        risk_coverage_plot(curves, run_dir / RISK_COVERAGE_PNG, title=f"{run_dir.name}: risk-coverage")
        lines += [f"![risk-coverage curves]({RISK_COVERAGE_PNG})", ""]
    return lines


def per_subject_markdown(per_subject: dict) -> str:
    """Subjects by accuracy (best first); with many subjects, the best and the worst only.

    Empty when there are fewer than two subjects (the results table says it all).
    """
    if len(per_subject) < 2:
        return ""
    rows = [{"subject": str(s), **{k: v.get(k) for k in ("n", "accuracy", "conf_ece")}}
            for s, v in per_subject.items()]
    rows.sort(key=lambda r: (-(r["accuracy"] if r["accuracy"] is not None else -1.0), r["subject"]))
    cols = ["subject", "n", "accuracy", "conf_ece"]
    if len(rows) <= SUBJECTS_MAX:
        return markdown_table(rows, cols)
    k = SUBJECTS_SHOWN
    return (f"{len(rows)} subjects; the {k} with the highest and the {k} with the lowest accuracy.\n\n"
            f"Highest:\n\n{markdown_table(rows[:k], cols)}\nLowest:\n\n{markdown_table(rows[-k:], cols)}")


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
        written["grid"] = reliability_grid(cells, out_dir / "reliability_grid.png",
                                                           ncols=min(4, len(cells)))

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

    written["md"] = atomic_write_text(out_dir / "report.md",
                                             _comparison_md(records, names, rows, columns, diagrams, out_dir,
                                                            "grid" in written))
    written["html"] = atomic_write_text(out_dir / "report.html",
                                               _comparison_html(records, names, rows, columns, diagrams,
                                                                written.get("grid")))
    return written


def _comparison_md(records, names, rows, columns, diagrams, out_dir: Path, has_grid: bool) -> str:
    lines = ["# llmcal comparison", "", "## Runs", ""]
    for rec, name in zip(records, names):
        lines.append(f"- **{md_text(name)}**: {md_text(_inline(rec.model))} ({md_text(rec.kind)}); created "
                     f"{md_text(rec.config.get('created', '?'))}; "
                     f"`{rec.path}`")
    lines += ["", "## Results", "", markdown_table(rows, columns)]
    if has_grid:
        lines += ["## Reliability diagrams", "", "![reliability grid](reliability_grid.png)", ""]
    for name, label, png in diagrams:
        rel = Path(os.path.relpath(png, out_dir)).as_posix()
        lines += [f"### {md_text(name)} · {md_text(label)}", "",
                  f"![reliability diagram: {md_text(name)} {md_text(label)}]({_md_url(rel)})", ""]
    lines += ["## Definitions", "", DEFINITIONS, ""]
    return "\n".join(lines)


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1200px;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1, h2, h3 { font-weight: 600; } h3 { font-size: 1em; margin-bottom: .3em; }
table { border-collapse: collapse; margin: 1em 0; font-size: .9em; }
th, td { border: 1px solid #ccc; padding: .3em .6em; text-align: left; }
th { background: #f2f2f2; } td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
tbody tr:nth-child(even) { background: #fafafa; }
img { max-width: 100%; height: auto; }
.diagrams { display: flex; flex-wrap: wrap; gap: 1em; }
.diagrams figure { margin: 0; } figcaption { font-size: .85em; color: #555; }
code { background: #f4f4f4; padding: 0 .2em; }
"""


def _comparison_html(records, names, rows, columns, diagrams, grid: Path | None) -> str:
    e = html.escape
    parts = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
             "<title>llmcal comparison</title>", f"<style>{_CSS}</style>", "</head>", "<body>",
             "<h1>llmcal comparison</h1>", "<h2>Runs</h2>", "<ul>"]
    for rec, name in zip(records, names):
        parts.append(f"<li><b>{e(name)}</b>: {e(_inline(rec.model))} ({e(str(rec.kind))}); "
                     f"created {e(str(rec.config.get('created', '?')))}; <code>{e(str(rec.path))}</code></li>")
    parts += ["</ul>", "<h2>Results</h2>", html_table(rows, columns)]
    if grid is not None:
        parts += ["<h2>Reliability diagrams</h2>", _img(grid, "reliability grid")]
    if diagrams:
        parts.append('<div class="diagrams">')
        for name, label, png in diagrams:
            parts.append(f"<figure>{_img(png, f'reliability diagram: {name} {label}')}"
                         f"<figcaption>{e(name)} · {e(label)}</figcaption></figure>")
        parts.append("</div>")
    parts += ["<h2>Definitions</h2>", f"<p>{e(DEFINITIONS.replace('**', '').replace('*', ''))}</p>",
              "</body>", "</html>", ""]
    return "\n".join(parts)


def _img(png: Path, alt: str) -> str:
    data = base64.b64encode(Path(png).read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


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


def _md_url(p: str) -> str:
    return p.replace(" ", "%20").replace("(", "%28").replace(")", "%29")


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(s)).strip("-") or "result"
