"""Confidence sources side by side: one model, the same questions, several ways of reading its confidence.

``llmcal eval --backend openai --confidence logprobs|verbalized|ptrue|consistency`` writes one ordinary run per
source. :func:`compare_confidence` reads such runs and puts them next to each other:

- **Refusal first.** Every run must be complete, of the same model (config.json's ``model``) and of the same
  questions: the same ids, each with the same answer and number of options. Anything else is an
  ``LlmcalError`` naming the run and what differs, before any number is computed.
- **Per source**, on all questions: accuracy, conf-ECE, AUROC (confidence ranking right answers above wrong
  ones) and AURC, each with a 95% percentile bootstrap interval (``llmcal.metrics``: ``compute_metrics`` and
  ``bootstrap_ci``, the same resamples for every source, so differences between sources get *paired*
  intervals from ``bootstrap_diff_ci``); the parse rate (unparseable answers and retries) and the cost
  (requests, prompt and completion tokens, seconds, and each per question) from the run's metrics.json
  ``confidence`` block. A run without that block (a logprobs run written before it existed) has no recorded
  cost: it is reported as not recorded, never estimated.
- **Post-hoc calibrators per source** (``llmcal.posthoc``), fitted on the calibration slice of llmcal's
  held-out rule (``data/splits.py``: ``hash_unit(id, seed) >= 1 - calib_fraction``, so every source is fitted
  on the same questions) and measured on the rest. Each also gets its 5-fold cross-validated conf-ECE on the
  calibration slice (``cv_conf_ece``), by which the verdict picks a source's calibrator without looking at
  the questions that then measure it. A calibrator that cannot serve a source is listed with the
  reason instead: temperature scaling and the other log-probability methods do not apply to a source whose
  probabilities contain exact zeros (consistency's vote shares, a stated confidence of 100%), because log 0
  has no finite value and the fitted parameter would be decided by whatever floor replaced it.

Probabilities are read from each record's ``probs`` (the run's own distribution, zeros included), not
recomputed from ``logits``.
"""
from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .errors import LlmcalError

__all__ = ["SourceRun", "load_source", "check_same_questions", "compare_confidence", "ConfidenceComparison",
           "DEFAULT_METHODS", "auroc_of_probs"]

log = logging.getLogger(__name__)

DEFAULT_METHODS = ("ts", "platt", "isotonic", "histogram")
# Methods that change only the top confidence (llmcal.posthoc.topconf): defined for any probabilities.
TOP_LABEL_METHODS = {"platt", "isotonic", "histogram"}
# Confidence sources that read an option distribution from the model's log-probabilities.
NO_PARSING = {"logprobs"}
_LOG_FLOOR = 1e-300  # logits handed to the calibrators; softmax(log(max(p, floor))) equals p to float64 rounding
COST_KEYS = ("requests", "prompt_tokens", "completion_tokens", "seconds")


# ---- reading runs -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SourceRun:
    """One run read for the comparison: its confidence source, its questions and their probabilities."""

    path: Path
    source: str
    template: str | None
    settings: dict
    model: str
    ids: tuple[str, ...]
    subjects: tuple[str | None, ...]
    answers: np.ndarray = field(repr=False)
    probs: np.ndarray = field(repr=False)  # (N, Kmax), zero-padded past each question's options
    n_options: np.ndarray = field(repr=False)
    block: dict | None = field(default=None, repr=False)  # metrics.json's ``confidence`` block
    config: dict = field(default_factory=dict, repr=False)  # the run's config.json
    unparseable: np.ndarray | None = field(default=None, repr=False)  # per question: recorded as unparseable

    @property
    def name(self) -> str:
        return f"{self.source} ({self.template})" if self.template else self.source


def _settings(cfg: dict, source: str) -> dict:
    """The options that define how a source read its confidence (for the report's table of runs)."""
    keys = {"verbalized": ("verbalized_template", "max_parse_retries"),
            "consistency": ("samples", "sample_temperature", "reasoning"),
            "ptrue": ("max_parse_retries",)}.get(source, ())
    out = {k: cfg[k] for k in keys if k in cfg}
    for k in ("template", "api_mode", "top_logprobs"):
        if cfg.get(k) is not None:
            out[k] = cfg[k]
    return out


