"""Regime diagnosis (docs/reference.md, "Regime diagnosis").

ECE >= |mean confidence - accuracy| always, and an SFT fixed point has mean
confidence close to its training accuracy, so after fine-tuning the held-out
ECE is bounded below by about ``train accuracy - held-out accuracy``.  When
that gap is within a tolerance the model is *calibratable*: CFT can reach
near-zero ECE without giving up accuracy.  Otherwise it is *non-calibratable*
and RCFT's ECE regulariser is recommended.

The gap is measured on finite question sets, so it is noisy (on 250 + 200
questions its standard error is about 0.05, the size of the default
tolerance).  The diagnosis therefore works on the gap fine-tuning *added*:

    added = (train acc - held-out acc) of the model - (the same) of the base model

on the same two question sets (the base model's own gap says how much the two
sets differ before any training; without a base model it is taken as 0), with
a percentile bootstrap interval: the training and held-out questions are
resampled independently, each resample shared by the model and the base model
(paired), B resamples from ``numpy.random.default_rng(seed)`` as in
``metrics.bootstrap``.  Three verdicts: *calibratable* (the interval lies at or
below the tolerance), *non-calibratable* (above it), *undetermined* (it
straddles the tolerance); an undetermined diagnosis says how many questions
would settle it (``settle``).

``diagnose`` classifies from the numbers; ``diagnose_correct`` computes them from
per-question correctness (what ``--method auto`` does after each epoch);
``diagnose_predictions`` from scored questions; ``run_regime`` is ``llmcal
regime``: it scores a model (and, for an adapter, its base) on training and
held-out data and writes a run directory with the diagnosis.
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .errors import LlmcalError
from .options import Dtype, Template, config, option, shared
from .validation import Int, NonNegativeNumber, OpenFraction, PositiveInt

log = logging.getLogger(__name__)

DEFAULT_TOLERANCE = 0.05
DEFAULT_LEVEL = 0.95
CALIBRATABLE = "calibratable"
NON_CALIBRATABLE = "non-calibratable"
UNDETERMINED = "undetermined"
RECOMMENDED = {CALIBRATABLE: "cft", NON_CALIBRATABLE: "rcft", UNDETERMINED: "auto"}


@dataclass(frozen=True)
class Diagnosis:
    train_accuracy: float
    heldout_accuracy: float
    heldout_ece: float | None
    heldout_mean_conf: float | None
    gap: float  # train accuracy - held-out accuracy of the model
    ece_lower_bound: float  # max(gap, 0): the held-out ECE an SFT fixed point cannot go below
    tolerance: float
    regime: str  # calibratable | non-calibratable | undetermined
    recommended: str  # cft | rcft | auto
    reason: str
    base_train_accuracy: float | None = None  # the base model on the same training questions
    base_heldout_accuracy: float | None = None  # ... and on the same held-out questions
    base_gap: float | None = None  # their difference (None: no base model measured; taken as 0)
    added_gap: float | None = None  # gap - base_gap: what fine-tuning added; the verdict is on this
    interval: list[float] | None = None  # [lo, hi]: bootstrap interval of added_gap (None: point estimate only)
    level: float = DEFAULT_LEVEL
    n_train: int | None = None
    n_heldout: int | None = None
    settle: dict | None = None  # undetermined: {"n_train", "n_heldout"} that would exclude the tolerance

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Diagnosis":
        """Also reads a diagnosis written before the interval and the base gap existed."""
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def settle_sizes(added: float, interval: tuple[float, float], tolerance: float, n_train: int,
                 n_heldout: int) -> dict | None:
    """Question counts at which the interval would no longer straddle the tolerance, or None (no finite count).

    The interval's width shrinks as 1 / sqrt(n): its side facing the tolerance (estimate - lo when the
    estimate is above it, hi - estimate below) must shrink to the estimate's distance from the tolerance,
    which scaling both sets by f = (side / distance)^2 does.  It assumes the estimate and the per-question
    spread stay as measured: a rough size to aim for, not a guarantee.
    """
    lo, hi = interval
    distance = abs(added - tolerance)
    side = (added - lo) if added > tolerance else (hi - added)
    if distance == 0 or not math.isfinite(side):
        return None
    f = max((side / distance) ** 2, 1.0)
    return {"n_train": int(math.ceil(n_train * f)), "n_heldout": int(math.ceil(n_heldout * f)),
            "factor": float(f)}


def diagnose(train_accuracy: float, heldout_accuracy: float, *, base_train_accuracy: float | None = None,
             base_heldout_accuracy: float | None = None, interval: tuple[float, float] | None = None,
             level: float = DEFAULT_LEVEL, n_train: int | None = None, n_heldout: int | None = None,
             heldout_ece: float | None = None, heldout_mean_conf: float | None = None,
             tolerance: float = DEFAULT_TOLERANCE) -> Diagnosis:
    """Classify the regime from the numbers (reported as used).

    ``interval``: the bootstrap interval of the added gap (``diagnose_correct`` computes it); without
    one the verdict is the point estimate's (added gap <= tolerance: calibratable), never undetermined.
    """
    gap = float(train_accuracy) - float(heldout_accuracy)
    have_base = base_train_accuracy is not None and base_heldout_accuracy is not None
    base_gap = float(base_train_accuracy) - float(base_heldout_accuracy) if have_base else None
    added = gap - (base_gap or 0.0)
    tol = float(tolerance)
    what = (f"train - held-out accuracy {gap:+.4f} minus the base model's {base_gap:+.4f} = {added:+.4f} added by "
            f"fine-tuning" if have_base else f"train accuracy {train_accuracy:.4f} - held-out accuracy "
            f"{heldout_accuracy:.4f} = {added:.4f}")
    settle = None
    if interval is None:
        regime = CALIBRATABLE if added <= tol else NON_CALIBRATABLE
        where = f"{'<=' if regime == CALIBRATABLE else '>'} tolerance {tol:.4f}"
    else:
        lo, hi = float(interval[0]), float(interval[1])
        interval = [lo, hi]
        ci = f"{100 * level:g}% interval [{lo:+.4f}, {hi:+.4f}]"
        if hi <= tol:
            regime, where = CALIBRATABLE, f"{ci} <= tolerance {tol:.4f}"
        elif lo > tol:
            regime, where = NON_CALIBRATABLE, f"{ci} > tolerance {tol:.4f}"
        else:
            regime, where = UNDETERMINED, f"{ci} straddles the tolerance {tol:.4f}"
            if n_train and n_heldout:
                settle = settle_sizes(added, (lo, hi), tol, n_train, n_heldout)
    if regime == CALIBRATABLE:
        advice = "an SFT fixed point can be calibrated on unseen data, use CFT"
    elif regime == NON_CALIBRATABLE:
        advice = (f"SFT would stay over-confident on unseen data (held-out ECE >= ~{max(gap, 0.0):.4f}); use RCFT")
    else:
        advice = ("too few questions to tell; use --method auto (CFT, RCFT once the gap is clear)"
                  + (f", or about {settle['n_train']} training and {settle['n_heldout']} held-out questions "
                     f"would settle it" if settle else ""))
    return Diagnosis(train_accuracy=float(train_accuracy), heldout_accuracy=float(heldout_accuracy),
                     heldout_ece=heldout_ece, heldout_mean_conf=heldout_mean_conf, gap=gap,
                     ece_lower_bound=max(gap, 0.0), tolerance=tol, regime=regime, recommended=RECOMMENDED[regime],
                     reason=f"{what}, {where}: {advice}", base_train_accuracy=_opt(base_train_accuracy),
                     base_heldout_accuracy=_opt(base_heldout_accuracy), base_gap=base_gap, added_gap=added,
                     interval=interval, level=float(level), n_train=n_train, n_heldout=n_heldout, settle=settle)


def _opt(x) -> float | None:
    return None if x is None else float(x)


def left_calibratable(d: Diagnosis) -> bool:
    """True once the diagnosis says non-calibratable (the interval above the tolerance): ``--method auto``'s switch."""
    return d.regime == NON_CALIBRATABLE


