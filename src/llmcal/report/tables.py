"""Result tables: flat rows from runs, rendered as Markdown or HTML.

A row is a flat dict of plain values. Numbers stay numbers (``accuracy`` is a
float, its 95% interval sits beside it in ``accuracy_ci``), and the renderers
put them together: a cell of column ``accuracy`` reads ``0.6228 [0.60, 0.65]``.
"""
from __future__ import annotations

import html
import re
import json
import math
from pathlib import Path
from typing import Sequence

from ..runs import RunRecord, RunResult

# Metrics copied from a result's metrics dict into its row.
METRIC_KEYS = ("n", "accuracy", "conf_ece", "cw_ece", "em_ece", "mce", "brier", "nll", "auroc", "mean_conf",
               "aurc", "acc_at_80", "acc_at_50")
# Columns whose 95% interval (metrics["ci"][name]) is rendered next to the value.
CI_KEYS = ("accuracy", "conf_ece", "aurc")
# Columns of differences (this suffix, e.g. ``id_accuracy_change``): rendered with their sign (+0.0550).
SIGNED_SUFFIX = "accuracy_change"

DEFAULT_COLUMNS = ["run", "method", "dataset", "split", "n", "accuracy", "conf_ece", "cw_ece", "brier", "nll",
                   "mean_conf"]

HEADERS = {
    "run": "run", "model": "model", "kind": "kind", "label": "label", "method": "method", "dataset": "dataset",
    "split": "split", "n": "N", "accuracy": "accuracy", "conf_ece": "conf-ECE", "cw_ece": "cw-ECE",
    "em_ece": "em-ECE", "mce": "MCE", "brier": "Brier", "nll": "NLL", "auroc": "AUROC", "mean_conf": "mean conf",
    "aurc": "AURC", "acc_at_80": "acc@80%", "acc_at_50": "acc@50%", "accuracy_change": "Δ acc",
    "subject": "subject",
}

# Row keys that are not metric or extra columns (bookkeeping for the reports).
_BOOKKEEPING = {"run", "model", "kind", "label", "method", "dataset", "split", "predictions", "reliability",
                *METRIC_KEYS, *(f"{k}_ci" for k in CI_KEYS)}

Column = str | tuple[str, str]

_NUM = ' class="num"'


def result_row(result: RunResult | dict, *, run: str = "", model: str = "", kind: str = "",
               run_path: str | Path | None = None) -> dict:
    """One flat row for one evaluated (method, dataset, split).

    ``reliability`` and ``predictions`` are resolved against ``run_path`` when given.
    Entries of ``result.extra`` (e.g. ``temperature``) become columns of their
    own; one that would shadow a standard column is prefixed with ``extra.``.
    """
    if isinstance(result, dict):
        result = RunResult(**result)
    m = result.metrics or {}
    row: dict = {"run": run, "model": model, "kind": kind, "label": result.label, "method": result.method,
                 "dataset": result.dataset, "split": result.split}
    for key in METRIC_KEYS:
        row[key] = m.get(key)
    ci = m.get("ci") or {}
    for key in CI_KEYS:
        row[f"{key}_ci"] = ci.get(key)
    row["predictions"] = _resolve(result.predictions, run_path)
    row["reliability"] = _resolve(result.reliability, run_path)
    for key, value in (result.extra or {}).items():
        row[f"extra.{key}" if key in row else key] = value
    return row


def results_rows(records: Sequence[RunRecord]) -> list[dict]:
    """All results of all runs as rows, in run order then result order; ``run`` is the directory name."""
    names = run_names([r.path for r in records])
    return [result_row(res, run=name, model=rec.model, kind=rec.kind, run_path=rec.path)
            for rec, name in zip(records, names) for res in rec.results]


def run_names(paths: Sequence[str | Path]) -> list[str]:
    """Directory names, with the parent prepended where two runs share a name."""
    paths = [Path(p) for p in paths]
    names = [p.name or str(p) for p in paths]
    dup = {n for n in names if names.count(n) > 1}
    return [f"{p.parent.name}/{p.name}" if n in dup else n for p, n in zip(paths, names)]