def _record(rec: dict) -> dict:
    """One predictions record's fields the comparison reads (``probs`` as written); a bad one raises TypeError."""
    qid, answer, probs = rec["id"], rec["answer"], rec["probs"]
    if (not isinstance(probs, list) or not probs or isinstance(answer, bool) or not isinstance(answer, int)
            or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in probs)):
        raise TypeError("probs must be a list of numbers and answer an integer")
    if not 0 <= answer < len(probs):
        raise TypeError(f"answer {answer} is out of range for {len(probs)} options")
    parse = rec.get("parse")
    return {"id": str(qid), "subject": rec.get("subject"), "answer": answer, "probs": probs,
            "unparseable": isinstance(parse, dict) and parse.get("status") == "unparseable"}


def load_source(run_dir: str | Path) -> SourceRun:
    """A finished run as a :class:`SourceRun` (its main result's predictions; ``confidence`` absent = logprobs)."""
    from .predictions import read_records
    from .runs import load_run, recorded_path

    path = Path(run_dir)
    if not path.exists():
        raise LlmcalError(f"{path}: no such run directory")
    rec = load_run(path)  # an incomplete or foreign directory is refused here, by name
    cfg = rec.config
    source = str(cfg.get("confidence") or "logprobs")
    template = cfg.get("verbalized_template") if source == "verbalized" else None
    res = rec.main
    records = read_records(recorded_path(res.predictions, path), _record)
    if not records:
        raise LlmcalError(f"{recorded_path(res.predictions, path)}: no predictions")
    ids = [r["id"] for r in records]
    seen: set[str] = set()
    for r in records:
        if r["id"] in seen:
            raise LlmcalError(f"{path}: question id {r['id']!r} appears twice in {res.predictions}")
        seen.add(r["id"])
    kmax = max(len(r["probs"]) for r in records)
    probs = np.zeros((len(records), kmax))
    for i, r in enumerate(records):
        probs[i, :len(r["probs"])] = r["probs"]
    return SourceRun(path=path, source=source, template=None if template is None else str(template),
                     settings=_settings(cfg, source), model=str(cfg.get("model") or rec.model), ids=tuple(ids),
                     subjects=tuple(r["subject"] for r in records),
                     answers=np.array([r["answer"] for r in records], dtype=np.int64), probs=probs,
                     n_options=np.array([len(r["probs"]) for r in records], dtype=np.int64), block=rec.confidence,
                     config=cfg, unparseable=np.array([r["unparseable"] for r in records], dtype=bool))


def check_same_questions(runs: Sequence[SourceRun]) -> None:
    """Refuse runs that are not of one model and one question set, naming the run and what differs."""
    if not runs:
        raise LlmcalError("compare-confidence: no runs given")
    first = runs[0]
    where = {q: i for i, q in enumerate(first.ids)}
    for r in runs[1:]:
        if r.path.resolve() == first.path.resolve():
            raise LlmcalError(f"{r.path}: given twice")
        if r.model != first.model:
            raise LlmcalError(f"{r.path}: model {r.model!r} differs from {first.path}'s {first.model!r}; "
                              f"compare-confidence compares confidence sources of one model")
        extra = [q for q in r.ids if q not in where]
        have = set(r.ids)
        missing = [q for q in first.ids if q not in have]
        if extra or missing:
            parts = []
            if missing:
                parts.append(f"lacks {len(missing)} of {first.path}'s questions (e.g. {', '.join(missing[:3])})")
            if extra:
                parts.append(f"has {len(extra)} questions {first.path} lacks (e.g. {', '.join(extra[:3])})")
            raise LlmcalError(f"{r.path}: not the same questions: it {' and '.join(parts)}")
        for i, q in enumerate(r.ids):
            j = where[q]
            if r.answers[i] != first.answers[j] or r.n_options[i] != first.n_options[j]:
                raise LlmcalError(
                    f"{r.path}: question {q!r} has answer {int(r.answers[i])} of {int(r.n_options[i])} options, "
                    f"{first.path} answer {int(first.answers[j])} of {int(first.n_options[j])}: not the same questions")


