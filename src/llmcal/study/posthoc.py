"""Post-hoc calibrators in a study, and the selective-prediction numbers of every result; no model loaded.

For every model (and sweep point) with a complete ``ts`` cell, each method named by the study's
``posthoc:`` key (default: every method of :data:`llmcal.posthoc.METHODS` that runs without the
model, temperature scaling aside: that is the ts cell itself) is fitted on the cell's calibration
predictions (``predictions-calib.jsonl``, the base model on ``data.calib`` or ``data.train``) and
applied to the base model's predictions of each test role (the cell's ``none`` results, the same
questions every other method is measured on).  Batch calibration is fitted on the test predictions
themselves, answers unused.  :func:`llmcal.posthoc.compare_methods` does the fitting and measuring,
with 95% bootstrap intervals and a paired interval of the accuracy change.

Every result summary of study.json (cells and post-hoc rows) also carries ``aurc``,
``acc_at_80``, ``acc_at_50``, ``accuracy_change`` (against the uncalibrated model on the same
questions, with a paired bootstrap interval in ``ci``) and ``risk_coverage`` (the curve at
``RISK_POINTS`` coverages, rounded to 4 decimals: it is there to be drawn).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import LlmcalError
from .grid import EVAL_ROLES, METRIC_KEYS

log = logging.getLogger(__name__)

CALIB_FILE = "predictions-calib.jsonl"
RISK_POINTS = 101
# Post-hoc methods a study cannot add, and why (the config's error says it).
NOT_IN_STUDY = {
    "none": "the uncalibrated model is every study's none row already",
    "ts": "temperature scaling is the study's ts method (methods: ts), fitted on the same predictions",
    "contextual": "contextual calibration needs the model (its content-free prior); run "
                  "`llmcal calibrate --from RUN --method contextual` on a cell instead",
}


def available() -> tuple[str, ...]:
    """The post-hoc methods a study can add, in registry order: fitted on stored predictions alone."""
    from ..posthoc import METHODS

    return tuple(n for n, m in METHODS.items() if m.fit_on in ("calib", "test") and n not in NOT_IN_STUDY)


def check_names(names: Sequence[str]) -> tuple[str, ...]:
    """``names`` in registry order, or ValueError naming the first one a study cannot use and why."""
    import difflib

    ok = available()
    for n in names:
        if n in NOT_IN_STUDY:
            raise ValueError(f"{n!r}: {NOT_IN_STUDY[n]}")
        if n not in ok:
            close = difflib.get_close_matches(n, ok, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown post-hoc method {n!r}{hint}; choose from {', '.join(ok)}, or all, or false")
    return tuple(n for n in ok if n in names)


# ---- selective numbers of one result --------------------------------------------------------
def rounded_curve(curve: dict) -> dict:
    """A risk-coverage dict (``RiskCoverage.to_dict``) with its points rounded to 4 decimals."""
    return {"aurc": curve["aurc"], "coverage": [round(float(x), 4) for x in curve["coverage"]],
            "risk": [round(float(x), 4) for x in curve["risk"]]}


def selective_summary(probs: np.ndarray, answers: np.ndarray, base: np.ndarray | None, *, n_bootstrap: int,
                      seed: int, need_aurc_ci: bool = True) -> dict:
    """AURC, accuracy at 80% / 50% coverage, the risk-coverage curve and, when ``base`` (the uncalibrated
    probabilities of the same questions, same order) is given, the accuracy change; ``ci`` holds the
    intervals of AURC (when ``need_aurc_ci``) and of the change (paired: the same resamples for both)."""
    from ..metrics import accuracy, aurc, bootstrap_ci, bootstrap_diff_ci, risk_coverage_curve, selective_accuracy

    curve = risk_coverage_curve(probs, answers)
    out = {"aurc": curve.aurc, "acc_at_80": selective_accuracy(probs, answers, 0.8),
           "acc_at_50": selective_accuracy(probs, answers, 0.5), "ci": {},
           "risk_coverage": rounded_curve(curve.to_dict(RISK_POINTS))}
    if need_aurc_ci and n_bootstrap > 0:
        out["ci"]["aurc"] = list(bootstrap_ci(aurc, probs, answers, n_resamples=n_bootstrap, seed=seed))
    if base is not None:
        out["accuracy_change"] = accuracy(probs, answers) - accuracy(base, answers)
        if n_bootstrap > 0:
            out["ci"]["accuracy_change"] = list(bootstrap_diff_ci(accuracy, base, probs, answers,
                                                                  n_resamples=n_bootstrap, seed=seed))
    return out


def paired_base(preds: list, base_preds: list) -> np.ndarray | None:
    """The base predictions' probabilities in the order of ``preds`` (matched by id), or None when the two
    files do not hold the same questions with the same answers."""
    from ..predictions import stack_probs

    by_id = {p.id: p for p in base_preds}
    if len(by_id) != len(preds) or any(p.id not in by_id or by_id[p.id].answer != p.answer for p in preds):
        return None
    probs, _ = stack_probs([by_id[p.id] for p in preds])
    return probs


# ---- the post-hoc rows ----------------------------------------------------------------------
def _compare(calib: list, test: list, names: Sequence[str], **kw) -> tuple[list, dict]:
    """(rows of ``names``, {name: why it was left out}): all at once, or one by one when one of them fails."""
    from ..posthoc import compare_methods

    try:
        return compare_methods(calib, test, list(names), **kw).rows[1:], {}
    except LlmcalError:
        rows, skipped = [], {}
        for n in names:
            try:
                rows += compare_methods(calib, test, [n], **kw).rows[1:]
            except LlmcalError as e:
                skipped[n] = str(e)
        return rows, skipped


def _summary(row) -> dict:
    m = row.metrics
    out = {k: m.get(k) for k in METRIC_KEYS}
    out.update(aurc=m.get("aurc"), acc_at_80=m.get("acc_at_80"), acc_at_50=m.get("acc_at_50"),
               smece=m.get("smece"), accuracy_change=row.accuracy_change)
    out["ci"] = {**{k: v for k, v in row.ci.items() if v is not None}, "accuracy_change": row.accuracy_change_ci}
    out["reliability"] = m.get("reliability")
    out["risk_coverage"] = rounded_curve(row.risk_coverage)
    return out


def posthoc_entry(root: Path, cell: dict, names: Sequence[str]) -> dict:
    """The post-hoc methods of one complete ts cell (an entry of study.json's ``posthoc.entries``)."""
    from ..predictions import load_predictions
    from ..runs import load_run

    run = root / cell["run"]
    entry = {"model": cell["model"], "point": cell["point"], "source": cell["run"], "calib_file": CALIB_FILE,
             "methods": {}, "skipped": {}}
    if not (run / CALIB_FILE).is_file():
        entry["error"] = f"{cell['run']}/{CALIB_FILE} is missing: nothing to fit on"
        return entry
    rec = load_run(run)
    cfg = rec.config
    kw = {"n_bins": int(cfg.get("n_bins") or 10), "n_bootstrap": min(int(cfg.get("n_bootstrap") or 1000), 1000),
          "seed": int(cfg.get("seed") or 0)}
    calib = load_predictions(run / CALIB_FILE)
    entry["calib_n"] = len(calib)
    from ..posthoc import METHODS

    for res in rec.results:
        if res.label != "none" or res.dataset not in EVAL_ROLES:
            continue
        rows, skipped = _compare(calib, load_predictions(run / res.predictions), names, **kw)
        for n, why in skipped.items():
            entry["skipped"][n] = f"{res.dataset}: {why}"
        for r in rows:
            info = METHODS[r.method]
            e = entry["methods"].setdefault(r.method, {"label": info.label, "source": info.source,
                                                      "fit_on": r.fit_on, "params": {}, "results": {}})
            e["results"][res.dataset] = _summary(r)
            e["params"][res.dataset] = r.params
    # registry order, whatever order the roles produced them in
    entry["methods"] = {n: _finite(entry["methods"][n]) for n in names if n in entry["methods"]}
    return entry


def _finite(obj):
    """``obj`` with NaN and infinities as None (an empty bin's accuracy): study.json stays strict JSON."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if np.isfinite(obj) else None
    return obj


def posthoc_section(root: Path, cells: list[dict], names: Sequence[str]) -> dict:
    """study.json's ``posthoc``: the methods asked for and one entry per model and point (from its first
    complete ts cell: a second ts method of the same model would fit the same predictions again)."""
    entries, seen = [], set()
    if names:
        for c in cells:
            if c["kind"] == "ts" and c["status"] == "complete" and (c["model"], c["point"]) not in seen:
                seen.add((c["model"], c["point"]))
                try:
                    entries.append(posthoc_entry(root, c, names))
                except LlmcalError as e:  # a broken cell costs its rows, not the report
                    log.warning("post-hoc methods of %s: %s", c["name"], e)
                    entries.append({"model": c["model"], "point": c["point"], "source": c["run"], "methods": {},
                                    "skipped": {}, "error": str(e)})
    return {"methods": list(names), "entries": entries}


# ---- what the numbers say -------------------------------------------------------------------
def _ci_text(ci) -> str:
    return f" [{ci[0]:.3f}, {ci[1]:.3f}]" if isinstance(ci, (list, tuple)) and None not in ci else ""


def best_rows(doc: dict) -> list[str]:
    """Per model, point and test role: the row (study method or post-hoc) with the lowest conf-ECE, its
    interval, its accuracy change, and the uncalibrated and ts conf-ECE beside it (Markdown, computed)."""
    from .collect import PREFIX, method_rows
    from .grid import DOMAIN
    from .util import group_label

    rows = [r for r in method_rows(doc, posthoc=True) if r["status"] == "complete"]
    out = []
    for m in doc["models"]:
        for p in doc["points"]:
            mine = [r for r in rows if (r["model"], r["point"]) == (m, p)]
            for role, pre in PREFIX.items():
                have = [r for r in mine if r.get(f"{pre}_conf_ece") is not None]
                if not have:
                    continue
                # The same rule as the reports' verdict: a method whose accuracy-change interval lies
                # below 0 or ends at it costs accuracy and is not picked, however low its conf-ECE.
                kept, left_out = [], []
                for r in have:
                    (kept if _keeps_accuracy(r, pre) else left_out).append(r)
                if not kept:
                    continue
                best = min(kept, key=lambda r: r[f"{pre}_conf_ece"])
                s = (f"**{group_label(m, p)}, {DOMAIN[role]}**: {best['method']}, conf-ECE "
                     f"{best[f'{pre}_conf_ece']:.3f}{_ci_text(best.get(f'{pre}_conf_ece_ci'))}")
                change = best.get(f"{pre}_accuracy_change")
                if change is not None:
                    s += f", accuracy change {change:+.3f}{_ci_text(best.get(f'{pre}_accuracy_change_ci'))}"
                ref = [f"{r['method']} {r[f'{pre}_conf_ece']:.3f}" for r in have
                       if r["kind"] in ("none", "ts") and r is not best]
                posthoc = [r for r in kept if r["kind"] == "posthoc"]
                if posthoc and best["kind"] != "posthoc":
                    b = min(posthoc, key=lambda r: r[f"{pre}_conf_ece"])
                    ref.append(f"best post-hoc {b['method']} {b[f'{pre}_conf_ece']:.3f}")
                cheaper = [r for r in left_out if r[f"{pre}_conf_ece"] < best[f"{pre}_conf_ece"]]
                if cheaper:
                    ref.append("left out for costing accuracy: " + ", ".join(
                        f"{r['method']} {r[f'{pre}_conf_ece']:.3f} at {r[f'{pre}_accuracy_change']:+.3f}"
                        f"{_ci_text(r.get(f'{pre}_accuracy_change_ci'))}" for r in cheaper))
                out.append(s + (f" ({'; '.join(ref)})" if ref else "") + ".")
    return out


def _keeps_accuracy(row: dict, pre: str) -> bool:
    """``report.verdict.keeps_accuracy`` on a study row; a row without an accuracy change (the base) is kept."""
    from ..report.verdict import Option, keeps_accuracy

    change = row.get(f"{pre}_accuracy_change")
    if change is None:
        return True
    return keeps_accuracy(Option(row["method"], accuracy_change=change,
                                 accuracy_change_ci=row.get(f"{pre}_accuracy_change_ci")))
