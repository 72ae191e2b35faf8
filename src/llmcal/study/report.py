"""A study's report: report.md and a self-contained report.html from study.json's numbers, and the figures.

``write_report`` lays the report out as a :class:`llmcal.report.engine.Document` (the engine run reports
share): the verdict box first (per model and sweep point: over- or underconfident by how much, which method
to use among those that keep accuracy, the Pareto front, the before/after reliability diagram), then the
tables, the post-hoc calibrators, figures, the regime diagnosis and the sizes.
"""
from __future__ import annotations

import re
from pathlib import Path

from ..io import atomic_write_json, atomic_write_text
from ..report.engine import Document
from .collect import method_rows
from .grid import DOMAIN, EVAL_ROLES, REGIME, TRAINING
from .util import fmt_time, group_label, rel

COLUMNS_PAPER = [("id_accuracy", "ID acc"), ("id_conf_ece", "ID conf-ECE"), ("id_cw_ece", "ID cw-ECE"),
                 ("ood_accuracy", "OOD acc"), ("ood_conf_ece", "OOD conf-ECE"), ("ood_cw_ece", "OOD cw-ECE"),
                 ("drift", "drift (KL)")]
COLUMNS_DOMAIN = [("n", "N"), ("accuracy", "accuracy"), ("accuracy_change", "Δ acc"), ("conf_ece", "conf-ECE"),
                  ("cw_ece", "cw-ECE"), ("brier", "Brier"), ("nll", "NLL"), ("mean_conf", "mean conf"),
                  ("aurc", "AURC"), ("acc_at_80", "acc@80%"), ("acc_at_50", "acc@50%")]
VERDICT_PARETO = "verdict-pareto.png"
VERDICT_RELIABILITY = "verdict-reliability.png"
# The before/after diagram of the verdict box shows at most this many models / sweep points.
VERDICT_GROUPS_SHOWN = 4


def _domain_rows(rows: list[dict], role: str) -> list[dict]:
    out = []
    for r in rows:
        res = r["results"].get(role)
        if not res:
            continue
        d = {"model": r["model"], "point": r["point"], "method": r["method"]}
        for k, _ in COLUMNS_DOMAIN:
            d[k] = res.get(k)
            if (res.get("ci") or {}).get(k) is not None:
                d[f"{k}_ci"] = res["ci"][k]
        out.append(d)
    return out


def _groups(doc: dict) -> list[tuple[str, str]]:
    return [(m, p) for m in doc["models"] for p in doc["points"]
            if any(e["model"] == m and e["point"] == p for e in doc["cells"])]


# ---- figures -------------------------------------------------------------------------------
def _figures(doc: dict, rows: list[dict], root: Path) -> dict[str, Path]:
    from ..report.plots import reliability_grid

    written: dict[str, Path] = {}
    for old in [*root.glob("plane*.png"), *root.glob("reliability-*.png"), *root.glob("risk-coverage*.png"),
                *root.glob("verdict-*.png")]:
        old.unlink()  # figures of an earlier version of the study must not linger
    groups = _groups(doc)
    method_cols: list[str] = []
    for r in rows:
        if r["method"] not in method_cols and r["status"] == "complete":
            method_cols.append(r["method"])
    for role in EVAL_ROLES:
        grid, labels = [], []
        for m, p in groups:
            line = []
            for col in method_cols:
                r = next((r for r in rows if (r["model"], r["point"], r["method"]) == (m, p, col)), None)
                res = (r or {}).get("results", {}).get(role)
                line.append((col, {**res, "ci": res.get("ci")}) if res and res.get("reliability") else None)
            if any(c is not None for c in line):
                grid.append(line)
                labels.append(group_label(m, p))
        if grid:
            name = f"reliability-{DOMAIN[role]}.png"
            written[f"grid:{role}"] = reliability_grid(None, root / name, grid=grid, row_labels=labels,
                                                       title=f"{doc['name']}: {DOMAIN[role]} ({role})")
    written.update(_risk_coverage_figures(doc, method_rows(doc, posthoc=True), root, groups))
    diag = {(d["model"], d["point"]): d for d in doc["diagnoses"]}
    # One plane with every run (in-domain and OOD), then one per model and point with its regime boundary.
    points = []
    for r in rows:
        for role in EVAL_ROLES:
            res = r["results"].get(role)
            if res and res.get("accuracy") is not None:
                points.append({"label": r["method"], "accuracy": res["accuracy"], "conf_ece": res["conf_ece"],
                               "group": f"{group_label(r['model'], r['point'])}, {DOMAIN[role]}",
                               "ci": res.get("ci"), "_key": (r["model"], r["point"])})
    if points:
        only = list(diag.values())[0] if len(diag) == 1 else None
        written["plane"] = _plane(points, root / "plane.png", only, f"{doc['name']}: every run")
        for m, p in groups if len(groups) > 1 else []:
            pts = [x for x in points if x["_key"] == (m, p)]
            if pts and (m, p) in diag:
                name = "plane-" + re.sub(r"[^A-Za-z0-9._-]+", "-", group_label(m, p).replace(" · ", "-")) + ".png"
                written[f"plane:{m}:{p}"] = _plane(pts, root / name, diag[(m, p)],
                                                   f"{group_label(m, p)}: accuracy vs conf-ECE")
    return written