def _aligned(run: SourceRun, order: Sequence[str]) -> np.ndarray:
    """``run.probs`` in the question order ``order``."""
    pos = {q: i for i, q in enumerate(run.ids)}
    return run.probs[[pos[q] for q in order]]


# ---- measuring ----------------------------------------------------------------------------------------
def auroc_of_probs(probs, answers) -> float:
    """AUROC of the top probability for the argmax being right (``llmcal.metrics.auroc``), from (probs, answers),
    the signature ``bootstrap_ci`` resamples."""
    from .metrics import auroc

    p = np.asarray(probs, dtype=np.float64)
    pred = np.argmax(p, axis=1)
    return auroc(p[np.arange(len(p)), pred], pred == np.asarray(answers))


def _measure(probs: np.ndarray, answers: np.ndarray, *, n_bins: int, n_bootstrap: int, seed: int) -> dict:
    """compute_metrics's dict, with AUROC's interval added to ``ci`` (same resamples) and the risk-coverage curve."""
    from .metrics import bootstrap_ci, compute_metrics, risk_coverage_curve

    m = compute_metrics(probs, answers, n_bins=n_bins, n_bootstrap=n_bootstrap, seed=seed)
    m["ci"]["auroc"] = (list(bootstrap_ci(auroc_of_probs, probs, answers, n_resamples=n_bootstrap, seed=seed))
                        if n_bootstrap > 0 else None)
    m["risk_coverage"] = risk_coverage_curve(probs, answers).to_dict()
    return m


HEADLINE = ("accuracy", "conf_ece", "auroc", "aurc")


def _headline(m: dict) -> dict:
    out = {"n": m["n"]}
    for k in HEADLINE:
        out[k] = _finite(m[k])
        out[f"{k}_ci"] = m["ci"].get(k)
    for k in ("mean_conf", "brier", "nll", "cw_ece", "smece"):
        out[k] = _finite(m.get(k))
    return out


def _finite(x):
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


def _difference(metric: str, before: np.ndarray, after: np.ndarray, answers: np.ndarray, *, n_bins: int,
                n_bootstrap: int, seed: int) -> dict:
    """after − before on the same questions, with a paired 95% bootstrap interval."""
    from .metrics import bootstrap_diff_ci, conf_ece

    fn = functools.partial(conf_ece, n_bins=n_bins) if metric == "conf_ece" else auroc_of_probs
    d = fn(after, answers) - fn(before, answers)
    ci = list(bootstrap_diff_ci(fn, before, after, answers, n_resamples=n_bootstrap, seed=seed)) \
        if n_bootstrap > 0 else None
    return {"diff": _finite(float(d)), "ci": ci if ci and not any(math.isnan(c) for c in ci) else None}


