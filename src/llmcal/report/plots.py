"""Figures: reliability diagrams, grids of them, the accuracy / conf-ECE plane, risk-coverage curves.

Everything is drawn on ``matplotlib.figure.Figure`` objects with an Agg canvas;
pyplot (and with it any display backend or global figure registry) is never
touched, so plotting is safe in headless runs, threads and tests.

The reliability diagram follows Guo et al. (2017): per confidence bin, a bar of
the accuracy of the questions in the bin, the diagonal (perfect calibration),
and the gap between the bar and the bin's mean confidence shaded. A gap above
the bar is overconfidence (confidence > accuracy), below it underconfidence.
The input is the ``reliability`` entry of a metrics dict::

    {"n_bins": M, "edges": [M+1 floats], "count": [M ints],
     "accuracy": [M floats or None], "confidence": [M floats or None]}

where ``None`` marks an empty bin (nothing is drawn for it).
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from ..errors import LlmcalError
from ..io import atomic_savefig

DPI = 120

ACC_COLOR = "#3b6ea8"
OVER_COLOR = "#d62728"  # confidence above accuracy
UNDER_COLOR = "#2ca02c"  # confidence below accuracy
CONF_COLOR = "#ff7f0e"

Cell = tuple[str, dict]


# ---- input -------------------------------------------------------------
def _bins(reliability: dict) -> list[tuple[float, float, int, float | None, float | None]]:
    """Validate reliability data; return (left, right, count, accuracy, confidence) per bin."""
    if not isinstance(reliability, dict):
        raise LlmcalError(f"reliability data must be a dict, got {type(reliability).__name__}")
    missing = [k for k in ("edges", "count", "accuracy", "confidence") if k not in reliability]
    if missing:
        raise LlmcalError(f"reliability data lacks {', '.join(missing)}")
    edges = [float(e) for e in reliability["edges"]]
    m = len(edges) - 1
    if m < 1:
        raise LlmcalError("reliability data needs at least two bin edges")
    for key in ("count", "accuracy", "confidence"):
        if len(reliability[key]) != m:
            raise LlmcalError(f"reliability data: {key} has {len(reliability[key])} entries for {m} bins")
    out = []
    for i in range(m):
        c = int(reliability["count"][i] or 0)
        a = reliability["accuracy"][i]
        f = reliability["confidence"][i]
        empty = c == 0 or a is None or f is None or _isnan(a) or _isnan(f)
        out.append((edges[i], edges[i + 1], c, None if empty else float(a), None if empty else float(f)))
    return out


def _isnan(x: object) -> bool:
    return isinstance(x, float) and math.isnan(x)


def _summary(bins: list, metrics: dict | None) -> dict:
    """Accuracy, conf-ECE, mean confidence and n: from ``metrics`` if given, else from the bins."""
    n = sum(b[2] for b in bins if b[3] is not None)
    derived = {"n": n, "accuracy": None, "conf_ece": None, "mean_conf": None}
    if n:
        derived["accuracy"] = sum(b[2] * b[3] for b in bins if b[3] is not None) / n
        derived["mean_conf"] = sum(b[2] * b[4] for b in bins if b[3] is not None) / n
        derived["conf_ece"] = sum(b[2] * abs(b[3] - b[4]) for b in bins if b[3] is not None) / n
    if not metrics:
        return derived
    out = {k: metrics.get(k, derived[k]) for k in derived}
    out["ci"] = metrics.get("ci") or {}
    return out


def _split_cell(d: dict) -> tuple[dict, dict | None]:
    """A grid cell holds a metrics dict (with "reliability") or bare reliability data."""
    if isinstance(d, dict) and "reliability" in d:
        return d["reliability"], d
    return d, None


def _fmt(x: object, ci: object = None) -> str:
    """A number to the reports' significant digits (``tables.format_number``), its interval after it."""
    from .tables import SIG, format_value

    if x is None or _isnan(x):
        return "n/a"
    return format_value(float(x), ci, sig=SIG)


