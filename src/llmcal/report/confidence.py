"""The report of ``llmcal compare-confidence``: which confidence source to trust, at what cost.

Built on the one report engine (:class:`~llmcal.report.engine.Document`): ``report.md`` and a self-contained
``report.html`` (images embedded), opening with the verdict, and ``comparison.json`` with every number.

The verdict's rules (:func:`decide`):

- **Best calibrated**: the source with the lowest conf-ECE on all questions. It is called *ahead* of another
  source only when the paired interval of their difference (same bootstrap resamples) lies above 0; otherwise
  the two are *not distinguishable on these questions*, and the verdict says so.
- **Best at ranking**: the source with the highest AUROC (confidence ranking right answers above wrong ones),
  with the same paired rule.
- **Cost**: requests, tokens and seconds per question, as the runs recorded them; "not recorded" otherwise.
- **Post-hoc**: on the held-out part, each source's conf-ECE before calibration and after the calibrator
  chosen for it; the spread across sources before and after says whether calibration closes the gap. The
  calibrator (or none) is chosen by its cross-validated conf-ECE on the calibration part (``cv_conf_ece``),
  so the held-out questions that measure it played no part in choosing it; the table gives every one.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from .tables import SIG, format_value, md_text

DEFINITIONS = (
    "**Sources.** *logprobs*: the option distribution from the letter tokens' log-probabilities. *verbalized*: "
    "the model states a letter and a confidence. *ptrue*: the probability the model gives to its own answer "
    "being true (Kadavath et al. 2022). *consistency*: the share of the sampled answers that name an option "
    "which agree with the modal one; the vote shares are the distribution, exact zeros included. The "
    "prediction is the argmax and the confidence the top probability in every source. **Metrics.** "
    "*conf-ECE*: questions in M equal-width confidence bins, Σ_m |B_m|/N · |acc(B_m) − conf(B_m)|. *AUROC*: "
    "the probability that a right answer has a higher confidence than a wrong one (ties count half). *AURC*: "
    "area under the risk-coverage curve (lower ranks better). Intervals are 95% percentile bootstrap "
    "intervals, the same resamples for every source, so a difference between two sources has a paired "
    "interval. *Parse rate*: share of questions whose response was parsed (after the run's retries). Numbers to 3 significant digits; formulas in docs/posthoc.md."
)


def _n(x, ci=None, *, signed: bool = False) -> str:
    return format_value(None if x is None else float(x), ci, signed=signed, sig=SIG)


def _diff(comp, a: str, b: str, metric: str) -> dict | None:
    """b − a for ``metric`` with its paired interval, whichever order the pair was stored in."""
    for d in comp.differences:
        if (d["a"], d["b"]) == (a, b):
            return d[metric]
        if (d["a"], d["b"]) == (b, a):
            x = d[metric]
            ci = x["ci"]
            return {"diff": None if x["diff"] is None else -x["diff"],
                    "ci": None if ci is None else [-ci[1], -ci[0]]}
    return None


def _ranked(comp, metric: str, best_is_low: bool) -> dict | None:
    """The best source on ``metric`` and, for every other, the paired difference (other − best) and whether the
    best is ahead of it (the interval excludes 0 on the right side)."""
    have = [s for s in comp.sources if s.get(metric) is not None]
    if not have:
        return None
    best = (min if best_is_low else max)(have, key=lambda s: s[metric])
    others = []
    for s in comp.sources:
        if s is best:
            continue
        d = _diff(comp, best["label"], s["label"], metric)
        ci = d["ci"] if d else None
        ahead = ci is not None and (ci[0] > 0 if best_is_low else ci[1] < 0)
        others.append({"label": s["label"], "value": s.get(metric), "diff": d["diff"] if d else None, "ci": ci,
                       "ahead": bool(ahead)})
    return {"label": best["label"], "value": best[metric], "ci": best.get(f"{metric}_ci"), "others": others}


def _cost_text(s: dict) -> str:
    c = s.get("cost")
    if not c:
        return f"{md_text(s['label'])}: not recorded by the run"
    q = c["per_question"]
    parts = []
    if q.get("requests") is not None:
        parts.append(f"{_n(q['requests'])} requests")
    if q.get("prompt_tokens") is not None or q.get("completion_tokens") is not None:
        parts.append(f"{_n(q.get('prompt_tokens'))} prompt + {_n(q.get('completion_tokens'))} completion tokens")
    if q.get("seconds") is not None:
        parts.append(f"{_n(q['seconds'])} s")
    shown = ", ".join(parts) or "not known (the process that finished the run asked nothing)"
    return f"{md_text(s['label'])}: {shown}"


def _chosen_posthoc(s: dict) -> dict:
    """The row with the lowest cross-validated conf-ECE on the calibration part ("none" first, so it wins ties:
    a calibrator must do better than leaving the source alone)."""
    applied = [r for r in s["posthoc"] if r["applied"] and r.get("cv_conf_ece") is not None
               and r.get("conf_ece") is not None]
    return min(applied, key=lambda r: r["cv_conf_ece"])


def decide(comp) -> dict:
    """The verdict as data (``best_calibrated``, ``best_ranking``, ``posthoc``) and as Markdown ``lines``."""
    cal = _ranked(comp, "conf_ece", best_is_low=True)
    rank = _ranked(comp, "auroc", best_is_low=False)
    lines = []
    n = len(comp.ids)

    def against(r: dict, word: str) -> str:
        if not r["others"]:
            return ""
        parts = []
        for o in r["others"]:
            verdict = f"{word} by" if o["ahead"] else "not distinguishable on these questions:"
            parts.append(f"{md_text(o['label'])} {_n(o['value'])} ({verdict} {_n(o['diff'], o['ci'], signed=True)} "
                         f"paired)")
        return "; against " + "; ".join(parts)

    if cal:
        lines.append(f"**Best calibrated: {md_text(cal['label'])}**, conf-ECE {_n(cal['value'], cal['ci'])} on {n} "
                     f"questions{_unparsed(comp, cal['label'])}{against(cal, 'higher')}.")
    if rank:
        lines.append(f"**Best at ranking right above wrong: {md_text(rank['label'])}**, AUROC "
                     f"{_n(rank['value'], rank['ci'])}{_unparsed(comp, rank['label'])}{against(rank, 'lower')}.")
    else:
        lines.append("AUROC is undefined for every source (all answers right, or all wrong).")
    lines.append("Cost per question: " + "; ".join(_cost_text(s) for s in comp.sources) + ".")
    parse = [s for s in comp.sources if s.get("parse")]
    if parse:
        lines.append("Parsed: " + "; ".join(
            f"{md_text(s['label'])} {_rate(s['parse'])}" for s in parse) + ".")

    before = {s["label"]: next(r for r in s["posthoc"] if r["method"] == "none") for s in comp.sources}
    after = {s["label"]: _chosen_posthoc(s) for s in comp.sources}
    post = {"n_calib": comp.split["n_calib"], "n_test": comp.split["n_test"],
            "before": {k: v["conf_ece"] for k, v in before.items()},
            "chosen_by": "cross-validated conf-ECE on the calibration part",
            "after": {k: {"method": v["method"], "conf_ece": v["conf_ece"], "conf_ece_ci": v.get("conf_ece_ci"),
                          "cv_conf_ece": v["cv_conf_ece"]}
                      for k, v in after.items()}}
    if len(comp.sources) > 1:
        b, a = post["before"], {k: v["conf_ece"] for k, v in post["after"].items()}
        post["spread_before"], post["spread_after"] = max(b.values()) - min(b.values()), max(a.values()) - min(a.values())
        lines.append(
            f"Post-hoc, on the {post['n_test']} held-out questions (calibrators fitted on {post['n_calib']}, each "
            f"source's chosen by cross-validation on those): conf-ECE "
            + "; ".join(f"{md_text(k)} {_n(b[k])} → {_n(v['conf_ece'], v['conf_ece_ci'])} ({_after(v['method'])})"
                        for k, v in post["after"].items())
            + f". The spread across sources goes from {_n(post['spread_before'])} to {_n(post['spread_after'])}"
            + (": calibration closes most of the gap." if post["spread_after"] <= post["spread_before"] / 2 else
               ": calibration does not close the gap." if post["spread_after"] >= post["spread_before"] else "."))
    else:
        (k, v), = post["after"].items()
        lines.append(f"Post-hoc, on the {post['n_test']} held-out questions: conf-ECE {_n(post['before'][k])} → "
                     f"{_n(v['conf_ece'], v['conf_ece_ci'])} ({_after(v['method'])}).")
    return {"best_calibrated": cal, "best_ranking": rank, "posthoc": post, "lines": lines}


def _unparsed(comp, label: str) -> str:
    """A warning when some of the source's questions were unparseable: those hold the uniform distribution (the
    run's rule), which is calibrated by construction at chance accuracy, so they flatter its conf-ECE."""
    p = comp.source(label).get("parse") or {}
    if p.get("unparseable"):
        return (f" (but {p['unparseable']} of its {p['n']} questions were unparseable and hold the uniform "
                f"distribution, which flatters its conf-ECE{_lucky(p, ', and ')})")
    return ""