def _resampled_means(x: np.ndarray, n_resamples: int, seed: int) -> np.ndarray:
    """The mean of ``x`` on each bootstrap resample (``metrics.bootstrap``'s draws for this N and seed)."""
    from .metrics.bootstrap import _resample_batches

    out = np.empty(int(n_resamples))
    pos = 0
    for idx in _resample_batches(np.random.default_rng(seed), len(x), int(n_resamples)):
        out[pos:pos + len(idx)] = x[idx].mean(axis=1)
        pos += len(idx)
    return out


def diagnose_correct(train_correct, heldout_correct, *, base_train_correct=None, base_heldout_correct=None,
                     tolerance: float = DEFAULT_TOLERANCE, n_resamples: int = 1000, seed: int = 0,
                     level: float = DEFAULT_LEVEL, heldout_ece: float | None = None,
                     heldout_mean_conf: float | None = None) -> Diagnosis:
    """:func:`diagnose` with the bootstrap interval, from per-question correctness (0/1, question order).

    ``base_*_correct``: the base model on the same questions in the same order (paired); both or neither.
    The training set is resampled with ``seed``, the held-out set with ``seed + 1`` (independent samples).
    """
    from .metrics.bootstrap import _check_resampling, percentile_interval

    _check_resampling(n_resamples, level)
    t = np.asarray(train_correct, dtype=np.float64)
    h = np.asarray(heldout_correct, dtype=np.float64)
    if t.size == 0 or h.size == 0:
        raise LlmcalError(f"regime diagnosis needs scored training and held-out questions "
                          f"(got {t.size} and {h.size})")
    if (base_train_correct is None) != (base_heldout_correct is None):
        raise LlmcalError("regime diagnosis: give the base model's correctness on both sets or on neither")
    dt, dh = t, h
    base = {}
    if base_train_correct is not None:
        bt = np.asarray(base_train_correct, dtype=np.float64)
        bh = np.asarray(base_heldout_correct, dtype=np.float64)
        if bt.shape != t.shape or bh.shape != h.shape:
            raise LlmcalError(f"regime diagnosis: the base model was scored on {bt.size} + {bh.size} questions, "
                              f"the model on {t.size} + {h.size}; the gaps must come from the same questions")
        dt, dh = t - bt, h - bh
        base = {"base_train_accuracy": float(bt.mean()), "base_heldout_accuracy": float(bh.mean())}
    values = _resampled_means(dt, n_resamples, seed) - _resampled_means(dh, n_resamples, seed + 1)
    return diagnose(float(t.mean()), float(h.mean()), **base, interval=percentile_interval(values, level),
                    level=level, n_train=int(t.size), n_heldout=int(h.size), heldout_ece=heldout_ece,
                    heldout_mean_conf=heldout_mean_conf, tolerance=tolerance)