def extra_columns(rows: Sequence[dict]) -> list[str]:
    """Keys outside the standard columns whose values are scalars (e.g. ``temperature``), in first-seen order."""
    out: list[str] = []
    for row in rows:
        for key, value in row.items():
            if key in _BOOKKEEPING or key in out:
                continue
            if value is None or isinstance(value, (bool, int, float, str)):
                out.append(key)
    return out


# ---- formatting -----------------------------------------------------------
def format_value(value: object, ci: object = None, *, signed: bool = False) -> str:
    """Numbers to 4 decimals (``signed``: with their sign), an interval as `` [lo, hi]`` to 2, ``None`` as an
    em dash."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        s = f"{value:+d}" if signed else str(value)
    elif isinstance(value, float):
        s = "nan" if math.isnan(value) else f"{value:+.4f}" if signed else f"{value:.4f}"
    elif isinstance(value, (dict, list, tuple)):
        return json.dumps(value, ensure_ascii=False, default=str)
    else:
        return str(value)
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(isinstance(c, (int, float)) for c in ci):
        s += f" [{ci[0]:.2f}, {ci[1]:.2f}]"
    return s


def _columns(columns: Sequence[Column] | None) -> list[tuple[str, str]]:
    cols = DEFAULT_COLUMNS if columns is None else columns
    return [c if isinstance(c, tuple) else (c, HEADERS.get(c, c)) for c in cols]


def _cell(row: dict, key: str) -> str:
    return format_value(row.get(key), row.get(f"{key}_ci"), signed=key.endswith(SIGNED_SUFFIX))


def _numeric(row: dict, key: str) -> bool:
    v = row.get(key)
    return isinstance(v, (int, float)) and not isinstance(v, bool)


_MD_MARKUP = re.compile(r"([\\`*\[\]<>|])")
_MD_ENTITIES = {"&": "&amp;", "<": "&lt;", ">": "&gt;"}


def md_text(s: object) -> str:
    """Text from data (a subject, an id, a run or model name) as literal Markdown on one line: raw HTML shown, not
    rendered (``<``, ``>``, ``&`` as entities, as ``html.escape`` does for report.html), and the characters that
    start Markdown markup (`` \\ ` * [ ] | ``) backslash-escaped."""
    text = " ".join(str(s).splitlines())
    text = re.sub(r"&(?=[A-Za-z#][A-Za-z0-9]*;)", "&amp;", text)  # an entity written in data stays literal
    return _MD_MARKUP.sub(lambda m: _MD_ENTITIES.get(m[1]) or "\\" + m[1], text)


def markdown_table(rows: Sequence[dict], columns: Sequence[Column] | None = None) -> str:
    """A GitHub-flavoured Markdown table; a column is a row key or ``(key, header)``.  Text cells are data
    (subjects, ids, names): escaped by ``md_text``; numeric cells are written as they are."""
    cols = _columns(columns)

    def esc(s: str) -> str:
        return s.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")

    numeric = [any(_numeric(r, k) for r in rows) for k, _ in cols]
    lines = ["| " + " | ".join(esc(h) for _, h in cols) + " |",
             "|" + "|".join("---:" if num else "---" for num in numeric) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(esc(_cell(row, k)) if num else md_text(_cell(row, k))
                                       for (k, _), num in zip(cols, numeric)) + " |")
    return "\n".join(lines) + "\n"


def html_table(rows: Sequence[dict], columns: Sequence[Column] | None = None) -> str:
    """An HTML ``<table>`` (every cell escaped); numeric cells carry ``class="num"``."""
    cols = _columns(columns)
    numeric = [any(_numeric(r, k) for r in rows) for k, _ in cols]
    out = ["<table>", "<thead><tr>"]
    out += [f"<th{_NUM if num else ''}>{html.escape(h)}</th>" for (_, h), num in zip(cols, numeric)]
    out += ["</tr></thead>", "<tbody>"]
    for row in rows:
        cells = [f"<td{_NUM if num else ''}>{html.escape(_cell(row, k))}</td>"
                 for (k, _), num in zip(cols, numeric)]
        out.append("<tr>" + "".join(cells) + "</tr>")
    out += ["</tbody>", "</table>"]
    return "\n".join(out) + "\n"


def _resolve(p: str | None, base: str | Path | None) -> str | None:
    if not p:
        return p
    path = Path(p)
    if base is not None and not path.is_absolute():
        path = Path(base) / path
    return str(path)