def _cost(run: SourceRun, n: int) -> dict | None:
    """Requests, tokens and seconds from the run's confidence block, in all and per question of the questions the
    block says it costed (``questions_costed``); None when the run recorded no cost."""
    b = run.block
    if not b or not any(isinstance(b.get(k), (int, float)) for k in COST_KEYS):
        return None
    total = {k: b.get(k) if isinstance(b.get(k), (int, float)) and not isinstance(b.get(k), bool) else None
             for k in COST_KEYS}
    def count(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    # the questions the counters cover: questions_costed (fewer than n in a logprobs run that was resumed; 0
    # when a resume found every question scored and asked nothing, so nothing is known per question), else n
    costed = (b["questions_costed"] if count(b.get("questions_costed"))
              else next((v for v in (b.get("n"), n) if count(v) and v > 0), n))
    # seconds cover the questions the last process scored (questions_timed; older blocks: as the counters)
    timed = b.get("questions_timed", costed)
    timed = timed if count(timed) and timed > 0 else None
    per = {k: (v / costed if v is not None and costed else None) for k, v in total.items()}
    per["seconds"] = total["seconds"] / timed if total["seconds"] is not None and timed else None
    return {**total, "questions_costed": costed, "questions_timed": timed, "per_question": per}


def _parse(run: SourceRun, n: int) -> dict | None:
    """Unparseable answers and retries from the confidence block (None for a source that parses nothing)."""
    if run.source in NO_PARSING:
        return None
    b = run.block or {}
    bad = b.get("unparseable")
    if not isinstance(bad, int) or isinstance(bad, bool):
        return {"n": n, "unparseable": None, "retries": b.get("retries"), "parse_rate": None}
    n_block = b.get("n") if isinstance(b.get("n"), int) and b.get("n") > 0 else n
    return {"n": n_block, "unparseable": bad, "retries": b.get("retries"), "parse_rate": (n_block - bad) / n_block,
            "unparseable_correct": _unparseable_correct(run)}


def _unparseable_correct(run: SourceRun) -> int | None:
    """How many unparseable questions count as right anyway: their uniform distribution predicts option A (the
    first on a tie), which is the answer to about 1 in K of them; accuracy includes those."""
    if run.unparseable is None:
        return None
    pred = np.argmax(run.probs, axis=1)  # zero padding past a question's options never wins the argmax
    return int(np.sum(run.unparseable & (pred == run.answers)))


# ---- post-hoc calibration -----------------------------------------------------------------------------
def _predictions(run_probs: np.ndarray, ids: Sequence[str], answers: np.ndarray, n_options: np.ndarray):
    from .predictions import Prediction

    return [Prediction.from_logits(q, None, int(a), np.log(np.maximum(p[:k], _LOG_FLOOR)))
            for q, a, p, k in zip(ids, answers, run_probs, n_options)]


def _posthoc(probs: np.ndarray, ids: Sequence[str], answers: np.ndarray, n_options: np.ndarray,
             calib_idx: np.ndarray, test_idx: np.ndarray, methods: Sequence[str], *, n_bins: int,
             n_bootstrap: int, seed: int) -> list[dict]:
    """One row per method ("none" first) on the test part: fitted on the calibration part, or why not applied."""
    from .posthoc.compare import calibrate_predictions
    from .posthoc.methods import METHODS
    from .predictions import stack_probs

    preds = _predictions(probs, ids, answers, n_options)
    calib = [preds[i] for i in calib_idx]
    test = [preds[i] for i in test_idx]
    test_probs, test_answers = probs[test_idx], answers[test_idx]
    zero_rows = int(_has_real_zero(probs, n_options).sum())
    rows = []
    for name in ("none", *methods):
        info = METHODS[name]
        row = {"method": name, "label": info.label, "source": info.source, "applied": True, "reason": None,
               "params": {}}
        if name != "none" and name not in TOP_LABEL_METHODS and zero_rows:
            row.update(applied=False, reason=(
                f"{zero_rows} of {len(probs)} questions give an option probability exactly 0; {info.label} "
                f"rescales log-probabilities and log 0 has no finite value, so a fit would be decided by the floor "
                f"that replaced it, not by the data"))
            rows.append(row)
            continue
        if name == "none":
            after = test_probs
        else:
            try:
                out, params = calibrate_predictions(name, calib, test)
            except LlmcalError as e:
                row.update(applied=False, reason=str(e))
                rows.append(row)
                continue
            after, _ = stack_probs(out)
            after = np.pad(after, ((0, 0), (0, test_probs.shape[1] - after.shape[1])))
            row["params"] = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in params.items()}
        m = _measure(after, test_answers, n_bins=n_bins, n_bootstrap=n_bootstrap, seed=seed)
        row.update(_headline(m), metrics=m)
        row["cv_conf_ece"], row["cv_reason"] = _cv_conf_ece(name, calib, probs.shape[1], n_bins=n_bins, seed=seed)
        rows.append(row)
    return rows


CV_FOLDS = 5


def _cv_folds(n: int, seed: int) -> np.ndarray:
    """Fold of each calibration question: a seeded permutation dealt into ``min(CV_FOLDS, n)`` folds."""
    k = min(CV_FOLDS, n)
    return np.random.default_rng(seed).permutation(n) % k