def diagnose_predictions(train: Sequence, heldout: Sequence, *, base_train: Sequence | None = None,
                         base_heldout: Sequence | None = None, tolerance: float = DEFAULT_TOLERANCE,
                         n_bins: int = 10, n_bootstrap: int = 1000, seed: int = 0) -> Diagnosis:
    """:func:`diagnose_correct` from scored questions (``Prediction`` lists), with held-out conf-ECE and mean conf.

    ``base_train`` / ``base_heldout``: the base model's predictions on the same questions (matched by id).
    """
    from .metrics import conf_ece, mean_confidence
    from .predictions import stack_probs

    if not train or not heldout:
        raise LlmcalError(f"regime diagnosis needs scored training and held-out questions "
                          f"(got {len(train)} and {len(heldout)})")
    ph, ah = stack_probs(heldout)
    base = {}
    if base_train is not None or base_heldout is not None:
        base = {"base_train_correct": _matched(train, base_train or [], "training"),
                "base_heldout_correct": _matched(heldout, base_heldout or [], "held-out")}
    return diagnose_correct([p.correct for p in train], [p.correct for p in heldout], **base, tolerance=tolerance,
                            n_resamples=n_bootstrap, seed=seed, heldout_ece=conf_ece(ph, ah, n_bins),
                            heldout_mean_conf=mean_confidence(ph))


