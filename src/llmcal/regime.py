"""Regime diagnosis (docs/reference.md, "Regime diagnosis").

ECE >= |mean confidence - accuracy| always, and an SFT fixed point has mean
confidence close to its training accuracy, so after fine-tuning the held-out
ECE is bounded below by about ``train accuracy - held-out accuracy``.  When
that gap is within a tolerance the model is *calibratable*: CFT can reach
near-zero ECE without giving up accuracy.  Otherwise it is *non-calibratable*
and RCFT's ECE regulariser is recommended.

``diagnose`` classifies from the numbers; ``diagnose_predictions`` computes them
from scored questions (what ``--method auto`` does after each epoch);
``run_regime`` is ``llmcal regime``: it scores a model on training and held-out
data and writes a run directory with the diagnosis.
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from .errors import LlmcalError
from .options import option, shared

log = logging.getLogger(__name__)

DEFAULT_TOLERANCE = 0.05
CALIBRATABLE = "calibratable"
NON_CALIBRATABLE = "non-calibratable"


@dataclass(frozen=True)
class Diagnosis:
    train_accuracy: float
    heldout_accuracy: float
    heldout_ece: float | None
    heldout_mean_conf: float | None
    gap: float  # train accuracy - held-out accuracy
    ece_lower_bound: float  # max(gap, 0): the held-out ECE an SFT fixed point cannot go below
    tolerance: float
    regime: str
    recommended: str  # cft | rcft
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Diagnosis":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})


def diagnose(train_accuracy: float, heldout_accuracy: float, *, heldout_ece: float | None = None,
             heldout_mean_conf: float | None = None, tolerance: float = DEFAULT_TOLERANCE) -> Diagnosis:
    """Classify the regime from train vs held-out accuracy (the numbers are reported as used)."""
    gap = float(train_accuracy) - float(heldout_accuracy)
    bound = max(gap, 0.0)
    if gap <= tolerance:
        regime, rec = CALIBRATABLE, "cft"
        reason = (f"train accuracy {train_accuracy:.4f} - held-out accuracy {heldout_accuracy:.4f} = {gap:.4f} "
                  f"<= tolerance {tolerance:.4f}: an SFT fixed point can be calibrated on unseen data, use CFT")
    else:
        regime, rec = NON_CALIBRATABLE, "rcft"
        reason = (f"train accuracy {train_accuracy:.4f} - held-out accuracy {heldout_accuracy:.4f} = {gap:.4f} "
                  f"> tolerance {tolerance:.4f}: SFT would stay over-confident on unseen data (held-out ECE "
                  f">= ~{bound:.4f}); use RCFT")
    return Diagnosis(train_accuracy=float(train_accuracy), heldout_accuracy=float(heldout_accuracy),
                     heldout_ece=heldout_ece, heldout_mean_conf=heldout_mean_conf, gap=gap,
                     ece_lower_bound=bound, tolerance=tolerance, regime=regime, recommended=rec, reason=reason)


def left_calibratable(train_accuracy: float, heldout_accuracy: float, tolerance: float = DEFAULT_TOLERANCE) -> bool:
    """True once fine-tuning has pushed train accuracy more than ``tolerance`` above held-out accuracy."""
    return float(train_accuracy) - float(heldout_accuracy) > tolerance


def diagnose_predictions(train: Sequence, heldout: Sequence, *, tolerance: float = DEFAULT_TOLERANCE,
                         n_bins: int = 10) -> Diagnosis:
    """:func:`diagnose` from scored questions (``Prediction`` lists): accuracies, held-out conf-ECE and mean conf."""
    from .metrics import accuracy, conf_ece, mean_confidence
    from .predictions import stack_probs

    if not train or not heldout:
        raise LlmcalError(f"regime diagnosis needs scored training and held-out questions "
                          f"(got {len(train)} and {len(heldout)})")
    pt, at = stack_probs(train)
    ph, ah = stack_probs(heldout)
    return diagnose(accuracy(pt, at), accuracy(ph, ah), heldout_ece=conf_ece(ph, ah, n_bins),
                    heldout_mean_conf=mean_confidence(ph), tolerance=tolerance)


def format_diagnosis(d: Diagnosis) -> str:
    """A few lines for a person: the accuracies, held-out calibration, the bound, the regime, the advice."""
    held = f"held-out accuracy  {d.heldout_accuracy:.4f}"
    extra = [f"conf-ECE {d.heldout_ece:.4f}" if d.heldout_ece is not None else "",
             f"mean conf {d.heldout_mean_conf:.4f}" if d.heldout_mean_conf is not None else ""]
    extra = [e for e in extra if e]
    if extra:
        held += f"  ({', '.join(extra)})"
    return "\n".join([
        f"train accuracy     {d.train_accuracy:.4f}",
        held,
        f"gap                {d.gap:+.4f}  (tolerance {d.tolerance:.4f})",
        f"ECE lower bound    {d.ece_lower_bound:.4f}  (held-out ECE an SFT fixed point cannot go below)",
        f"regime             {d.regime}",
        f"recommended        --method {d.recommended}",
    ])


# ---- the regime run (``llmcal regime``) ---------------------------------------------
@dataclass
class RegimeConfig:
    """Everything that decides a regime run's numbers (stored as the run's config.json)."""

    # pydantic validates YAML and study options against these fields: unknown keys are errors.
    __pydantic_config__ = {"extra": "forbid"}


    model: str = shared("model")
    train: str = option(help="Training data: the dataset fine-tuning would train on (any --data spec).")
    heldout: str | None = option(None, help="Held-out data: unseen questions (default: a held-out slice of "
                                            "--train, see --heldout-fraction).")
    gguf_file: str | None = shared("gguf_file")
    base: str | None = shared("base")
    heldout_fraction: float = option(0.2, help="Share of --train held out when --heldout is not given (a hash "
                                               "of each id and the seed).")
    train_limit: int | None = option(None, help="Use a fixed, seeded subset of this many training questions.")
    heldout_limit: int | None = option(None, help="Use a fixed, seeded subset of this many held-out questions.")
    seed: int = shared("seed")
    template: str = shared("template")
    dtype: str = shared("dtype")
    device: str = shared("device")
    batch_tokens: int = shared("batch_tokens")
    tolerance: float = option(DEFAULT_TOLERANCE, help="Largest train minus held-out accuracy that is still "
                                                      "calibratable.")
    n_bins: int = shared("n_bins")
    n_bootstrap: int = shared("n_bootstrap")
    mapping: dict | None = shared("mapping")


def regime_questions(cfg: RegimeConfig) -> tuple[tuple, tuple]:
    """The training and held-out questions of a regime run; raises LlmcalError on overlap or an empty side."""
    from .data import load_dataset
    from .data.loaders import take_limit
    from .data.splits import split_heldout

    if cfg.heldout is None:
        ds = load_dataset(cfg.train, seed=cfg.seed, mapping=cfg.mapping)
        if not 0 < cfg.heldout_fraction < 1:
            raise LlmcalError(f"--heldout-fraction must be between 0 and 1 (got {cfg.heldout_fraction!r})")
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


def _check_config(cfg: RegimeConfig) -> None:
    t = cfg.tolerance
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
        raise LlmcalError(f"--tolerance must be a finite number >= 0, got {t!r}")


def run_regime(cfg: RegimeConfig, out: str | Path, *, overwrite: bool = False, progress: bool = True,
               loaded=None):
    """``llmcal regime``: score the model on training and held-out data and diagnose the regime.

    Returns ``(RunRecord, Diagnosis)``.  Train accuracy is measured now, for the
    model as given: for a fine-tuned model (an adapter) it is what fine-tuning
    fitted, and the diagnosis says whether that model can still be calibrated on
    unseen data.  For a model that has not been fine-tuned on ``train`` it is the
    starting point, and ``llmcal calibrate --method auto`` repeats exactly this
    check (:func:`diagnose_predictions`, :func:`left_calibratable`) after each epoch.

    Writes a run directory: config.json, predictions-train.jsonl,
    predictions-heldout.jsonl, reliability-train.png, reliability-heldout.png,
    diagnosis.json, report.md (with a "Regime diagnosis" section) and
    metrics.json (``meta["diagnosis"]``).  An interrupted run resumes.
    """
    from .evaluate import config_doc, load_for, run_meta
    from .io import atomic_write_json
    from .models import resolve_model
    from .pipeline import Run
    from .prompts import resolve_template

    _check_config(cfg)
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
    for label, data, split, questions, what in sides:
        pred_file = f"predictions-{label}.jsonl"
        preds[label] = run.score(pred_file, loaded, questions, template, cache=True,
                                 description=f"regime: {what}")
        results.append(run.result(label, preds[label], method="none", dataset=data, split=split,
                                  pred_file=pred_file, title=f"{spec.name} on {what} ({data})"))

    d = diagnose_predictions(preds["train"], preds["heldout"], tolerance=cfg.tolerance, n_bins=cfg.n_bins)
    log.info("regime diagnosis: %s", d.reason)
    run.on_main(lambda: atomic_write_json(run.file("diagnosis.json"), d.to_dict()), what="writing diagnosis.json")
    run.section("Regime diagnosis", report_section(d, results))
    meta = run_meta(loaded, template, n_train=len(train), n_heldout=len(held),
                    heldout_source=f"slice of train (fraction {cfg.heldout_fraction})" if sliced else cfg.heldout,
                    regime=d.regime, recommended=d.recommended, diagnosis=d.to_dict())
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
    return "\n".join([
        *rows, "",
        f"- **gap** (train accuracy − held-out accuracy): {d.gap:+.4f}; tolerance {d.tolerance:.4f}",
        f"- **held-out ECE lower bound** (max(gap, 0)): {d.ece_lower_bound:.4f}",
        f"- **regime**: {d.regime}",
        f"- **recommended**: `--method {d.recommended}`",
        f"- **why**: {d.reason}",
        "",
        "ECE ≥ |mean confidence − accuracy| always, and a model fine-tuned to its SFT fixed point has mean "
        "confidence close to its training accuracy, so its held-out ECE cannot go much below train accuracy − "
        "held-out accuracy. Train accuracy here is the model's as given: for a model not yet fine-tuned on this "
        "data it is the starting point, and `llmcal calibrate --method auto` repeats this check after each epoch.",
    ])