def _risk_coverage_figures(doc: dict, rows: list[dict], root: Path, groups: list) -> dict[str, Path]:
    """Per domain and model (and point): one risk-coverage plot, one curve per method with a stored curve."""
    from ..report.plots import risk_coverage_plot

    written = {}
    for role in EVAL_ROLES:
        for m, p in groups:
            curves = [(r["method"], r["results"][role]["risk_coverage"]) for r in rows
                      if (r["model"], r["point"]) == (m, p) and r["status"] == "complete"
                      and (r["results"].get(role) or {}).get("risk_coverage")]
            if not curves:
                continue
            slug = "" if len(groups) == 1 else "-" + re.sub(r"[^A-Za-z0-9._-]+", "-",
                                                            group_label(m, p).replace(" · ", "-"))
            written[f"risk:{role}:{m}:{p}"] = risk_coverage_plot(
                curves, root / f"risk-coverage-{DOMAIN[role]}{slug}.png",
                title=f"{group_label(m, p)}: {DOMAIN[role]} ({role})")
    return written


def _plane(points: list[dict], path: Path, d: dict | None, title: str) -> Path:
    from ..report.plots import accuracy_ece_plane

    pts = [{k: v for k, v in x.items() if k != "_key"} for x in points]
    if d is None:
        return accuracy_ece_plane(pts, path, title=title)
    a = float(d["train_accuracy"])
    return accuracy_ece_plane(pts, path, boundary=lambda x: max(a - x, 0.0),
                              boundary_label=f"SFT bound: train acc {a:.2f} − accuracy", title=title)


# ---- the verdict ---------------------------------------------------------------------------
def _option(row: dict, role: str):
    from ..report.verdict import Option

    res = row["results"].get(role) or {}
    ci = res.get("ci") or {}

    def pair(k):
        v = ci.get(k)
        return tuple(v) if isinstance(v, (list, tuple)) and len(v) == 2 and None not in v else None

    change, change_ci = res.get("accuracy_change"), pair("accuracy_change")
    if row["kind"] == "none":  # the uncalibrated model is its own reference
        change, change_ci = 0.0, (0.0, 0.0)
    return Option(label=row["method"], kind=row["kind"], n=res.get("n"), accuracy=res.get("accuracy"),
                  accuracy_ci=pair("accuracy"), conf_ece=res.get("conf_ece"), conf_ece_ci=pair("conf_ece"),
                  mean_conf=res.get("mean_conf"), accuracy_change=change, accuracy_change_ci=change_ci,
                  metrics=res if res.get("reliability") else None)


def _gap_ci(res: dict, root: Path, n_bootstrap: int, seed: int):
    """The interval of mean confidence − accuracy from the result's predictions file (None without it)."""
    from ..errors import LlmcalError
    from ..predictions import load_predictions, stack_probs
    from ..report.verdict import gap_interval

    pred = res.get("predictions")
    if not pred or not (root / pred).is_file():
        return None
    try:
        probs, answers = stack_probs(load_predictions(root / pred))
    except LlmcalError:
        return None
    return gap_interval(probs, answers, n_bootstrap=n_bootstrap, seed=seed)