def _matched(preds: Sequence, base: Sequence, what: str) -> list[bool]:
    """The base model's correctness on ``preds``' questions, in their order."""
    by_id = {p.id: p.correct for p in base}
    missing = [p.id for p in preds if p.id not in by_id]
    if missing or len(by_id) != len(preds):
        raise LlmcalError(f"regime diagnosis: the base model's {what} predictions are not on the same questions "
                          f"({len(base)} against {len(preds)}; e.g. missing {', '.join(map(str, missing[:3]))})")
    return [by_id[p.id] for p in preds]


def format_diagnosis(d: Diagnosis) -> str:
    """A few lines for a person: the accuracies, the gaps and their interval, the regime, the advice."""
    held = f"held-out accuracy  {d.heldout_accuracy:.4f}"
    extra = [f"conf-ECE {d.heldout_ece:.4f}" if d.heldout_ece is not None else "",
             f"mean conf {d.heldout_mean_conf:.4f}" if d.heldout_mean_conf is not None else ""]
    extra = [e for e in extra if e]
    if extra:
        held += f"  ({', '.join(extra)})"
    sizes = f" on {d.n_train} + {d.n_heldout} questions" if d.n_train else ""
    lines = [f"train accuracy     {d.train_accuracy:.4f}", held,
             f"gap                {d.gap:+.4f}  (train - held-out{sizes})"]
    if d.base_gap is not None:
        lines.append(f"base model's gap   {d.base_gap:+.4f}  (train {d.base_train_accuracy:.4f}, held-out "
                     f"{d.base_heldout_accuracy:.4f}: before any training)")
    added = d.gap if d.added_gap is None else d.added_gap
    ci = (f"  {100 * d.level:g}% interval [{d.interval[0]:+.4f}, {d.interval[1]:+.4f}]" if d.interval else "")
    lines.append(f"{'added gap' if d.base_gap is not None else 'gap judged':<19}{added:+.4f}{ci}  "
                 f"(tolerance {d.tolerance:.4f})")
    lines.append(f"ECE lower bound    {d.ece_lower_bound:.4f}  (held-out ECE an SFT fixed point cannot go below)")
    lines.append(f"regime             {d.regime}")
    if d.settle:
        lines.append(f"would settle it    about {d.settle['n_train']} training and {d.settle['n_heldout']} "
                     f"held-out questions")
    lines.append(f"recommended        --method {d.recommended}")
    return "\n".join(lines)


# ---- the regime run (``llmcal regime``) ---------------------------------------------
@config
class RegimeConfig:
    """Everything that decides a regime run's numbers (stored as the run's config.json); frozen, and checked
    against its field types when built (``llmcal.options.config``)."""

    model: str = shared("model")
    train: str = option(help="Training data: the dataset fine-tuning would train on (any --data spec).")
    heldout: Optional[str] = option(None, help="Held-out data: unseen questions (default: a held-out slice of "
                                               "--train, see --heldout-fraction).")
    gguf_file: str | None = shared("gguf_file")
    base: str | None = shared("base")
    heldout_fraction: OpenFraction = option(0.2, help="Share of --train held out when --heldout is not given (a "
                                                      "hash of each id and the seed).")
    train_limit: Optional[PositiveInt] = option(None, help="Use a fixed, seeded subset of this many training "
                                                           "questions.")
    heldout_limit: Optional[PositiveInt] = option(None, help="Use a fixed, seeded subset of this many held-out "
                                                             "questions.")
    seed: Int = shared("seed")
    template: Template = shared("template")
    dtype: Dtype = shared("dtype")
    device: str = shared("device")
    batch_tokens: PositiveInt = shared("batch_tokens")
    tolerance: NonNegativeNumber = option(DEFAULT_TOLERANCE, help="Largest train minus held-out accuracy that is "
                                                                  "still calibratable.")
    n_bins: PositiveInt = shared("n_bins")
    n_bootstrap: PositiveInt = shared("n_bootstrap")
    mapping: Optional[dict] = shared("mapping")