def _cv_conf_ece(name: str, calib: Sequence, width: int, *, n_bins: int, seed: int) -> tuple[float | None, str | None]:
    """conf-ECE of ``name`` on the calibration part by k-fold cross-validation: each fold is calibrated by a fit
    on the other folds and the out-of-fold probabilities are pooled ("none": the calibration part as it is).

    This is what picks each source's calibrator in the verdict, so that the held-out questions that measure
    the chosen calibrator played no part in choosing it.  A fit that fails on some fold (too few questions
    in it) gives None and the reason.
    """
    from .metrics import conf_ece
    from .posthoc.compare import calibrate_predictions
    from .predictions import stack_probs

    probs, answers = stack_probs(calib)
    if name == "none":
        return float(conf_ece(probs, answers, n_bins)), None
    fold = _cv_folds(len(calib), seed)
    pooled = np.zeros((len(calib), width))
    for f in np.unique(fold):
        fit = [p for p, g in zip(calib, fold) if g != f]
        held = [p for p, g in zip(calib, fold) if g == f]
        try:
            out, _ = calibrate_predictions(name, fit, held)
        except LlmcalError as e:
            return None, f"fold {int(f) + 1} of {int(fold.max()) + 1}: {e}"
        fold_probs, _ = stack_probs(out)
        pooled[fold == f, :fold_probs.shape[1]] = fold_probs
    return float(conf_ece(pooled, answers, n_bins)), None


# ---- the comparison -----------------------------------------------------------------------------------
@dataclass
class ConfidenceComparison:
    """Everything :func:`compare_confidence` computed; ``to_dict()`` is comparison.json."""

    model: str
    ids: tuple[str, ...]
    sources: list[dict]
    differences: list[dict]
    split: dict
    methods: tuple[str, ...]
    n_bins: int
    n_bootstrap: int
    seed: int
    verdict: dict = field(default_factory=dict)
    files: dict = field(default_factory=dict)

    def source(self, label: str) -> dict:
        for s in self.sources:
            if s["label"] == label:
                return s
        raise LlmcalError(f"no source labelled {label!r} (have {', '.join(s['label'] for s in self.sources)})")

    def to_dict(self, base: str | Path | None = None) -> dict:
        """JSON-ready; run paths relative to ``base`` (the output directory) so the file holds no machine path."""
        from .runs import portable

        def strip(s: dict) -> dict:
            d = {k: v for k, v in s.items() if k not in ("metrics", "posthoc")}
            d["reliability"] = s["metrics"]["reliability"]
            d["risk_coverage"] = s["metrics"]["risk_coverage"]
            d["posthoc"] = [{k: v for k, v in r.items() if k != "metrics"} for r in s["posthoc"]]
            return d

        doc = {"model": self.model, "n": len(self.ids), "n_bins": self.n_bins, "n_bootstrap": self.n_bootstrap,
               "seed": self.seed, "methods": list(self.methods), "split": self.split,
               "sources": [strip(s) for s in self.sources], "differences": self.differences,
               "verdict": self.verdict}
        return portable(doc, base) if base is not None else doc


def _labels(runs: Sequence[SourceRun]) -> list[str]:
    names = [r.name for r in runs]
    return [f"{n} · {r.path.name}" if names.count(n) > 1 else n for n, r in zip(names, runs)]