def verdicts(doc: dict, root: Path) -> list[tuple[str, str, str, object]]:
    """(model, point, role, Verdict) per model, sweep point and test role with an uncalibrated row: every
    complete method of the study and every post-hoc row measured on the same questions."""
    from ..report.verdict import decide

    rows = [r for r in method_rows(doc, posthoc=True) if r["status"] == "complete"]
    defaults = (doc.get("config") or {}).get("defaults") or {}
    n_bootstrap = min(int(defaults.get("n_bootstrap") or 1000), 1000)
    seed = int(doc.get("seed") or 0)
    groups = _groups(doc)
    out = []
    for role in EVAL_ROLES:
        for m, p in groups:
            mine = [r for r in rows if (r["model"], r["point"]) == (m, p) and (r["results"].get(role) or {})
                    .get("accuracy") is not None]
            base = next((r for r in mine if r["kind"] == "none"), None)
            if base is None:
                continue
            scope = DOMAIN[role] if len(groups) == 1 else f"{group_label(m, p)}, {DOMAIN[role]}"
            v = decide(scope, _option(base, role), [_option(r, role) for r in mine if r is not base],
                       _gap_ci(base["results"][role], root, n_bootstrap, seed))
            out.append((m, p, role, v))
    return out


def _verdict_figures(vs: list, root: Path, name: str) -> dict[str, Path]:
    from ..report.plots import pareto_plot, reliability_grid

    written = {}
    ind = [v for _, _, role, v in vs if role == "test"] or [v for *_, v in vs]
    with_options = [v for v in ind if v.options]
    if with_options:
        written["verdict:pareto"] = pareto_plot(with_options, root / VERDICT_PARETO,
                                                ncols=1 if len(with_options) <= 2 else 2)
    grid, labels = [], []
    for v in ind[:VERDICT_GROUPS_SHOWN]:
        if not (v.base.metrics or {}).get("reliability"):
            continue
        line = [(f"before: {v.base.label}", v.base.metrics)]
        line.append((f"after: {v.pick.label}", v.pick.metrics) if v.pick is not None and v.pick.metrics else None)
        grid.append(line)
        labels.append(v.scope)
    if grid:
        written["verdict:reliability"] = reliability_grid(None, root / VERDICT_RELIABILITY, grid=grid,
                                                          row_labels=labels if len(grid) > 1 else None)
    return written


def _verdict_box(r: Document, doc: dict, vs: list, figs: dict, root: Path) -> None:
    from ..report.verdict import RULE_TEXT, advice_text, confidence_text

    diag = {(d["model"], d["point"]): d for d in doc["diagnoses"]}

    def regime(d: dict) -> str:
        return f"Regime: {d['regime']} (recommended `{d['recommended']}`; see Regime diagnosis)."

    lines = []
    for m, p, role, v in vs:
        d = diag.pop((m, p), None) if role == "test" else None
        lines.append(f"**{v.scope}**: {confidence_text(v)} {advice_text(v)}" + (f" {regime(d)}" if d else ""))
    lines += [f"**{group_label(m, p)}**: {regime(d)}" for (m, p), d in diag.items()]
    if not lines:
        lines = ["No verdict: no complete cell has the uncalibrated model's results."]
    inner, side = [], []
    if "verdict:pareto" in figs:
        inner.append((rel(figs["verdict:pareto"], root), "accuracy against conf-ECE: the Pareto front",
                      RULE_TEXT + (" In-domain." if any(role == "ood" for *_, role, _ in vs) else "")))
    if "verdict:reliability" in figs:
        shown = sum(1 for _, _, role, _ in vs if role == "test")
        more = (f" The first {VERDICT_GROUPS_SHOWN} of {shown}; every diagram is under Reliability diagrams."
                if shown > VERDICT_GROUPS_SHOWN else "")
        side.append((rel(figs["verdict:reliability"], root), "reliability diagram before and after",
                     "In-domain reliability before (the uncalibrated model) and after the pick. Bars: accuracy "
                     "per confidence bin; dashed: perfect calibration; red: overconfidence; green: "
                     "underconfidence." + more))
    r.verdict("Verdict", lines, side=side, inner=inner)