# ---- drawing -----------------------------------------------------------
def _draw_bars(ax, bins: list, *, small: bool = False) -> None:
    """Accuracy bars, the gap to each bin's mean confidence, and the diagonal."""
    lw = 0.6 if small else 0.8
    for left, right, _, acc, conf in bins:
        if acc is None:
            continue
        w = right - left
        ax.bar(left, acc, width=w, align="edge", color=ACC_COLOR, edgecolor="black", linewidth=lw, zorder=2)
        gap = conf - acc
        color = OVER_COLOR if gap > 0 else UNDER_COLOR
        if abs(gap) > 1e-12:
            # a white underlay keeps the tint the same above the bar (over-) and inside it (underconfident)
            ax.bar(left, abs(gap), bottom=min(acc, conf), width=w, align="edge", color="white", alpha=0.6,
                   linewidth=0, zorder=3)
            ax.bar(left, abs(gap), bottom=min(acc, conf), width=w, align="edge", color=color, alpha=0.3,
                   edgecolor=color, hatch="//", linewidth=lw, zorder=3)
        # the bin's mean confidence, where the gap ends
        ax.plot([left, right], [conf, conf], color=color, lw=lw + 0.4, zorder=4)
    ax.plot([0, 1], [0, 1], ls="--", color="0.35", lw=1.0, zorder=5)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_aspect("auto")
    ax.grid(True, ls=":", lw=0.5, color="0.8", zorder=0)
    ax.set_axisbelow(True)


def reliability_figure(reliability: dict, title: str, metrics: dict | None = None) -> Figure:
    """A reliability diagram over a confidence histogram, sized 5 x 6 inches.

    Top: per-bin accuracy bars against the diagonal; the gap to the bin's mean
    confidence is shaded red (overconfident) or green (underconfident); a box
    gives accuracy, conf-ECE (with its 95% CI when ``metrics`` has one), mean
    confidence and n. Bottom: number of questions per bin (linear scale), with
    vertical lines at the overall accuracy and mean confidence. Without
    ``metrics`` the summary numbers are derived from the bins themselves.
    """
    bins = _bins(reliability)
    s = _summary(bins, metrics)
    ci = s.get("ci", {})

    fig = Figure(figsize=(5, 6), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1.25]})

    _draw_bars(top, bins)
    top.set_ylabel("accuracy")
    fig.suptitle(title, fontsize=11)
    text = "\n".join([
        f"accuracy  {_fmt(s['accuracy'], ci.get('accuracy'))}",
        f"conf-ECE  {_fmt(s['conf_ece'], ci.get('conf_ece'))}",
        f"mean conf {_fmt(s['mean_conf'])}",
        f"n = {s['n']}",
    ])
    top.text(0.03, 0.97, text, transform=top.transAxes, va="top", ha="left", fontsize=8.5, family="monospace",
             bbox={"boxstyle": "round,pad=0.4", "facecolor": "white", "edgecolor": "0.6", "alpha": 0.92}, zorder=10)
    handles = [
        Patch(facecolor=ACC_COLOR, edgecolor="black", label="accuracy"),
        Patch(facecolor=OVER_COLOR, alpha=0.3, hatch="//", edgecolor=OVER_COLOR, label="gap: overconfident"),
        Patch(facecolor=UNDER_COLOR, alpha=0.3, hatch="//", edgecolor=UNDER_COLOR, label="gap: underconfident"),
    ]
    top.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3, fontsize=7.5,
               frameon=False, handlelength=1.6, columnspacing=1.0)

    for left, right, count, _, _ in bins:
        if count:
            bottom.bar(left, count, width=right - left, align="edge", color="0.6", edgecolor="black", linewidth=0.8)
    if s["accuracy"] is not None:
        bottom.axvline(s["accuracy"], color=ACC_COLOR, lw=1.6, label=f"accuracy {s['accuracy']:.3f}")
    if s["mean_conf"] is not None:
        bottom.axvline(s["mean_conf"], color=CONF_COLOR, lw=1.6, ls="--", label=f"mean conf {s['mean_conf']:.3f}")
    bottom.set_xlim(0, 1)
    bottom.set_xlabel("confidence")
    bottom.set_ylabel("count")
    bottom.grid(True, axis="y", ls=":", lw=0.5, color="0.8")
    bottom.set_axisbelow(True)
    if s["accuracy"] is not None or s["mean_conf"] is not None:
        bottom.legend(loc="upper left", fontsize=7.5, framealpha=0.92)
    return fig


