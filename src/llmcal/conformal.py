"""Split conformal prediction sets on a model's option probabilities, with a coverage guarantee.

A conformity score s(x, k) says how unusual option k is as the answer to
question x (higher: less plausible). On n calibration questions with answers
y_i, the scores s_i = s(x_i, y_i) give the threshold

    q = the ceil((n + 1)(1 - alpha))-th smallest s_i        (q = +inf when that rank exceeds n)

and a test question's prediction set is C(x) = {k : s(x, k) <= q}. When the
calibration and test questions are exchangeable, P(y in C(x)) >= 1 - alpha,
and < 1 - alpha + 1/(n + 1) when the scores have no ties (Vovk et al. 2005;
Angelopoulos and Bates, "A Gentle Introduction to Conformal Prediction", 2021).
Given the calibration set, the coverage is Beta(n + 1 - l, l) distributed with
l = floor((n + 1) alpha), so the share of n_test test questions covered has a
beta-binomial distribution: its central 95% range is what "coverage within its
interval" checks.

Scores, with p the question's option probabilities and o(k) the rank of option
k (1 = most probable; tied options count each other as not above):

- ``lac`` (least ambiguous set-valued classifier, Sadinle, Lei and Wasserman
  2019): s(x, k) = 1 - p_k. The smallest sets on average; may be empty.
- ``aps`` (adaptive prediction sets, Romano, Sesia and Candes 2020): s(x, k) =
  sum_j p_j 1{p_j > p_k} + p_k, the probability mass of the options at least as
  probable as k. Non-randomised, so sets include whole tie groups.
- ``raps`` (regularised APS, Angelopoulos, Bates, Malik and Jordan 2021):
  the APS score plus lambda * max(0, o(k) - k_reg), a penalty on low-ranked
  options that shrinks the sets of confident questions.

Mondrian (class-conditional on a group, Vovk 2003): q is computed per group
(e.g. subject) from the group's own calibration questions, so the guarantee
holds within every group; a group with too few calibration questions
(ceil((n_g + 1)(1 - alpha)) > n_g) gets q = +inf, the full set.

Padded options (questions with fewer options than the widest) never enter a
set. The library part works on arrays; :func:`conformal_run` reads a finished
run's stored predictions (no model) and writes ``conformal/``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
import typing
from typing import Literal, Sequence

import numpy as np

from .errors import LlmcalError
from .validation import NonNegativeInt, NonNegativeNumber, OpenFraction, check_value

__all__ = ["SCORES", "SplitConformal", "option_scores", "conformal_quantile", "coverage_summary",
           "clopper_pearson", "coverage_range", "alpha_sweep", "ConformalResult", "conformal_predictions",
           "conformal_run", "conformal_section", "DEFAULT_ALPHAS"]

Score = Literal["lac", "aps", "raps"]
SCORES = typing.get_args(Score)
DEFAULT_ALPHAS = tuple(round(0.02 * i, 2) for i in range(1, 26))  # 0.02 .. 0.50


def _check_alpha(alpha) -> float:
    return float(check_value(OpenFraction, alpha, "alpha"))


def _as_probs(probs, n_options=None) -> tuple[np.ndarray, np.ndarray]:
    """(N, K) probabilities and the (N, K) mask of real options, from a 2-D array or a list of 1-D arrays."""
    if isinstance(probs, np.ndarray) and probs.ndim == 2:
        p = probs.astype(np.float64)
        k = np.full(len(p), p.shape[1]) if n_options is None else np.asarray(n_options, dtype=np.int64)
    else:
        rows = [np.asarray(r, dtype=np.float64).reshape(-1) for r in probs]
        if not rows:
            raise LlmcalError("no questions: probs is empty")
        kmax = max(len(r) for r in rows)
        p = np.zeros((len(rows), kmax))
        for i, r in enumerate(rows):
            p[i, : len(r)] = r
        k = np.array([len(r) for r in rows]) if n_options is None else np.asarray(n_options, dtype=np.int64)
    if p.ndim != 2 or len(p) == 0:
        raise LlmcalError(f"probs must be N x K with N >= 1, got shape {p.shape}")
    if len(k) != len(p) or np.any(k < 1) or np.any(k > p.shape[1]):
        raise LlmcalError("n_options must give, per question, a count between 1 and the number of columns")
    if not np.all(np.isfinite(p)) or p.min() < -1e-9 or p.max() > 1 + 1e-9:
        raise LlmcalError("probs must be finite and lie in [0, 1]")
    mask = np.arange(p.shape[1])[None, :] < k[:, None]
    return np.where(mask, p, 0.0), mask


def option_scores(probs, score: str = "lac", *, n_options=None, lam: float = 0.1, k_reg: int = 1) -> np.ndarray:
    """s(x, k) for every question and option (N x K); padded options get +inf. Scores: module docstring."""
    check_value(Score, score, "conformity score")
    p, mask = _as_probs(probs, n_options)
    if score == "lac":
        s = 1.0 - p
    else:
        # mass of the options strictly more probable than k, plus p_k (ties do not count each other)
        above = (p[:, None, :] > p[:, :, None]) & mask[:, None, :]
        s = (p[:, None, :] * above).sum(axis=2) + p
        if score == "raps":
            lam = check_value(NonNegativeNumber, lam, "RAPS lambda")
            k_reg = check_value(NonNegativeInt, k_reg, "RAPS k_reg")
            rank = above.sum(axis=2) + 1  # 1 = most probable
            s = s + lam * np.maximum(0, rank - int(k_reg))
    return np.where(mask, s, np.inf)


def conformal_quantile(cal_scores, alpha: float) -> float:
    """The ceil((n + 1)(1 - alpha))-th smallest calibration score; +inf when that rank exceeds n."""
    a = _check_alpha(alpha)
    s = np.sort(np.asarray(cal_scores, dtype=np.float64).reshape(-1))
    n = len(s)
    rank = math.ceil((n + 1) * (1 - a) - 1e-12)
    return float(s[rank - 1]) if 1 <= rank <= n else math.inf


def _groups_of(groups, n: int) -> np.ndarray | None:
    if groups is None:
        return None
    g = np.array(["(none)" if x is None else str(x) for x in groups], dtype=object)
    if len(g) != n:
        raise LlmcalError(f"groups has {len(g)} entries but there are {n} questions")
    return g


class SplitConformal:
    """Split conformal prediction sets, scikit-learn style.

    ``fit(probs, answers, groups=None)`` computes ``qhat_`` (and, when
    ``groups`` is given, ``qhat_by_group_``: Mondrian, one threshold per group,
    from that group's calibration questions); ``predict_sets(probs,
    groups=None)`` returns the (N, K) boolean membership matrix. ``probs`` is
    an (N, K) array (``n_options`` for zero-padded rows) or a list of 1-D arrays.
    """

    def __init__(self, alpha: float = 0.1, score: str = "lac", lam: float = 0.1, k_reg: int = 1):
        self.alpha = alpha
        self.score = score
        self.lam = lam
        self.k_reg = k_reg

    def _scores(self, probs, n_options):
        return option_scores(probs, self.score, n_options=n_options, lam=self.lam, k_reg=self.k_reg)

    def fit(self, probs, answers, groups=None, n_options=None) -> "SplitConformal":
        _check_alpha(self.alpha)
        s = self._scores(probs, n_options)
        a = np.asarray(answers, dtype=np.int64).reshape(-1)
        if len(a) != len(s):
            raise LlmcalError(f"probs has {len(s)} rows but answers has {len(a)} entries")
        if np.any(a < 0) or np.any(a >= s.shape[1]) or np.any(~np.isfinite(s[np.arange(len(a)), a])):
            raise LlmcalError("an answer is not one of its question's options")
        true = s[np.arange(len(a)), a]
        self.n_calib_ = len(a)
        self.calib_scores_ = true
        self.qhat_ = conformal_quantile(true, self.alpha)
        g = _groups_of(groups, len(a))
        self.qhat_by_group_ = None
        self.n_calib_by_group_ = None
        if g is not None:
            self.qhat_by_group_ = {str(k): conformal_quantile(true[g == k], self.alpha) for k in sorted(set(g))}
            self.n_calib_by_group_ = {str(k): int(np.sum(g == k)) for k in sorted(set(g))}
        return self

    def thresholds(self, groups=None, n: int | None = None) -> np.ndarray:
        """The q used for each test question: q (marginal) or its group's q (+inf for an unseen group)."""
        if not hasattr(self, "qhat_"):
            raise LlmcalError("SplitConformal is not fitted: call fit() first")
        if groups is None:
            if self.qhat_by_group_ is not None:
                raise LlmcalError("fitted per group (Mondrian): give the test questions' groups")
            return np.full(int(n), self.qhat_)
        if self.qhat_by_group_ is None:
            raise LlmcalError("fitted without groups: predict without them (or fit with groups for Mondrian)")
        g = _groups_of(groups, int(n) if n is not None else len(groups))
        return np.array([self.qhat_by_group_.get(x, math.inf) for x in g], dtype=np.float64)

    def predict_sets(self, probs, groups=None, n_options=None) -> np.ndarray:
        s = self._scores(probs, n_options)
        q = self.thresholds(groups, len(s))
        return (s <= q[:, None]) & np.isfinite(s)