# ---- the report ----------------------------------------------------------------------------
def write_report(doc: dict, root: Path) -> dict[str, Path]:
    """DIR/report.md, DIR/report.html (self-contained), the figures and DIR/study.json from ``collect``'s dict."""
    root = Path(root)
    rows = method_rows(doc)
    figs = _figures(doc, rows, root)
    vs = verdicts(doc, root)
    figs.update(_verdict_figures(vs, root, doc["name"]))
    doc = {**doc, "figures": {k: rel(v, root) for k, v in figs.items()}}
    atomic_write_json(root / "study.json", doc)
    has_point = any(doc["points"])
    has_ood = any(r["results"].get("ood") for r in rows)
    one_model = len(doc["models"]) == 1
    ident = ([] if one_model else [("model", "model")]) + ([("point", "point")] if has_point else []) + \
        [("method", "method")]
    group = ("model", "point")

    r = Document(root, f"llmcal study {doc['name']}")
    r.h(1, f"llmcal study `{doc['name']}`")
    _verdict_box(r, doc, vs, figs, root)
    if doc["description"]:
        r.p(doc["description"])
    done = sum(e["status"] == "complete" for e in doc["cells"])
    cfg_name = Path(doc["config_file"]).name
    r.ul([f"**config**: `{cfg_name}`" + (" (copied to `study.yaml`)" if cfg_name != "study.yaml" else ""),
          ("**model**: " if one_model else "**models**: ")
          + "; ".join(f"{k} = `{v['model']}`" for k, v in doc["models"].items()),
          "**methods**: " + ", ".join(f"{k} ({v['method']})" if k != v["method"] else k
                                      for k, v in doc["methods"].items()),
          f"**cells**: {done} of {len(doc['cells'])} complete; total wall time {fmt_time(doc['wall_s_total'])}",
          f"**llmcal** {doc['llmcal_version']}; updated {doc['updated']}"])
    missing = [e for e in doc["cells"] if e["status"] != "complete"]
    if missing:
        r.p("**Not complete**: " + "; ".join(f"{e['name']} ({e['status']}"
                                               + (f": {e['error']}" if e.get("error") else "") + ")"
                                               for e in missing))

    complete = [x for x in rows if x["status"] == "complete"]
    has_drift = any(x.get("drift") is not None for x in complete)
    r.h(2, "Results (the paper's layout)")
    r.p("Per " + ("" if one_model else "model and ") + "method: in-domain (ID, `data.test`)"
        + (" and out-of-domain (OOD, `data.ood`)" if has_ood else "")
        + " accuracy, conf-ECE and cw-ECE with 95% bootstrap intervals"
        + (", and the alignment drift of the fine-tuned models (mean per-token KL between the original and the "
           "calibrated model on the original's greedy answers to the shipped instruction prompts; none and ts do "
           "not change the model's generations)." if has_drift else "."))
    cols = ident + [c for c in COLUMNS_PAPER if (has_ood or not c[0].startswith("ood"))
                    and (has_drift or c[0] != "drift")]
    r.table(complete, cols, group=group)
    posthoc_rows = method_rows(doc, posthoc=True)
    for role in EVAL_ROLES:
        drows = _domain_rows(posthoc_rows, role)
        if drows:
            r.h(3, f"{DOMAIN[role].capitalize()} ({role}): all metrics")
            r.p(DOMAIN_TEXT)
            r.table(drows, ident + COLUMNS_DOMAIN, group=group)

    r.h(2, "Post-hoc calibrators")
    _posthoc_section(r, doc, has_point, vs)
    if doc.get("conformal"):
        r.h(2, "Conformal prediction sets")
        _conformal_section(r, doc)
    r.h(2, "Selective prediction (risk-coverage)")
    _risk_section(r, doc, figs, root)

    r.h(2, "Reliability diagrams")
    for role in EVAL_ROLES:
        if f"grid:{role}" in figs:
            r.img(rel(figs[f"grid:{role}"], root), f"reliability grid {DOMAIN[role]}",
                  f"{DOMAIN[role].capitalize()}: rows are models"
                  + (" and sweep points" if has_point else "") + ", columns methods. Bars: accuracy per "
                  "confidence bin; dashed: perfect calibration; red: overconfidence; green: underconfidence.")

    r.h(2, "Accuracy vs conf-ECE")
    if "plane" in figs:
        diags = doc["diagnoses"]
        if len(diags) == 1:
            text = _boundary_caption(diags[0])
        elif diags:
            text = "Each model's regime boundary is drawn in its own plane below."
        else:
            text = "No regime boundary: nothing was diagnosed (see Regime diagnosis)."
        r.img(rel(figs["plane"], root), "accuracy-ECE plane",
              f"Every run, in-domain and OOD, with 95% intervals. {text}")
    for key, p in figs.items():
        if key.startswith("plane:"):
            _, m, pt = key.split(":", 2)
            d = next(x for x in doc["diagnoses"] if x["model"] == m and x["point"] == pt)
            r.img(rel(p, root), f"accuracy-ECE plane {group_label(m, pt)}",
                  f"{group_label(m, pt)}. {_boundary_caption(d)}")

    r.h(2, "Regime diagnosis")
    _diagnosis_section(r, doc, has_point)
    r.h(2, "Sizes and time")
    _sizes_section(r, doc, has_point)

    from ..report.runreport import DEFINITIONS

    r.h(2, "Definitions")
    r.p(DEFINITIONS)
    written = dict(figs)
    written["md"] = atomic_write_text(root / "report.md", r.markdown())
    written["html"] = atomic_write_text(root / "report.html", r.html())
    written["json"] = root / "study.json"
    return written