def save_reliability(reliability: dict, path: str | os.PathLike, title: str, metrics: dict | None = None) -> Path:
    """Draw :func:`reliability_figure` and write it atomically (format from the suffix, 120 dpi)."""
    return atomic_savefig(reliability_figure(reliability, title, metrics), path, dpi=DPI)


def _layout(items: Sequence[Cell | None] | None, ncols: int,
            grid: Sequence[Sequence[Cell | None]] | None) -> list[list[Cell | None]]:
    if grid is not None:
        rows = [list(r) for r in grid]
    else:
        if ncols < 1:
            raise LlmcalError(f"reliability grid: ncols must be at least 1, got {ncols}")
        cells = list(items or [])
        rows = [cells[i:i + ncols] for i in range(0, len(cells), ncols)]
    width = max((len(r) for r in rows), default=0)
    rows = [r + [None] * (width - len(r)) for r in rows]
    if not any(c is not None for r in rows for c in r):
        raise LlmcalError("reliability grid: nothing to plot (no cells)")
    return rows


def reliability_grid(items: Sequence[Cell | None] | None, path: str | os.PathLike, ncols: int = 4, *,
                     grid: Sequence[Sequence[Cell | None]] | None = None,
                     row_labels: Sequence[str] | None = None, col_labels: Sequence[str] | None = None,
                     title: str | None = None) -> Path:
    """Small reliability diagrams, one per ``(label, metrics)``, in one image.

    Either ``items`` (laid out row by row, ``ncols`` per row) or ``grid`` (a
    list of rows, e.g. rows = models and columns = methods) gives the cells;
    a ``None`` cell is left blank. ``metrics`` is a metrics dict with a
    ``reliability`` entry (or bare reliability data). ``row_labels`` and
    ``col_labels`` name the rows and columns of the layout.
    """
    rows = _layout(items, ncols, grid)
    nr, nc = len(rows), len(rows[0])
    for name, labels, size in (("row_labels", row_labels, nr), ("col_labels", col_labels, nc)):
        if labels is not None and len(labels) != size:
            raise LlmcalError(f"reliability grid: {len(labels)} {name} for {size} {name.split('_')[0]}s")

    fig = Figure(figsize=(2.6 * nc + (0.4 if row_labels else 0), 2.7 * nr + (0.4 if title else 0)), dpi=DPI,
                 layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nr, nc, squeeze=False)
    for i, row in enumerate(rows):
        for j, cell in enumerate(row):
            ax = axes[i][j]
            header = []
            if col_labels is not None and i == 0:
                header.append(str(col_labels[j]))
            if cell is None:
                ax.set_xticks([])
                ax.set_yticks([])
                for spine in ax.spines.values():
                    spine.set_visible(False)
            else:
                label, metrics = cell
                rel, full = _split_cell(metrics)
                bins = _bins(rel)
                s = _summary(bins, full)
                _draw_bars(ax, bins, small=True)
                ax.text(0.04, 0.96, f"acc {_fmt(s['accuracy'])}\nECE {_fmt(s['conf_ece'])}\nn {s['n']}",
                        transform=ax.transAxes, va="top", ha="left", fontsize=7, family="monospace",
                        bbox={"boxstyle": "round,pad=0.3", "facecolor": "white", "edgecolor": "0.6", "alpha": 0.9},
                        zorder=10)
                ax.tick_params(labelsize=7)
                if i == nr - 1:
                    ax.set_xlabel("confidence", fontsize=8)
                if j == 0:
                    ax.set_ylabel("accuracy", fontsize=8)
                header.append(str(label))
            if header:
                ax.set_title("\n".join(header), fontsize=8.5)
            if row_labels is not None and j == 0:
                ax.set_ylabel(f"{row_labels[i]}\n{ax.get_ylabel()}".rstrip(), fontsize=9)
    if title:
        fig.suptitle(title, fontsize=11)
    return atomic_savefig(fig, path, dpi=DPI)