def _lucky(p: dict, lead: str) -> str:
    """The unparseable questions the uniform distribution's tie rule (option A) scores right (accuracy counts
    them), after ``lead``; "" when none."""
    k = p.get("unparseable_correct")
    return f"{lead}{k} of the {p['unparseable']} unparseable count as right by the tie rule (option A)" if k else ""


def _after(method: str) -> str:
    return "no calibrator beat none in cross-validation" if method == "none" else method


def _rate(p: dict) -> str:
    if p.get("parse_rate") is None:
        return "parse count not recorded"
    r = f"{p['n'] - p['unparseable']}/{p['n']} ({100 * p['parse_rate']:.1f}%)"
    if isinstance(p.get("retries"), int):
        r += f", {p['retries']} retries"
    return r + _lucky(p, "; ")


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", s).strip("-").lower() or "source"


def _cost_note(cost: dict, n: int) -> str:
    """What a resumed run's cost covers: its counters and seconds describe fewer questions than it holds."""
    if cost.get("questions_costed") == 0:
        return "the process that finished the run asked nothing: per question not known"
    parts = []
    if cost.get("questions_costed") not in (None, n):
        parts.append(f"requests and tokens over the last {cost['questions_costed']} of {n} questions")
    if cost.get("seconds") is not None and cost.get("questions_timed") not in (None, n):
        parts.append(f"seconds over the last {cost['questions_timed']} of {n} questions (resumed run)")
    return "; ".join(parts)