def regime_questions(cfg: RegimeConfig) -> tuple[tuple, tuple]:
    """The training and held-out questions of a regime run; raises LlmcalError on overlap or an empty side."""
    from .data import load_dataset
    from .data.loaders import take_limit
    from .data.splits import split_heldout

    if cfg.heldout is None:
        ds = load_dataset(cfg.train, seed=cfg.seed, mapping=cfg.mapping)
        train, held = split_heldout(ds.questions, cfg.heldout_fraction, cfg.seed)
        if cfg.train_limit is not None:
            train = take_limit(train, cfg.train_limit, cfg.seed)
        if cfg.heldout_limit is not None:
            held = take_limit(held, cfg.heldout_limit, cfg.seed)
        where = f"{cfg.train} with --heldout-fraction {cfg.heldout_fraction}"
    else:
        train = load_dataset(cfg.train, limit=cfg.train_limit, seed=cfg.seed, mapping=cfg.mapping).questions
        held = load_dataset(cfg.heldout, limit=cfg.heldout_limit, seed=cfg.seed, mapping=cfg.mapping).questions
        overlap = sorted({q.id for q in train} & {q.id for q in held})
        if overlap:
            raise LlmcalError(
                f"held-out data {cfg.heldout} shares {len(overlap)} question id(s) with the training data "
                f"{cfg.train} (e.g. {', '.join(overlap[:5])}); held-out questions must be unseen: pass a "
                f"disjoint --heldout, or leave it out to hold out a slice of the training data")
        where = f"{cfg.train} / {cfg.heldout}"
    if not train or not held:
        raise LlmcalError(f"{where}: {len(train)} training and {len(held)} held-out questions; both must be "
                          f"non-empty (use more questions or change --heldout-fraction)")
    return tuple(train), tuple(held)


def run_regime(cfg: RegimeConfig, out: str | Path, *, overwrite: bool = False, progress: bool = True,
               loaded=None):
    """``llmcal regime``: score the model on training and held-out data and diagnose the regime.

    Returns ``(RunRecord, Diagnosis)``.  Train accuracy is measured now, for the
    model as given.  For a fine-tuned model (an adapter) it is what fine-tuning
    fitted, and its base model is scored on the same two sets too, so the
    diagnosis judges the gap fine-tuning added.  For a model that has not been
    fine-tuned it is the starting point (no base: the gap itself is judged), and
    ``llmcal calibrate --method auto`` repeats exactly this check
    (:func:`diagnose_correct`, :func:`left_calibratable`) after each epoch.

    Writes a run directory: config.json, predictions-train.jsonl,
    predictions-heldout.jsonl (and predictions-base-*.jsonl for an adapter),
    reliability PNGs, diagnosis.json, report.md (with a "Regime diagnosis"
    section) and metrics.json (``meta["diagnosis"]``).  An interrupted run resumes.
    """
    from .evaluate import config_doc, load_for, run_meta
    from .io import atomic_write_json
    from .models import resolve_model
    from .pipeline import Run
    from .prompts import resolve_template

    spec = loaded.spec if loaded else resolve_model(cfg.model, gguf_file=cfg.gguf_file, base=cfg.base)
    train, held = regime_questions(cfg)  # bad input fails before the run directory is touched
    run = Run.start(out, config_doc(cfg, spec, "regime"), device=cfg.device, overwrite=overwrite,
                    progress=progress)
    loaded = loaded or load_for(cfg, spec)
    template = resolve_template(cfg.template, loaded.tokenizer)

    sliced = cfg.heldout is None
    sides = [("train", cfg.train, "train" if sliced else "all", train, "training data"),
             ("heldout", cfg.heldout or cfg.train, "heldout" if sliced else "all", held, "held-out data")]
    preds, results = {}, []

    def score_sides(model, prefix: str, who: str, cache: bool) -> None:
        for label, data, split, questions, what in sides:
            pred_file = f"predictions-{prefix}{label}.jsonl"
            preds[prefix + label] = run.score(pred_file, model, questions, template, cache=cache,
                                              description=f"regime: {who}{what}")
            results.append(run.result(prefix + label, preds[prefix + label], method="none", dataset=data,
                                      split=split, pred_file=pred_file,
                                      title=f"{model.spec.name}{' (base)' if prefix else ''} on {what} ({data})"))

    score_sides(loaded, "", "", cache=True)
    meta = run_meta(loaded, template)
    base_spec = spec.base if spec.kind == "lora" else None
    if base_spec is not None:  # the same questions before the adapter's training: the gap it started from
        del loaded
        score_sides(load_for(cfg, base_spec), "base-", "base model, ", cache=True)

    d = diagnose_predictions(preds["train"], preds["heldout"], base_train=preds.get("base-train"),
                             base_heldout=preds.get("base-heldout"), tolerance=cfg.tolerance, n_bins=cfg.n_bins,
                             n_bootstrap=cfg.n_bootstrap, seed=cfg.seed)
    log.info("regime diagnosis: %s", d.reason)
    run.on_main(lambda: atomic_write_json(run.file("diagnosis.json"), d.to_dict()), what="writing diagnosis.json")
    run.section("Regime diagnosis", report_section(d, results))
    meta.update(n_train=len(train), n_heldout=len(held), regime=d.regime, recommended=d.recommended,
                heldout_source=f"slice of train (fraction {cfg.heldout_fraction})" if sliced else cfg.heldout,
                base_model=base_spec.name if base_spec is not None else None, diagnosis=d.to_dict())
    return run.finish(model=spec.name, results=results, meta=meta), d