def accuracy_ece_plane(points: Sequence[dict], path: str | os.PathLike,
                       boundary: Callable[[float], float] | None = None, *,
                       boundary_label: str = "boundary", title: str | None = None) -> Path:
    """Runs as labelled points on accuracy (x) against conf-ECE (y).

    Each point is a dict with ``label``, ``accuracy`` and ``conf_ece``, and
    optionally ``group`` (points of one group share a colour and a legend
    entry) and ``ci`` (``{"accuracy": [lo, hi], "conf_ece": [lo, hi]}``, drawn
    as error bars). ``boundary`` maps an accuracy to a conf-ECE and is drawn
    as a line over [0, 1] (for instance a regime boundary).
    """
    if not points:
        raise LlmcalError("accuracy/ECE plane: no points to plot")
    for k, p in enumerate(points):
        for key in ("accuracy", "conf_ece"):
            if p.get(key) is None:
                raise LlmcalError(f"accuracy/ECE plane: point {k} ({p.get('label', '?')}) has no {key}")
    fig = Figure(figsize=(6, 4.5), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    groups: dict[str, list[dict]] = {}
    for p in points:
        groups.setdefault(str(p.get("group", "")), []).append(p)
    for n, (group, members) in enumerate(groups.items()):
        color = f"C{n % 10}"
        for k, p in enumerate(members):
            x, y = float(p["accuracy"]), float(p["conf_ece"])
            ci = p.get("ci") or {}
            xerr = _err(x, ci.get("accuracy"))
            yerr = _err(y, ci.get("conf_ece"))
            ax.errorbar([x], [y], xerr=xerr, yerr=yerr, fmt="o", color=color, ms=6, capsize=2, lw=0.8,
                        label=group if (group and k == 0) else None, zorder=3)
            if p.get("label"):
                ax.annotate(str(p["label"]), (x, y), xytext=(4, 4), textcoords="offset points", fontsize=8)
    if boundary is not None:
        xs = [i / 200 for i in range(201)]
        ys = [float(boundary(x)) for x in xs]
        ax.plot(xs, ys, color="0.3", ls="--", lw=1.0, label=boundary_label, zorder=2)
    ys_pts = [float(p["conf_ece"]) for p in points]
    ax.set_xlim(0, 1)
    ax.set_ylim(0, max(0.1, max(ys_pts) * 1.2))
    ax.set_xlabel("accuracy")
    ax.set_ylabel("conf-ECE")
    ax.grid(True, ls=":", lw=0.5, color="0.8")
    if title:
        ax.set_title(title, fontsize=11)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    return atomic_savefig(fig, path, dpi=DPI)


def _err(center: float, ci: object) -> list[list[float]] | None:
    if not (isinstance(ci, (list, tuple)) and len(ci) == 2 and None not in ci):
        return None
    return [[max(0.0, center - float(ci[0]))], [max(0.0, float(ci[1]) - center)]]


# ---- post-hoc comparison ---------------------------------------------------
def risk_coverage_plot(curves: Sequence[tuple[str, dict]], path: str | os.PathLike, *,
                       title: str | None = None) -> Path:
    """Risk-coverage curves, one line per ``(label, curve)``, in one image.

    ``curve`` holds ``coverage`` and ``risk`` (equal-length lists, coverage
    increasing, as :meth:`llmcal.metrics.RiskCoverage.to_dict` gives) and
    optionally ``aurc`` (shown in the legend). Selective risk is the error rate
    on the answered questions when the least confident are left out; lower
    curves rank the right answers first. The dotted line at the right end of
    each curve is the overall error rate (coverage 1).
    """
    if not curves:
        raise LlmcalError("risk-coverage plot: no curves to plot")
    fig = Figure(figsize=(6, 4.5), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    top = 0.0
    for n, (label, curve) in enumerate(curves):
        if not isinstance(curve, dict) or "coverage" not in curve or "risk" not in curve:
            raise LlmcalError(f"risk-coverage plot: curve {label!r} needs coverage and risk")
        xs = [float(x) for x in curve["coverage"]]
        ys = [float(y) for y in curve["risk"]]
        if len(xs) != len(ys) or not xs:
            raise LlmcalError(f"risk-coverage plot: curve {label!r} has {len(xs)} coverages and {len(ys)} risks")
        name = str(label) if curve.get("aurc") is None else f"{label} (AURC {float(curve['aurc']):.3f})"
        ax.plot(xs, ys, color=f"C{n % 10}", lw=1.4, ls="-" if n < 10 else "--", label=name)
        top = max(top, max(ys))
    ax.set_xlim(0, 1)
    ax.set_ylim(0, min(1.0, max(0.05, top * 1.1)))
    ax.set_xlabel("coverage (share of questions answered, most confident first)")
    ax.set_ylabel("selective risk (error rate on answered)")
    ax.grid(True, ls=":", lw=0.5, color="0.8")
    ax.legend(fontsize=7.5, loc="best", framealpha=0.85)
    if title:
        ax.set_title(title, fontsize=11)
    return atomic_savefig(fig, path, dpi=DPI)


def method_reliability_grid(items: Sequence[tuple[str, dict, float | None]], path: str | os.PathLike,
                            ncols: int = 4, *, title: str | None = None) -> Path:
    """One small reliability diagram per post-hoc method, with its accuracy change.

    ``items`` are ``(label, metrics, accuracy_change)``: ``metrics`` a metrics
    dict with a ``reliability`` entry (``aurc`` is shown when present) and
    ``accuracy_change`` the method's accuracy minus the uncalibrated one (None
    to leave it out). Panels are laid out row by row, ``ncols`` per row.
    """
    if not items:
        raise LlmcalError("method reliability grid: nothing to plot")
    if ncols < 1:
        raise LlmcalError(f"method reliability grid: ncols must be at least 1, got {ncols}")
    nc = min(ncols, len(items))
    nr = math.ceil(len(items) / nc)
    fig = Figure(figsize=(2.7 * nc, 2.8 * nr + (0.4 if title else 0)), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nr, nc, squeeze=False)
    for idx in range(nr * nc):
        ax = axes[idx // nc][idx % nc]
        if idx >= len(items):
            ax.set_axis_off()
            continue
        label, metrics, change = items[idx]
        rel, full = _split_cell(metrics)
        bins = _bins(rel)
        s = _summary(bins, full)
        _draw_bars(ax, bins, small=True)
        acc = _fmt(s["accuracy"])
        if change is not None and not _isnan(change):
            from .tables import SIG, format_value

            acc += f" ({format_value(float(change), signed=True, sig=SIG)})"
        lines = [f"acc {acc}", f"ECE {_fmt(s['conf_ece'])}"]
        if full and full.get("aurc") is not None:
            lines.append(f"AURC {_fmt(full['aurc'])}")
        ax.text(0.04, 0.96, "\n".join(lines), transform=ax.transAxes, va="top", ha="left", fontsize=6.5,
                family="monospace",
                bbox={"boxstyle": "round,pad=0.3", "facecolor": "white", "edgecolor": "0.6", "alpha": 0.9},
                zorder=10)
        ax.set_title(str(label), fontsize=8.5)
        ax.tick_params(labelsize=7)
        if idx // nc == nr - 1 or idx + nc >= len(items):
            ax.set_xlabel("confidence", fontsize=8)
        if idx % nc == 0:
            ax.set_ylabel("accuracy", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    return atomic_savefig(fig, path, dpi=DPI)


# ---- the verdict ------------------------------------------------------------------------
PICK_COLOR = "#1a7f37"
COSTLY_COLOR = "0.55"


def pareto_plot(verdicts: Sequence, path: str | os.PathLike, *, ncols: int = 3, title: str | None = None) -> Path:
    """Accuracy (x) against conf-ECE (y), one panel per :class:`~llmcal.report.verdict.Verdict`.

    Every method is a point (its intervals are in the report's tables): filled when it keeps accuracy (the ones the pick is chosen
    among; the uncalibrated model is a square), hollow grey when it costs accuracy. The Pareto front (no other
    method has both a higher accuracy and a lower conf-ECE) is the stepped line; the pick is a star.
    """
    from .verdict import keeps_accuracy

    verdicts = [v for v in verdicts if v.base.accuracy is not None and v.base.conf_ece is not None]
    if not verdicts:
        raise LlmcalError("Pareto plot: no verdict with accuracy and conf-ECE")
    nc = max(1, min(ncols, len(verdicts)))
    nr = math.ceil(len(verdicts) / nc)
    fig = Figure(figsize=(4.6 * nc, 3.6 * nr + (0.3 if title else 0)), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nr, nc, squeeze=False)
    for idx in range(nr * nc):
        ax = axes[idx // nc][idx % nc]
        if idx >= len(verdicts):
            ax.set_axis_off()
            continue
        v = verdicts[idx]
        pts = [o for o in (v.base, *v.options) if o.accuracy is not None and o.conf_ece is not None]
        front = [o for o in v.front]
        if len(front) > 1:
            xs, ys = [], []
            for a, b in zip(front, front[1:]):  # a step down-right: higher accuracy costs conf-ECE
                xs += [a.accuracy, b.accuracy]
                ys += [a.conf_ece, a.conf_ece]
            xs.append(front[-1].accuracy)
            ys.append(front[-1].conf_ece)
            ax.plot(xs, ys, color="0.3", lw=1.0, ls="--", zorder=2, label="Pareto front")
        for o in pts:
            base = o is v.base
            ok = base or keeps_accuracy(o)
            color = PICK_COLOR if o is v.pick else (ACC_COLOR if ok else COSTLY_COLOR)
            marker = "*" if o is v.pick else ("s" if base else "o")
            ax.plot([o.accuracy], [o.conf_ece], marker=marker, ms=13 if o is v.pick else 6, ls="none",
                    color=color, markerfacecolor=color if ok else "white", zorder=4)
            ax.annotate(str(o.label), (o.accuracy, o.conf_ece), xytext=(4, 4), textcoords="offset points",
                        fontsize=7.5, color="0.15" if ok else COSTLY_COLOR)
        xs = [o.accuracy for o in pts]
        ys = [o.conf_ece for o in pts]
        pad = max(0.05, (max(xs) - min(xs)) * 0.25)
        ax.set_xlim(max(0.0, min(xs) - pad), min(1.0, max(xs) + pad))
        ax.set_ylim(0, max(0.05, max(ys) * 1.3))
        ax.set_xlabel("accuracy (higher is better)", fontsize=8)
        ax.set_ylabel("conf-ECE (lower is better)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(True, ls=":", lw=0.5, color="0.8")
        ax.set_title(v.scope, fontsize=9)
        handles = [Patch(facecolor=PICK_COLOR, label="pick"), Patch(facecolor=ACC_COLOR, label="keeps accuracy"),
                   Patch(facecolor="white", edgecolor=COSTLY_COLOR, label="costs accuracy")]
        ax.legend(handles=handles + ax.get_legend_handles_labels()[0], fontsize=6.5, loc="upper left",
                  framealpha=0.85)
    if title:
        fig.suptitle(title, fontsize=10)
    return atomic_savefig(fig, path, dpi=DPI)