DOMAIN_TEXT = (
    "Rows after the study's methods are the post-hoc calibrators (see Post-hoc calibrators). *Δ acc*: accuracy "
    "minus the uncalibrated model's on the same questions, with a paired 95% bootstrap interval. *AURC*: area "
    "under the risk-coverage curve (lower is better); *acc@80%* / *acc@50%*: accuracy on the 80% / 50% most "
    "confident questions.")


def _posthoc_section(r: Document, doc: dict, has_point: bool, vs: list) -> None:
    from ..report.verdict import advice_text

    ph = doc.get("posthoc") or {}
    if not ph.get("methods"):
        r.p("Off (`posthoc: false` in the study config).")
        return
    entries = ph.get("entries") or []
    if not entries:
        r.p("None: the post-hoc calibrators are fitted on a ts cell's calibration predictions, and the study has "
            "no complete ts cell.")
        return
    r.p("Fitted on the stored predictions of each model's ts cell, no model loaded: on its calibration "
        "predictions (`predictions-calib.jsonl`, the base model on `data.calib`, or `data.train` when there is "
        "none) and applied to the base model's predictions of each test role, the questions every other row is "
        "measured on. Batch calibration is fitted on the test predictions themselves, answers unused. Vector, "
        "matrix and bias scaling and batch calibration can change the argmax (Δ acc); Platt, isotonic and "
        "histogram binning recalibrate the top confidence only. Formulas and sources: docs/posthoc.md; "
        "`posthoc:` in the study config chooses the methods.")
    seen, mrows = set(), []
    for e in entries:
        for name, m in e["methods"].items():
            if name not in seen:
                seen.add(name)
                mrows.append({"method": name, "what": m["label"], "source": m["source"], "fit on": m["fit_on"]})
    r.table(mrows, ["method", "what", "source", "fit on"])
    notes = [f"**{group_label(e['model'], e['point'])}**: " + (e["error"] if e.get("error") else
             "; ".join(f"{k} left out ({v})" for k, v in e["skipped"].items()))
             for e in entries if e.get("error") or e.get("skipped")]
    r.ul(notes)
    r.p("Lowest conf-ECE per model and domain among the rows of the tables above that keep accuracy (a paired "
        "accuracy change whose interval lies above 0 or has 0 inside it; one that ends at 0 counts as a loss):")
    r.ul([f"**{group_label(m, p)}, {DOMAIN[role]}**: {advice_text(v)}" for m, p, role, v in vs])