# ---------------------------------------------------------------------------- how good the sets are

def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Exact binomial interval of k successes in n trials."""
    from scipy.stats import beta

    t = (1 - level) / 2
    lo = 0.0 if k == 0 else float(beta.ppf(t, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - t, k + 1, n - k))
    return lo, hi


def coverage_range(n_calib: int, n_test: int, alpha: float, level: float = 0.95) -> tuple[float, float] | None:
    """Central ``level`` range of the test coverage split conformal gives under exchangeability.

    Coverage given the calibration set ~ Beta(n + 1 - l, l), l = floor((n + 1) alpha), so
    the number covered ~ BetaBinomial(n_test, n + 1 - l, l). None when l = 0 (q = +inf: every set is full).
    """
    from scipy.stats import betabinom

    l_ = math.floor((n_calib + 1) * alpha + 1e-12)
    if l_ < 1:
        return None
    dist = betabinom(n_test, n_calib + 1 - l_, l_)
    t = (1 - level) / 2
    return float(dist.ppf(t) / n_test), float(dist.ppf(1 - t) / n_test)


def coverage_summary(sets: np.ndarray, answers, *, alpha: float, n_calib: int) -> dict:
    """coverage (with its Clopper-Pearson 95% interval and the expected range), mean set size,
    singleton and empty shares, and per set size {n, coverage}."""
    a = np.asarray(answers, dtype=np.int64)
    n = len(a)
    covered = sets[np.arange(n), a]
    size = sets.sum(axis=1)
    k = int(covered.sum())
    rng = coverage_range(n_calib, n, alpha)
    cov = k / n
    return {
        "n": n, "coverage": cov, "coverage_ci": list(clopper_pearson(k, n)),
        "expected_range": None if rng is None else list(rng),
        "within_expected": None if rng is None else bool(rng[0] <= cov <= rng[1]),
        "mean_size": float(size.mean()), "singleton_share": float(np.mean(size == 1)),
        "empty_share": float(np.mean(size == 0)),
        "by_size": {str(int(s)): {"n": int(np.sum(size == s)), "coverage": float(covered[size == s].mean())}
                    for s in np.unique(size)},
    }


def _per_group(sets, answers, groups) -> dict:
    out = {}
    a = np.asarray(answers, dtype=np.int64)
    g = _groups_of(groups, len(a))
    for name in sorted(set(g)):
        rows = np.flatnonzero(g == name)
        cov = sets[rows, a[rows]]
        k = int(cov.sum())
        out[str(name)] = {"n": int(len(rows)), "coverage": k / len(rows), "coverage_ci": list(clopper_pearson(k, len(rows))),
                          "mean_size": float(sets[rows].sum(axis=1).mean())}
    return out


def alpha_sweep(cal_probs, cal_answers, test_probs, test_answers, *, score: str = "lac", alphas=DEFAULT_ALPHAS,
                lam: float = 0.1, k_reg: int = 1, cal_groups=None, test_groups=None, cal_options=None,
                test_options=None) -> dict:
    """Coverage, mean set size and empty share at each alpha, on the same calibration and test questions
    (Mondrian when groups are given). The scores are computed once; q changes with alpha."""
    cal_s = option_scores(cal_probs, score, n_options=cal_options, lam=lam, k_reg=k_reg)
    test_s = option_scores(test_probs, score, n_options=test_options, lam=lam, k_reg=k_reg)
    ca = np.asarray(cal_answers, dtype=np.int64)
    ta = np.asarray(test_answers, dtype=np.int64)
    true = cal_s[np.arange(len(ca)), ca]
    cg, tg = _groups_of(cal_groups, len(ca)), _groups_of(test_groups, len(ta))
    cov, size, empty = [], [], []
    for alpha in alphas:
        if cg is None:
            q = np.full(len(ta), conformal_quantile(true, alpha))
        else:
            qg = {k: conformal_quantile(true[cg == k], alpha) for k in set(cg)}
            q = np.array([qg.get(x, math.inf) for x in tg])
        s = (test_s <= q[:, None]) & np.isfinite(test_s)
        cov.append(float(s[np.arange(len(ta)), ta].mean()))
        size.append(float(s.sum(axis=1).mean()))
        empty.append(float(np.mean(s.sum(axis=1) == 0)))
    return {"alpha": [float(x) for x in alphas], "coverage": cov, "mean_size": size, "empty_share": empty}


# ---------------------------------------------------------------------------- predictions and runs

@dataclass
class ConformalResult:
    """Everything ``conformal.json`` holds (``to_dict``), and where the predictions came from."""

    alpha: float
    score: str
    qhat: float
    calibration_ids: list[str]
    sets: list[dict]
    summary: dict
    per_group: dict | None
    by: str | None
    mondrian: bool
    qhat_by_group: dict | None
    params: dict
    sweep: dict
    source: dict = field(default_factory=dict)
    risk_control: dict | None = None

    def to_dict(self) -> dict:
        def q(x):
            return None if x is None or math.isinf(x) else float(x)

        return {"alpha": self.alpha, "score": self.score, "qhat": q(self.qhat), "params": self.params,
                "by": self.by, "mondrian": self.mondrian,
                "qhat_by_group": None if self.qhat_by_group is None else {k: q(v) for k, v in self.qhat_by_group.items()},
                "n_calib": len(self.calibration_ids), **self.summary, "per_group": self.per_group,
                "sweep": self.sweep, "risk_control": self.risk_control, "source": self.source, "calibration_ids": self.calibration_ids,
                "sets": self.sets}


def conformal_predictions(calib, test, *, alpha: float = 0.1, score: str = "lac", by: str | None = None,
                          mondrian: bool = False, lam: float = 0.1, k_reg: int = 1,
                          alphas: Sequence[float] = DEFAULT_ALPHAS) -> ConformalResult:
    """Split conformal on two lists of :class:`~llmcal.predictions.Prediction` (calibration, test)."""
    if by not in (None, "subject"):
        raise LlmcalError(f"--by {by!r}: the only grouping is 'subject'")
    if mondrian and by is None:
        raise LlmcalError("Mondrian conformal needs a grouping: add --by subject")
    if len(calib) < 1 or not test:
        raise LlmcalError(f"conformal needs calibration and test predictions (got {len(calib)} and {len(test)})")
    _check_alpha(alpha)
    cp_probs = [np.asarray(p.probs) for p in calib]
    tp_probs = [np.asarray(p.probs) for p in test]
    kmax = max(max(len(r) for r in cp_probs), max(len(r) for r in tp_probs))
    pad = lambda rows: np.array([np.pad(r, (0, kmax - len(r))) for r in rows])  # noqa: E731
    cp, tp = pad(cp_probs), pad(tp_probs)
    ck = [len(r) for r in cp_probs]
    tk = [len(r) for r in tp_probs]
    ca = [p.answer for p in calib]
    ta = np.array([p.answer for p in test], dtype=np.int64)
    cg = [p.subject for p in calib] if mondrian else None
    tg = [p.subject for p in test] if mondrian else None
    model = SplitConformal(alpha, score, lam, k_reg).fit(cp, ca, cg, n_options=ck)
    sets = model.predict_sets(tp, tg, n_options=tk)
    summary = coverage_summary(sets, ta, alpha=alpha, n_calib=len(calib))
    per_group = _per_group(sets, ta, [p.subject for p in test]) if by else None
    sw = alpha_sweep(cp, ca, tp, ta, score=score, alphas=alphas, lam=lam, k_reg=k_reg, cal_groups=cg,
                     test_groups=tg, cal_options=ck, test_options=tk)
    return ConformalResult(
        alpha=float(alpha), score=score, qhat=model.qhat_, calibration_ids=[p.id for p in calib],
        sets=[{"id": p.id, "set": [int(j) for j in np.flatnonzero(row)]} for p, row in zip(test, sets)],
        summary=summary, per_group=per_group, by=by, mondrian=bool(mondrian), qhat_by_group=model.qhat_by_group_,
        params={"lambda": float(lam), "k_reg": int(k_reg)} if score == "raps" else {}, sweep=sw)


def _select(run_dir: Path, result: str | None, dataset: str | None, calib_fraction: float):
    """(calibration, test, source) of a run: the post-hoc methods' calibration slice, the chosen result's test."""
    from .posthoc.compare import CALIB_FILE, posthoc_split
    from .predictions import Prediction, load_predictions
    from .runs import load_run

    rec = load_run(run_dir)
    if not rec.results:
        raise LlmcalError(f"{run_dir}: the run has no results")
    cands = [r for r in rec.results if (result is None or r.label == result) and (dataset is None or r.dataset == dataset)]
    if not cands:
        have = ", ".join(f"{r.label} ({r.dataset})" for r in rec.results)
        raise LlmcalError(f"{run_dir}: no result matches --result {result} --dataset {dataset} (have {have})")
    res = next((r for r in cands if r.method == "none"), cands[0]) if result is None else cands[0]
    preds = load_predictions(run_dir / res.predictions)
    seed = int(rec.config.get("seed") or 0)
    source = {"result": res.label, "method": res.method, "dataset": res.dataset, "test_file": res.predictions,
              "model": rec.model, "seed": seed}
    if (run_dir / CALIB_FILE).exists() and res.method in ("none", "ts"):
        calib = load_predictions(run_dir / CALIB_FILE)
        test = preds
        source.update(calib_file=CALIB_FILE, split="the run's own calibration predictions")
        if res.method == "ts":
            t = rec.meta.get("temperature")
            if not t:
                raise LlmcalError(f"{run_dir}: a ts result but meta.temperature is missing")
            calib = [Prediction.from_logits(p.id, p.subject, p.answer, np.asarray(p.logits) / float(t)) for p in calib]
            source["split"] += f", divided by the run's temperature {float(t):.4g}"
    else:
        calib, test = posthoc_split(preds, seed, calib_fraction)
        source.update(calib_file=None, calib_fraction=float(calib_fraction),
                      split=f"{res.predictions} split by the held-out rule hash_unit(id, seed) >= "
                            f"{1 - calib_fraction:g} (seed {seed})")
    return calib, test, source


def conformal_run(run_dir: str | Path, *, alpha: float = 0.1, score: str = "lac", by: str | None = None,
                  mondrian: bool = False, result: str | None = None, dataset: str | None = None,
                  calib_fraction: float = 0.2, lam: float = 0.1, k_reg: int = 1, risk: float | None = None,
                  delta: float = 0.1, out_dir: str | Path | None = None) -> tuple[ConformalResult, dict[str, Path]]:
    """Conformal sets on a finished run's stored predictions (no model); writes ``RUN/conformal/``.

    Calibration questions are those the post-hoc methods fit on: the run's
    ``predictions-calib.jsonl`` for its uncalibrated (and, divided by the run's
    temperature, its TS) result, otherwise the held-out slice of the chosen
    result's predictions (``llmcal.posthoc.compare.posthoc_split``, the run's
    seed). Files: ``conformal.json``, ``conformal.md`` (the report section) and
    ``conformal-alpha.png`` (coverage and set size against alpha).
    """
    from .io import atomic_write_json, atomic_write_text

    run = Path(run_dir)
    calib, test, source = _select(run, result, dataset, calib_fraction)
    res = conformal_predictions(calib, test, alpha=alpha, score=score, by=by, mondrian=mondrian, lam=lam,
                                k_reg=k_reg)
    res.source = source
    if risk is not None:
        from .risk import risk_control

        res.risk_control = risk_control(calib, test, risk, delta)
    out = Path(out_dir) if out_dir is not None else run / "conformal"
    title = f"{source['model']}: conformal sets ({source['result']}, {source['dataset']})"
    files = {"json": atomic_write_json(out / "conformal.json", res.to_dict()),
             "plot": alpha_plot([(source["result"], res.sweep)], out / "conformal-alpha.png", title=title)}
    files["markdown"] = atomic_write_text(out / "conformal.md", "\n".join(
        [f"# {title}", ""] + conformal_section([(source["result"], res)], plot="conformal-alpha.png")) + "\n")
    return res, files


def conformal_section(rows: Sequence[tuple[str, ConformalResult]], *, plot: str | None = None,
                      heading: str = "## Conformal prediction sets") -> list[str]:
    """Markdown lines: one row per (label, result): coverage with interval, expected range, set sizes (the report
    engine's tables, ``llmcal.report.tables.markdown_table``: 3 significant digits)."""
    from .report.tables import SIG, format_interval, markdown_table

    if not rows:
        return []
    r0 = rows[0][1]
    lines = [heading, "",
             f"Split conformal, score `{r0.score}`, alpha {r0.alpha:g} (target coverage {1 - r0.alpha:g}). Coverage: "
             "share of test questions whose answer is in its set, with its 95% Clopper-Pearson interval; expected: "
             "the central 95% range of that share under exchangeability (beta-binomial). docs/posthoc.md#conformal.",
             ""]
    table = []
    for label, r in rows:
        s = r.summary
        expected = "all sets full" if s["expected_range"] is None else (
            format_interval(s["expected_range"], sig=SIG).strip() + ("" if s["within_expected"] else " (outside)"))
        table.append({"result": label, "n_calib": len(r.calibration_ids), "n_test": s["n"],
                      "qhat": "per subject" if r.mondrian else r.qhat, "coverage": s["coverage"],
                      "coverage_ci": s["coverage_ci"], "expected": expected, "mean_size": s["mean_size"],
                      "singletons": s["singleton_share"], "empty": s["empty_share"]})
    lines += [markdown_table(table, ["result", ("n_calib", "n calib"), ("n_test", "n test"), "qhat", "coverage",
                                     "expected", ("mean_size", "mean size"), ("singletons", "singleton share"),
                                     ("empty", "empty share")], sig=SIG)]
    for label, r in rows:
        if r.per_group:
            kind = "Mondrian (a threshold per subject)" if r.mondrian else "one threshold for all subjects"
            lines += [f"Coverage per subject, {label} ({kind}):", ""]
            groups = [{"subject": g, "n": v["n"], "coverage": v["coverage"], "coverage_ci": v["coverage_ci"],
                       "mean_size": v["mean_size"]} for g, v in r.per_group.items()]
            lines += [markdown_table(groups, ["subject", "n", "coverage", ("mean_size", "mean size")], sig=SIG)]
    for label, r in rows:
        rc = r.risk_control
        if rc:
            cal, te = rc["calibration"], rc["test"]
            lines += [f"Abstention with a guarantee, {label}: answer only when the confidence is at least the threshold "
                      f"whose selective error is <= {rc['epsilon']:g} with probability >= {1 - rc['delta']:g} "
                      "(selection with guaranteed risk, Geifman and El-Yaniv 2017; docs/posthoc.md#risk-control).", ""]
            if rc["threshold"] is None:
                lines += [f"No threshold is certified on the {cal['n']} calibration questions: abstain on every "
                          "question (or ask for a larger risk).", ""]
            else:
                row = {"threshold": rc["threshold"], "calib_coverage": cal["coverage"],
                       "calib_error": cal["selective_error"], "bound": cal["bound"], "test_coverage": te["coverage"],
                       "test_error": te["selective_error"], "test_error_ci": te.get("selective_error_ci")}
                lines += [markdown_table([row], ["threshold", ("calib_coverage", "calib coverage"),
                                                 ("calib_error", "calib error"), "bound",
                                                 ("test_coverage", "test coverage"), ("test_error", "test error")],
                                         sig=SIG)]
    if plot:
        lines += [f"![coverage and set size against alpha]({plot})", ""]
    return lines


def alpha_plot(curves: Sequence[tuple[str, dict]], path, *, title: str | None = None) -> Path:
    """Two panels: coverage against 1 - alpha (with the diagonal), mean set size against alpha."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from .io import atomic_savefig

    fig = Figure(figsize=(9, 4), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    for n, (label, sw) in enumerate(curves):
        target = [1 - a for a in sw["alpha"]]
        ax1.plot(target, sw["coverage"], marker=".", color=f"C{n % 10}", label=str(label))
        ax2.plot(sw["alpha"], sw["mean_size"], marker=".", color=f"C{n % 10}", label=str(label))
    lo = min(1 - max(sw["alpha"]) for _, sw in curves)
    ax1.plot([lo, 1], [lo, 1], ls=":", color="0.4", lw=1)
    ax1.set_xlabel("target coverage 1 - alpha")
    ax1.set_ylabel("test coverage")
    ax2.set_xlabel("alpha")
    ax2.set_ylabel("mean set size (options)")
    for ax in (ax1, ax2):
        ax.grid(True, ls=":", lw=0.5, color="0.8")
        ax.legend(fontsize=7.5, loc="best")
    if title:
        fig.suptitle(title, fontsize=11)
    return atomic_savefig(fig, path, dpi=120)