def compare_confidence(runs: Sequence[str | Path], out: str | Path | None = None, *,
                       methods: str | Sequence[str] = DEFAULT_METHODS, calib_fraction: float = 0.2,
                       n_bins: int | None = None, n_bootstrap: int | None = None,
                       seed: int | None = None) -> ConfidenceComparison:
    """Compare the confidence sources of finished runs of one model on one question set (module docstring).

    ``methods``: post-hoc methods from ``llmcal.posthoc.METHODS`` (names or a comma-separated string; not
    ``contextual``, which needs the model). ``n_bins``, ``n_bootstrap`` and ``seed`` default to the first run's
    config (10, 1000, 0 when absent); ``seed`` also keys the calibration split. With ``out``, writes
    ``comparison.json``, ``report.md``, ``report.html`` and the figures there (``llmcal.report.confidence``).
    """
    from .data.splits import split_heldout
    from .posthoc.methods import resolve_methods
    from .validation import OpenFraction, check_value

    if not runs:
        raise LlmcalError("compare-confidence: no run directories given")
    names, _ = resolve_methods(methods)
    names = [n for n in names if n != "none"]
    if "contextual" in names:
        raise LlmcalError("compare-confidence: contextual calibration needs the model's content-free prior, which "
                          "stored runs do not hold; leave it out of --methods")
    calib_fraction = check_value(OpenFraction, calib_fraction, "--calib-fraction")
    if out is not None:
        outp = Path(out).resolve()
        for r in runs:
            if Path(r).resolve() == outp:
                raise LlmcalError(f"--out {out}: is one of the runs; choose another directory for the comparison")
    loaded = [load_source(r) for r in runs]
    check_same_questions(loaded)

    cfg = loaded[0].config
    try:
        n_bins = int(n_bins if n_bins is not None else cfg.get("n_bins") or 10)
        n_bootstrap = int(n_bootstrap if n_bootstrap is not None else cfg.get("n_bootstrap", 1000))
        seed = int(seed if seed is not None else cfg.get("seed") or 0)
    except (TypeError, ValueError) as e:
        raise LlmcalError(f"{loaded[0].path}/config.json: n_bins, n_bootstrap and seed must be integers ({e})") from e
    if n_bins < 1 or n_bootstrap < 0:
        raise LlmcalError(f"n_bins must be >= 1 and n_bootstrap >= 0 (got {n_bins}, {n_bootstrap})")

    order = loaded[0].ids
    answers = loaded[0].answers
    n_options = loaded[0].n_options
    all_probs = [_aligned(r, order) for r in loaded]
    kmax = max(p.shape[1] for p in all_probs)
    all_probs = [np.pad(p, ((0, 0), (0, kmax - p.shape[1]))) for p in all_probs]

    # the held-out rule on ids alone: the same calibration questions for every source
    idx = list(range(len(order)))
    test_i, calib_i = split_heldout(idx, float(calib_fraction), seed, id_of=lambda i: order[i])
    calib_idx, test_idx = np.array(calib_i, dtype=np.int64), np.array(test_i, dtype=np.int64)
    if len(calib_idx) < 2 or len(test_idx) < 1:
        raise LlmcalError(f"{len(calib_idx)} calibration and {len(test_idx)} test questions of {len(order)}; the "
                          f"post-hoc calibrators need at least 2 and 1 (more questions, or another --calib-fraction)")
    split = {"rule": f"hash_unit(id, seed) >= {1 - float(calib_fraction):g} (llmcal.data.splits.split_heldout)",
             "calib_fraction": float(calib_fraction), "seed": seed, "n_calib": int(len(calib_idx)),
             "n_test": int(len(test_idx)), "calib_ids": [order[i] for i in calib_idx]}

    labels = _labels(loaded)
    sources = []
    for run, label, probs in zip(loaded, labels, all_probs):
        log.info("compare-confidence: measuring %s", label)
        m = _measure(probs, answers, n_bins=n_bins, n_bootstrap=n_bootstrap, seed=seed)
        sources.append({
            "label": label, "run": str(run.path.resolve()), "source": run.source, "template": run.template,
            "settings": run.settings, **_headline(m), "zero_rows": int(_has_real_zero(probs, n_options).sum()),
            "parse": _parse(run, len(order)), "cost": _cost(run, len(order)), "metrics": m,
            "posthoc": _posthoc(probs, order, answers, n_options, calib_idx, test_idx, names, n_bins=n_bins,
                                n_bootstrap=n_bootstrap, seed=seed),
        })
    differences = []
    for i in range(len(loaded)):
        for j in range(i + 1, len(loaded)):
            differences.append({
                "a": labels[i], "b": labels[j],
                **{k: _difference(k, all_probs[i], all_probs[j], answers, n_bins=n_bins, n_bootstrap=n_bootstrap,
                                  seed=seed) for k in ("conf_ece", "auroc")}})
    comp = ConfidenceComparison(model=loaded[0].model, ids=tuple(order), sources=sources, differences=differences,
                                split=split, methods=tuple(names), n_bins=n_bins, n_bootstrap=n_bootstrap, seed=seed)
    from .report.confidence import decide, write_confidence_report

    comp.verdict = decide(comp)
    if out is not None:
        comp.files = write_confidence_report(comp, Path(out))
    return comp


def _has_real_zero(probs: np.ndarray, n_options: np.ndarray) -> np.ndarray:
    """Per question: an option (not a padding column) has probability exactly 0."""
    real = np.arange(probs.shape[1])[None, :] < n_options[:, None]
    return np.any((probs == 0) & real, axis=1)