def _conformal_section(r: Document, doc: dict) -> None:
    from .conformal import conformal_rows

    cf = doc["conformal"]
    r.p(f"Split conformal prediction sets, score `{cf['score']}`, alpha {cf['alpha']:g} (target coverage "
        f"{1 - cf['alpha']:g}), on each cell's stored predictions of a test role: {cf['calib_fraction']:.0%} of "
        "its questions (the held-out rule, the study's seed) calibrate, the rest are measured, the same questions "
        "for every method, so the rows compare set sizes at the same guaranteed coverage. *coverage*: share of "
        "test questions whose answer is in its set, 95% Clopper-Pearson interval; *expected*: the central 95% "
        "range of that share under exchangeability; *size*: mean number of options in a set. docs/posthoc.md#conformal.")
    cols = [("model", "model"), ("point", "point"), ("domain", "domain"), ("method", "method"), ("n_calib", "N calib"),
            ("n", "N test"), ("coverage", "coverage"), ("expected", "expected"), ("mean_size", "size"),
            ("singleton_share", "singletons"), ("empty_share", "empty")]
    rows = conformal_rows(doc)
    if not any(x["point"] for x in rows):
        cols = [c for c in cols if c[0] != "point"]
    if len(doc["models"]) == 1:
        cols = [c for c in cols if c[0] != "model"]
    r.table(rows, cols, group=("model", "point", "domain"))
    errors = [f"{e['model']} {e['method']} ({e['role']}): {e['error']}" for e in cf["entries"] if e.get("error")]
    r.ul(errors)


def _risk_section(r: Document, doc: dict, figs: dict, root: Path) -> None:
    keys = [k for k in figs if k.startswith("risk:")]
    if not keys:
        r.p("No risk-coverage curves: no result has its predictions file.")
        return
    r.p("Selective risk (the error rate on the questions answered) when only the most confident questions are "
        "answered, against coverage (the share answered); one curve per method, AURC in the legend. A method "
        "that keeps the argmax changes the curve only by ranking the questions differently.")
    for k in keys:
        _, role, m, p = k.split(":", 3)
        r.img(rel(figs[k], root), f"risk-coverage {group_label(m, p)} {DOMAIN[role]}",
              f"{group_label(m, p)}, {DOMAIN[role]} ({role}).")


def _diagnosis_section(r: Document, doc: dict, has_point: bool) -> None:
    if doc["diagnoses"]:
        r.p("For each model, the fine-tuned model (the `regime.from` cell) is scored on the questions it was "
            "trained on; train accuracy − in-domain test accuracy is the gap. The verdict is on the *added* gap "
            "(the gap minus the base model's own gap on the same questions) and its 95% paired bootstrap "
            "interval: at or below the tolerance *calibratable* (CFT suffices), above it *non-calibratable* "
            "(RCFT recommended), straddling it *undetermined* (more questions would settle it). The last columns "
            "are what the fine-tuning cells actually measured on the in-domain test set.")
        drows = []
        for d in doc["diagnoses"]:
            row = {"model": d["model"], "point": d["point"], "from": d["source"].split("/")[-1],
                   "train acc": d["train_accuracy"], "held-out acc": d["heldout_accuracy"],
                   "held-out ECE": d["heldout_ece"], "gap": d["gap"], "base gap": d.get("base_gap"),
                   "added gap": d.get("added_gap", d["gap"]),
                   "interval": "[{:+.3f}, {:+.3f}]".format(*d["interval"]) if d.get("interval") else "–",
                   "ECE bound": d["ece_lower_bound"],
                   "tolerance": d["tolerance"], "regime": d["regime"], "recommended": d["recommended"]}
            for meth, v in d["measured"].items():
                row[f"{meth} ECE"] = v.get("conf_ece")
            drows.append(row)
        keys = []
        for row in drows:
            keys += [k for k in row if k not in keys]
        if not has_point:
            keys.remove("point")
        if len(doc["models"]) == 1:
            keys.remove("model")
        r.table(drows, keys, group=("model",))
        r.ul([f"**{group_label(d['model'], d['point'])}**: {d['reason']}" for d in doc["diagnoses"]])
    else:
        r.p(_no_diagnosis(doc))
    if doc["auto"]:
        items = []
        for a in doc["auto"]:
            sw = a["switched"]
            what = (f"RCFT term switched on at epoch {sw['epoch']:.2f} (step {sw['step']}): {sw['reason']}" if sw
                    else "stayed in the calibratable regime; CFT throughout")
            items.append(f"**{group_label(a['model'], a['point'])}** ({a['method']}): {what}; "
                         f"{len(a['checks'])} regime check(s)")
        r.p("Auto mode:")
        r.ul(items)