def write_confidence_report(comp, out: Path) -> dict[str, Path]:
    """``comparison.json``, ``report.md``, ``report.html`` and the figures in ``out``; returns the written paths."""
    from ..io import atomic_write_json, atomic_write_text
    from .engine import Document
    from .plots import method_reliability_grid, reliability_grid, risk_coverage_plot, save_reliability

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    slugs, seen = [], set()
    for s in comp.sources:
        slug, k = _slug(s["label"]), 1
        while slug in seen:
            k += 1
            slug = f"{_slug(s['label'])}-{k}"
        seen.add(slug)
        slugs.append(slug)
    n = len(comp.ids)
    title = f"{comp.model}: confidence sources compared ({n} questions)"

    for s, slug in zip(comp.sources, slugs):
        written[f"reliability:{s['label']}"] = save_reliability(
            s["metrics"]["reliability"], out / f"reliability-{slug}.png", s["label"], s["metrics"])
        rows = [r for r in s["posthoc"] if r["applied"]]
        written[f"posthoc:{s['label']}"] = method_reliability_grid(
            [(r["method"], r["metrics"], None) for r in rows], out / f"posthoc-{slug}.png",
            title=f"{s['label']}: post-hoc calibrators on {comp.split['n_test']} held-out questions")
    written["grid"] = reliability_grid([(s["label"], s["metrics"]) for s in comp.sources],
                                       out / "reliability-sources.png", ncols=min(4, len(comp.sources)))
    written["risk_coverage"] = risk_coverage_plot([(s["label"], s["metrics"]["risk_coverage"]) for s in comp.sources],
                                                  out / "risk-coverage.png", title="risk-coverage by source")

    doc = Document(out, title)
    doc.h(1, md_text(title))
    doc.verdict("Which confidence to trust", comp.verdict["lines"],
                note=("Ahead = the paired 95% interval of the difference excludes 0. The post-hoc 'after' is the "
                      "calibrator with the lowest 5-fold cross-validated conf-ECE on the calibration part, measured "
                      "on the held-out part; the table below gives each."),
                side=[("reliability-sources.png", "reliability diagram per confidence source", "")])
    doc.h(2, "Sources")
    doc.ul([f"**{md_text(s['label'])}**: `{md_text(_relative(s['run'], out))}`"
            + (f"; {md_text(', '.join(f'{k}={v}' for k, v in s['settings'].items()))}" if s["settings"] else "")
            for s in comp.sources])
    rows = []
    for s in comp.sources:
        p = s.get("parse")
        rows.append({**{k: s[k] for k in ("label", "n", "accuracy", "accuracy_ci", "conf_ece", "conf_ece_ci",
                                          "auroc", "auroc_ci", "aurc", "aurc_ci", "mean_conf", "brier", "nll")},
                     "parsed": "no parsing" if p is None else _rate(p), "zero_rows": s["zero_rows"]})
    doc.table(rows, [("label", "source"), "n", "accuracy", "conf_ece", "auroc", "aurc", "mean_conf", "brier", "nll",
                     ("parsed", "parsed"), ("zero_rows", "rows with a 0")])
    doc.h(2, "Cost")
    cost_rows = []
    for s in comp.sources:
        c = s.get("cost")
        if not c:
            cost_rows.append({"label": s["label"], "note": "not recorded by the run"})
            continue
        q = c["per_question"]
        cost_rows.append({"label": s["label"], **{k: c[k] for k in ("requests", "prompt_tokens",
                                                                    "completion_tokens", "seconds")},
                          **{f"{k}_q": q[k] for k in q}, "note": _cost_note(c, s["n"])})
    columns = [("label", "source"), ("requests", "requests"), ("prompt_tokens", "prompt tokens"),
               ("completion_tokens", "completion tokens"), ("seconds", "seconds"),
               ("requests_q", "requests / q"), ("prompt_tokens_q", "prompt tok / q"),
               ("completion_tokens_q", "completion tok / q"), ("seconds_q", "s / q")]
    # the note column only when a row needs one: an empty column reads as a missing value
    doc.table(cost_rows, columns + ([("note", "note")] if any(r["note"] for r in cost_rows) else []))
    if comp.differences:
        doc.h(2, "Paired differences")
        doc.p("b − a on the same questions and the same bootstrap resamples; an interval that excludes 0 is a "
              "difference these questions can tell.")
        doc.table([{"a": d["a"], "b": d["b"],
                    "dece": _n(d["conf_ece"]["diff"], d["conf_ece"]["ci"], signed=True),
                    "dauroc": _n(d["auroc"]["diff"], d["auroc"]["ci"], signed=True)} for d in comp.differences],
                  [("a", "a"), ("b", "b"), ("dece", "Δ conf-ECE"), ("dauroc", "Δ AUROC")])
    doc.h(2, "Reliability diagrams")
    doc.figures([(f"reliability-{slug}.png", f"reliability diagram: {md_text(s['label'])}", md_text(s["label"]))
                 for s, slug in zip(comp.sources, slugs)])
    doc.img("risk-coverage.png", "risk-coverage curves by source")
    doc.h(2, "Post-hoc calibration")
    doc.p(f"Fitted on {comp.split['n_calib']} calibration questions ({md_text(comp.split['rule'])}, seed "
          f"{comp.split['seed']}: the same questions for every source), measured on the other "
          f"{comp.split['n_test']}. CV conf-ECE: 5-fold cross-validated on the calibration questions (each fold "
          f"calibrated by a fit on the others), the number that chooses each source's calibrator in the verdict.")
    prow, skipped = [], []
    for s in comp.sources:
        for r in s["posthoc"]:
            if r["applied"]:
                prow.append({"source": s["label"], "method": r["method"], "cv_conf_ece": r.get("cv_conf_ece"),
                             **{k: r[k] for k in ("accuracy", "accuracy_ci", "conf_ece", "conf_ece_ci", "auroc",
                                                  "auroc_ci", "aurc", "aurc_ci")}})
            else:
                skipped.append(f"{md_text(s['label'])} · {r['method']}: not applied ({md_text(r['reason'])})")
    doc.table(prow, [("source", "source"), "method", ("cv_conf_ece", "CV conf-ECE (calibration part)"), "accuracy",
                     "conf_ece", "auroc", "aurc"], group=("source",))
    doc.ul(skipped)
    doc.figures([(f"posthoc-{slug}.png", f"post-hoc calibrators: {md_text(s['label'])}", md_text(s["label"]))
                 for s, slug in zip(comp.sources, slugs)])
    doc.h(2, "Definitions")
    doc.p(DEFINITIONS)

    files = {k: p.name for k, p in written.items()}
    written["json"] = atomic_write_json(out / "comparison.json", {**comp.to_dict(base=out), "files": files})
    written["md"] = atomic_write_text(out / "report.md", doc.markdown())
    written["html"] = atomic_write_text(out / "report.html", doc.html())
    return written


def _relative(p: str, base: Path) -> str:
    return Path(os.path.relpath(Path(p).resolve(), base.resolve())).as_posix()
