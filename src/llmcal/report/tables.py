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
# Significant digits of the numbers in run, comparison and study reports (``sig=SIG``).
SIG = 3


def format_number(value: float, sig: int = SIG, *, signed: bool = False) -> str:
    """A number to ``sig`` significant digits, never in exponent notation: 0.0853, 0.520, 1.19, 12.3, 1234
    (digits left of the point are kept), 0 as ``0``; ``signed`` puts a ``+`` before positive numbers."""
    if math.isnan(value) or math.isinf(value):
        return str(value)
    if value == 0:
        return "0"
    s = f"{value:.{_decimals(value, sig)}f}"
    if float(s) == 0:  # rounded away
        s = "0"
    return f"+{s}" if signed and not s.startswith("-") and s != "0" else s


def _decimals(value: float, sig: int) -> int:
    """Decimals that show ``value`` to ``sig`` significant digits (after rounding: 0.9996 -> 1.00)."""
    if value == 0 or math.isnan(value) or math.isinf(value):
        return 0
    rounded = float(f"{value:.{sig - 1}e}")
    return max(sig - 1 - math.floor(math.log10(abs(rounded))), 0)


def format_interval(ci: object, value: object = None, sig: int | None = None) -> str:
    """`` [lo, hi]``: to 2 decimals, or with ``sig`` to 2 significant digits of the larger end (at least 2
    decimals): 0.520 [0.42, 0.62], 0.0862 [0.06, 0.15], +0.00333 [-0.030, 0.033]; empty when ``ci`` is not a
    pair of numbers."""
    if not (isinstance(ci, (list, tuple)) and len(ci) == 2 and all(isinstance(c, (int, float)) and
                                                                   not isinstance(c, bool) for c in ci)):
        return ""
    d = 2
    if sig is not None:
        d = max(_decimals(max(abs(float(ci[0])), abs(float(ci[1]))), 2), 2)
    return f" [{ci[0]:.{d}f}, {ci[1]:.{d}f}]"


def format_value(value: object, ci: object = None, *, signed: bool = False, sig: int | None = None) -> str:
    """Numbers to 4 decimals, or with ``sig`` to that many significant digits (``format_number``); ``signed``:
    with their sign; an interval after it (``format_interval``); ``None`` as an em dash."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        s = f"{value:+d}" if signed else str(value)
    elif isinstance(value, float):
        if sig is not None:
            s = format_number(value, sig, signed=signed)
        else:
            s = "nan" if math.isnan(value) else f"{value:+.4f}" if signed else f"{value:.4f}"
    elif isinstance(value, (dict, list, tuple)):
        return json.dumps(value, ensure_ascii=False, default=str)
    else:
        return str(value)
    return s + format_interval(ci, value, sig)


def _columns(columns: Sequence[Column] | None) -> list[tuple[str, str]]:
    cols = DEFAULT_COLUMNS if columns is None else columns
    return [c if isinstance(c, tuple) else (c, HEADERS.get(c, c)) for c in cols]


def _cell(row: dict, key: str, sig: int | None = None) -> str:
    return format_value(row.get(key), row.get(f"{key}_ci"), signed=key.endswith(SIGNED_SUFFIX), sig=sig)


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


def _spans(rows: Sequence[dict], group: Sequence[str]) -> list[dict[str, int]]:
    """Per row, for each ``group`` key: how many rows its cell spans (0: the row above names it already).

    A key's value is named once per run of equal values, and a run ends where a key before it changes: the
    model is named on its first row, the point on the first row of each point of that model.
    """
    out: list[dict[str, int]] = [{} for _ in rows]
    for gi, key in enumerate(group):
        start = 0
        for i in range(1, len(rows) + 1):
            same = i < len(rows) and all(rows[i].get(k) == rows[i - 1].get(k) for k in group[:gi + 1])
            if not same:
                out[start][key] = i - start
                for j in range(start + 1, i):
                    out[j][key] = 0
                start = i
    return out


def markdown_table(rows: Sequence[dict], columns: Sequence[Column] | None = None, *, sig: int | None = None,
                   group: Sequence[str] = ()) -> str:
    """A GitHub-flavoured Markdown table; a column is a row key or ``(key, header)``.  Text cells are data
    (subjects, ids, names): escaped by ``md_text``; numeric cells are written as they are.  ``sig``: numbers
    to that many significant digits (``format_value``); ``group``: leading keys named once per run of equal
    values (the cells below left empty)."""
    cols = _columns(columns)

    def esc(s: str) -> str:
        return s.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")

    numeric = [any(_numeric(r, k) for r in rows) for k, _ in cols]
    spans = _spans(rows, [k for k in group if k in {c for c, _ in cols}])
    lines = ["| " + " | ".join(esc(h) for _, h in cols) + " |",
             "|" + "|".join("---:" if num else "---" for num in numeric) + "|"]
    for row, span in zip(rows, spans):
        cells = []
        for (k, _), num in zip(cols, numeric):
            if span.get(k, 1) == 0:
                cells.append("")
            else:
                cells.append(esc(_cell(row, k, sig)) if num else md_text(_cell(row, k, sig)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def html_table(rows: Sequence[dict], columns: Sequence[Column] | None = None, *, sig: int | None = None,
               group: Sequence[str] = ()) -> str:
    """An HTML ``<table>`` (every cell escaped); numeric cells carry ``class="num"``.  ``sig`` and ``group`` as
    in ``markdown_table``; a grouped cell spans its rows (``rowspan``)."""
    cols = _columns(columns)
    numeric = [any(_numeric(r, k) for r in rows) for k, _ in cols]
    spans = _spans(rows, [k for k in group if k in {c for c, _ in cols}])
    out = ["<table>", "<thead><tr>"]
    out += [f"<th{_NUM if num else ''}>{html.escape(h)}</th>" for (_, h), num in zip(cols, numeric)]
    out += ["</tr></thead>", "<tbody>"]
    for row, span in zip(rows, spans):
        cells = []
        for (k, _), num in zip(cols, numeric):
            n = span.get(k, 1)
            if n == 0:
                continue
            attrs = (_NUM if num else "") + (f' rowspan="{n}"' if n > 1 else "")
            cells.append(f"<td{attrs}>{html.escape(_cell(row, k, sig))}</td>")
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