def _no_diagnosis(doc: dict) -> str:
    """Why the study has no regime diagnosis: no fine-tuning cell, the diagnosis switched off, no method to
    diagnose from, or regime cells that did not complete."""
    training = list(dict.fromkeys(e["method"] for e in doc["cells"] if e["kind"] in TRAINING))
    regime = [e for e in doc["cells"] if e["kind"] == REGIME]
    if not training:
        return "No diagnosis: the study has no fine-tuning cell to diagnose (add cft, or set `regime.from`)."
    which = ", ".join(training)
    if not regime:
        if (doc.get("config") or {}).get("regime", {}) is False:
            return (f"Off (`regime: false` in the study config): the fine-tuning cells ({which}) were not "
                    f"diagnosed. `regime: {{from: {training[0]}}}` adds a cell per model that scores the fine-tuned "
                    "model on the questions it trained on; the gap to its test accuracy tells the calibratable "
                    "regime (CFT suffices) from the non-calibratable one (RCFT).")
        return (f"No regime cell: `regime.from` names none of the study's fine-tuning methods (its default is the "
                f"method `cft`); set `regime: {{from: {training[0]}}}` (one of {which}).")
    def why(e: dict) -> str:
        if e["status"] == "complete":
            return f"{e['name']} holds no diagnosis (rerun it)"
        return f"{e['name']} is {e['status']}" + (f" ({e['error']})" if e.get("error") else "")

    return "No diagnosis yet: " + "; ".join(why(e) for e in regime) + "."


def _sizes_section(r: Document, doc: dict, has_point: bool) -> None:
    srows = []
    for pname, roles in doc["data"].items():
        for role, info in roles.items():
            subj = info["subjects"]
            srows.append({"point": pname, "role": role, "questions": info["n"], "subjects": len(subj),
                          "data": "; ".join(_entry_text(e) for e in info["entries"]), "file": info["path"]})
    scols = ([("point", "point")] if has_point else []) + [("role", "role"), ("questions", "questions"),
                                                           ("subjects", "subjects"), ("data", "selection"),
                                                           ("file", "file")]
    r.table(srows, scols)
    crows = []
    for e in doc["cells"]:
        t = e.get("training") or {}
        crows.append({"cell": e["name"], "status": e["status"], "wall time": fmt_time(e.get("wall_s")),
                      "train q": t.get("n_train"), "held-out q": t.get("n_heldout"), "epochs": t.get("epochs"),
                      "steps": t.get("global_step"), "T": e.get("temperature"), "template": e.get("template"),
                      "dtype": e.get("dtype")})
    r.table(crows, ["cell", "status", "wall time", "train q", "held-out q", "epochs", "steps", "T", "template",
                    "dtype"])
    for pname, roles in doc["data"].items():
        for role, info in roles.items():
            if len(info["subjects"]) > 1:
                lst = ", ".join(f"{s} ({n})" for s, n in sorted(info["subjects"].items()))
                r.p(f"Subjects of {role}" + (f" ({pname})" if pname else "") + f": {lst}.")


def _boundary_caption(d: dict) -> str:
    return (f"The dashed line is the regime boundary for {group_label(d['model'], d['point'])}: "
            f"conf-ECE = max(a_train − accuracy, 0) with a_train = {d['train_accuracy']:.3f}, the accuracy its "
            f"{d['source'].split('/')[-1]} model reached on its own training questions. ECE ≥ |mean confidence − "
            f"accuracy| always, and a model fine-tuned to its SFT fixed point has mean confidence ≈ its training "
            f"accuracy, so such a model cannot sit below the line on unseen questions; RCFT's ECE term is what "
            f"can take a fine-tuned model below it. An added gap (over the base model's) whose interval lies above "
            f"the tolerance ({d['tolerance']:.2f}) is the non-calibratable regime.")


def _entry_text(e: dict) -> str:
    s = e["spec"]
    bits = []
    if e.get("subjects"):
        bits.append(f"{len(e['subjects'])} subjects")
    if e.get("split"):
        bits.append(f"split {e['split']}")
    if e.get("limit"):
        bits.append(f"limit {e['limit']}")
    return s + (f" ({', '.join(bits)})" if bits else "")