def report_section(d: Diagnosis, results) -> str:
    """The "Regime diagnosis" section of a report: the numbers behind the regime and the advice."""
    def cell(v):
        return "–" if v is None else f"{v:.4f}"

    rows = ["| data | N | accuracy | conf-ECE | mean conf |", "|---|---:|---:|---:|---:|"]
    for r in results:
        m = r.metrics
        rows.append(f"| {r.label} ({r.dataset}) | {m['n']} | {cell(m['accuracy'])} | {cell(m['conf_ece'])} | "
                    f"{cell(m['mean_conf'])} |")
    added = d.gap if d.added_gap is None else d.added_gap
    ci = f" [{d.interval[0]:+.4f}, {d.interval[1]:+.4f}] ({100 * d.level:g}% bootstrap interval)" if d.interval else ""
    lines = [*rows, "", f"- **gap** (train accuracy − held-out accuracy): {d.gap:+.4f}"]
    if d.base_gap is not None:
        lines.append(f"- **base model's gap** on the same questions, before any training: {d.base_gap:+.4f}")
        lines.append(f"- **added gap** (what fine-tuning added): {added:+.4f}{ci}; tolerance {d.tolerance:.4f}")
    else:
        lines.append(f"- **gap judged** (no base model to subtract): {added:+.4f}{ci}; tolerance {d.tolerance:.4f}")
    lines += [f"- **held-out ECE lower bound** (max(gap, 0)): {d.ece_lower_bound:.4f}",
              f"- **regime**: {d.regime}"]
    if d.settle:
        lines.append(f"- **would settle it**: about {d.settle['n_train']} training and {d.settle['n_heldout']} "
                     f"held-out questions (both sets {d.settle['factor']:.1f}x as large)")
    lines += [
        f"- **recommended**: `--method {d.recommended}`",
        f"- **why**: {d.reason}",
        "",
        "ECE ≥ |mean confidence − accuracy| always, and a model fine-tuned to its SFT fixed point has mean "
        "confidence close to its training accuracy, so its held-out ECE cannot go much below train accuracy − "
        "held-out accuracy. The verdict is on the part of that gap fine-tuning added (the model's gap minus its "
        "base model's on the same questions), with a paired bootstrap interval: calibratable when the interval "
        "lies at or below the tolerance, non-calibratable above it, undetermined when it straddles it. For a "
        "model not yet fine-tuned on this data the gap is its starting point, and `llmcal calibrate --method "
        "auto` repeats this check after each epoch.",
    ]
    return "\n".join(lines)
