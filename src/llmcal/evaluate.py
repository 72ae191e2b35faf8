"""Evaluation runs: the library API behind ``llmcal eval`` and ``llmcal calibrate --method ts``.

Data flow: dataset -> encoded prompts -> scoring engine (flushed to the run as
it goes) -> predictions in dataset order -> metrics -> plots and report.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .data import load_dataset
from .data.schema import Question
from .errors import LlmcalError
from .io import JsonlAppender, read_jsonl_tolerant
from .metrics import metrics_from_predictions
from .models import LoadedModel, ModelSpec, load_model, resolve_model
from .predictions import Prediction, write_predictions
from .prompts import encode_questions, resolve_template
from .runs import RunDir, RunRecord, RunResult, load_run
from .scoring import DEFAULT_BATCH_TOKENS, ScoreOptions, score

log = logging.getLogger(__name__)


@dataclass
class EvalConfig:
    """Everything that decides an evaluation's numbers (stored as the run's config.json)."""

    model: str
    data: str
    gguf_file: str | None = None
    base: str | None = None
    split: str = "all"
    subjects: list[str] | None = None
    limit: int | None = None
    seed: int = 0
    template: str = "auto"
    dtype: str = "auto"
    device: str = "auto"
    batch_tokens: int = DEFAULT_BATCH_TOKENS
    n_bins: int = 10
    n_bootstrap: int = 1000
    mapping: dict | None = None
    calib_fraction: float = 0.2  # for calibrate: the share of questions used to fit the calibrator
    method: str = "none"
    backend: str = "hf"  # hf (transformers) or vllm


def _load_questions(cfg: EvalConfig, split: str | None) -> tuple[Any, list[Question]]:
    ds = load_dataset(cfg.data, split=None if split in (None, "all") else split, subjects=cfg.subjects,
                      limit=cfg.limit, seed=cfg.seed, mapping=cfg.mapping)
    if not ds.questions:
        raise LlmcalError(f"{cfg.data}: no questions left after the split/subject/limit filters")
    return ds, list(ds.questions)


def score_questions_into(
    run: RunDir,
    filename: str,
    loaded: LoadedModel,
    questions: Sequence[Question],
    template: str,
    *,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    progress: bool = True,
    description: str = "scoring",
) -> list[Prediction]:
    """Score questions, appending to RUN/filename as batches finish; resume from what is there.

    Returns predictions in the order of ``questions`` and rewrites the file in that
    order, so a resumed run ends with exactly the file an uninterrupted one writes.
    """
    path = run.file(filename)
    wanted = {q.id for q in questions}
    have: dict[str, Prediction] = {}
    for rec in read_jsonl_tolerant(path):
        if rec.get("id") in wanted:
            have[rec["id"]] = Prediction.from_dict(rec)
    if have:
        log.info("resuming %s: %d of %d questions already scored", path, len(have), len(questions))
    encoded = encode_questions(questions, loaded.tokenizer, template)
    # Re-write what we keep so that a torn last line cannot break the appender.
    write_predictions(path, have.values())
    with JsonlAppender(path) as out:
        def flush(preds: list[Prediction]) -> None:
            for p in preds:
                out.write(p.to_dict())
                have[p.id] = p

        score(loaded.model, loaded.tokenizer, encoded,
              options=ScoreOptions(batch_tokens=batch_tokens, progress=progress, description=description),
              done=set(have), on_batch=flush)
    preds = [have[q.id] for q in questions]
    write_predictions(path, preds)
    return preds


def _result(label: str, method: str, cfg: EvalConfig, split: str | None, preds: list[Prediction],
            run: RunDir, pred_file: str, png: str, title: str, extra: dict | None = None) -> RunResult:
    from .report.plots import save_reliability

    m = metrics_from_predictions(preds, n_bins=cfg.n_bins, n_bootstrap=cfg.n_bootstrap, seed=cfg.seed)
    save_reliability(m["reliability"], run.file(png), title, metrics=m)
    return RunResult(label=label, method=method, dataset=cfg.data, split=split or "all", predictions=pred_file,
                     metrics=m, reliability=png, extra=extra or {})


def _config_doc(cfg: EvalConfig, spec: ModelSpec, kind: str) -> dict:
    d = asdict(cfg)
    d["kind"] = kind
    d["model_spec"] = spec.to_dict()
    return d


def run_eval(cfg: EvalConfig, out: str | Path, *, overwrite: bool = False, progress: bool = True,
             loaded: LoadedModel | None = None) -> RunRecord:
    """``llmcal eval``: score a dataset, write predictions, metrics, reliability diagram, report."""
    spec = loaded.spec if loaded else resolve_model(cfg.model, gguf_file=cfg.gguf_file, base=cfg.base)
    ds, questions = _load_questions(cfg, cfg.split)
    run = RunDir(out)
    run.start(_config_doc(cfg, spec, "eval"), overwrite=overwrite)
    loaded = loaded or load_model(spec, dtype=cfg.dtype, device=cfg.device)
    template = resolve_template(cfg.template, loaded.tokenizer)
    preds = score_questions_into(run, "predictions.jsonl", loaded, questions, template,
                                 batch_tokens=cfg.batch_tokens, progress=progress,
                                 description=f"eval {cfg.data}")
    title = f"{spec.name} on {cfg.data} ({cfg.split})"
    results = [_result("none", "none", cfg, cfg.split, preds, run, "predictions.jsonl", "reliability.png", title)]
    return _finish(run, cfg, spec, "eval", results, {"template": template, "dtype": loaded.dtype,
                                                     "device": loaded.device, "n_questions": len(preds)})


def run_calibrate_ts(cfg: EvalConfig, out: str | Path, *, overwrite: bool = False, progress: bool = True,
                     loaded: LoadedModel | None = None) -> RunRecord:
    """``llmcal calibrate --method ts``: fit a temperature on the calib split, report test before/after."""
    from .data.splits import apply_split
    from .posthoc import TemperatureScaler, temperature_scale_predictions

    spec = loaded.spec if loaded else resolve_model(cfg.model, gguf_file=cfg.gguf_file, base=cfg.base)
    ds, questions = _load_questions(cfg, "all")
    fractions = {"calib": cfg.calib_fraction, "test": 1.0 - cfg.calib_fraction}
    calib = apply_split(questions, "calib", cfg.seed, fractions)
    test = apply_split(questions, "test", cfg.seed, fractions)
    if len(calib) < 2 or not test:
        raise LlmcalError(f"{cfg.data}: {len(questions)} questions leave {len(calib)} for calibration and "
                          f"{len(test)} for testing; use more questions (--limit) or change --calib-fraction")
    run = RunDir(out)
    run.start(_config_doc(cfg, spec, "calibrate"), overwrite=overwrite)
    loaded = loaded or load_model(spec, dtype=cfg.dtype, device=cfg.device)
    template = resolve_template(cfg.template, loaded.tokenizer)
    # One scoring pass over both splits (one file, resumable), then split the predictions.
    allp = score_questions_into(run, "scores.jsonl", loaded, calib + test, template,
                                batch_tokens=cfg.batch_tokens, progress=progress,
                                description=f"score {cfg.data}")
    by_id = {p.id: p for p in allp}
    pc = [by_id[q.id] for q in calib]
    pt = [by_id[q.id] for q in test]
    ts = TemperatureScaler().fit([p.logits for p in pc], [p.answer for p in pc])
    pt_ts = temperature_scale_predictions(pt, ts.temperature_)
    write_predictions(run.file("predictions-calib.jsonl"), pc)
    write_predictions(run.file("predictions.jsonl"), pt)
    write_predictions(run.file("predictions-ts.jsonl"), pt_ts)
    extra = {"temperature": ts.temperature_, "calib_n": len(pc), "calib_nll_before": ts.nll_before_,
             "calib_nll_after": ts.nll_after_}
    results = [
        _result("none", "none", cfg, "test", pt, run, "predictions.jsonl", "reliability.png",
                f"{spec.name}: before (test)"),
        _result("ts", "ts", cfg, "test", pt_ts, run, "predictions-ts.jsonl", "reliability-ts.png",
                f"{spec.name}: temperature scaling T={ts.temperature_:.2f} (test)", extra=extra),
    ]
    return _finish(run, cfg, spec, "calibrate", results, {"template": template, "dtype": loaded.dtype,
                                                          "device": loaded.device, **extra})


def _finish(run: RunDir, cfg: EvalConfig, spec: ModelSpec, kind: str, results: list[RunResult],
            meta: dict) -> RunRecord:
    from .report.runreport import write_run_report

    config = _config_doc(cfg, spec, kind)
    write_run_report(run.path, config, results, meta)
    run.finish(kind=kind, model=spec.name, results=results, meta=meta)
    return load_run(run.path)
