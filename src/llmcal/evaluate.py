"""Evaluation runs: the library API behind ``llmcal eval`` and ``llmcal calibrate --method ts``.

Data flow: dataset -> encoded prompts -> scoring engine (flushed to the run as
it goes) -> predictions in dataset order -> metrics -> plots and report.

Sharded evaluation: started by a launcher (``torchrun --nproc_per_node N`` or
``accelerate launch --num_processes N``), every process joins a process group
(``llmcal.distributed``), scores its share of the batches and appends them to
its own partial file (``predictions.rank<r>-of-<N>.jsonl``).  Rank 0 alone
starts the run directory, merges the partial files into one predictions file in
dataset order (values exactly as the ranks computed them, so the file equals a
single-process run's), removes the partial files, and writes metrics, plots and
report; the other ranks write no run files and return the finished run.  An
interrupted sharded run resumes with any number of processes, one included.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from . import distributed
from .data import load_dataset
from .data.schema import Question
from .errors import LlmcalError
from .io import JsonlAppender, read_jsonl_tolerant
from .metrics import metrics_from_predictions
from .models import LoadedModel, ModelSpec, resolve_model
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


def _partial_name(filename: str, rank: int, world: int) -> str:
    stem, dot, ext = filename.rpartition(".")
    return f"{stem}.rank{rank}-of-{world}.{ext}" if dot else f"{filename}.rank{rank}-of-{world}"


def _partial_files(run: RunDir, filename: str) -> list[Path]:
    stem, dot, ext = filename.rpartition(".")
    pattern = f"{stem}.rank*-of-*.{ext}" if dot else f"{filename}.rank*-of-*"
    return sorted(run.path.glob(pattern))


def _read_scored(paths: Sequence[Path], wanted: set[str]) -> dict[str, Prediction]:
    have: dict[str, Prediction] = {}
    for path in paths:
        for rec in read_jsonl_tolerant(path):
            if rec.get("id") in wanted and rec["id"] not in have:
                have[rec["id"]] = Prediction.from_dict(rec)
    return have


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

    Under a launcher (several processes) each process scores its share of the
    batches into its own partial file; the partial files are merged into
    RUN/filename by rank 0, and every process returns the same merged list.
    """
    world = distributed.current_world() if distributed.is_initialized() else distributed.World()
    path = run.file(filename)
    wanted = {q.id for q in questions}
    partials = _partial_files(run, filename)
    # What any earlier attempt finished, whatever its number of processes.
    have = _read_scored([path, *partials], wanted)
    if have and world.is_main:
        log.info("resuming %s: %d of %d questions already scored", path, len(have), len(questions))
    encoded = encode_questions(questions, loaded.tokenizer, template)
    if world.distributed:
        mine = run.file(_partial_name(filename, world.rank, world.world_size))
        # Keep what this rank's file holds; re-writing drops a torn last line.
        kept = _read_scored([mine], wanted) if mine.exists() else {}
        write_predictions(mine, kept.values())
        out_path = mine
    else:
        # Re-write what we keep so that a torn last line cannot break the appender.
        write_predictions(path, have.values())
        out_path = path
    options = ScoreOptions(batch_tokens=batch_tokens, progress=progress and world.is_main,
                           description=description, shard=(world.rank, world.world_size))

    def run_scoring() -> None:
        with JsonlAppender(out_path) as out:
            def flush(preds: list[Prediction]) -> None:
                for p in preds:
                    out.write(p.to_dict())
                    have[p.id] = p

            score_loaded(loaded, encoded, options=options, done=set(have), on_batch=flush)

    distributed.collective(run_scoring, what=f"scoring {filename}")
    if world.distributed:
        # Every rank has finished its share: read all shares back.
        have = _read_scored([path, *_partial_files(run, filename)], wanted)
    missing = [q.id for q in questions if q.id not in have]
    if missing:
        raise LlmcalError(f"{path}: {len(missing)} question(s) were not scored (first: {missing[0]}); "
                          f"rerun the same command to resume")
    preds = [have[q.id] for q in questions]

    def merge() -> None:
        write_predictions(path, preds)
        for p in _partial_files(run, filename):
            p.unlink(missing_ok=True)

    distributed.barrier()  # nobody may still be reading the partial files
    distributed.on_main(merge, what=f"merging {filename}")
    return preds


def score_loaded(loaded: LoadedModel, encoded, *, options: ScoreOptions, done=(), on_batch=None) -> list[Prediction]:
    """The scoring engine of the model's backend (transformers, or vLLM when loaded through it)."""
    engine = loaded.extra.get("engine")
    if engine is not None:
        return engine.score(encoded, options=options, done=done, on_batch=on_batch)
    return score(loaded.model, loaded.tokenizer, encoded, options=options, done=done, on_batch=on_batch)


def _load(cfg: EvalConfig, spec: ModelSpec) -> LoadedModel:
    """Load the model for this process: the backend cfg names, on this rank's device."""
    from .backends import load_for_backend

    world = distributed.current_world()
    return load_for_backend(spec, backend=cfg.backend, dtype=cfg.dtype, device=cfg.device, world=world)


def _start(cfg: EvalConfig, spec: ModelSpec, kind: str, out: str | Path, overwrite: bool) -> RunDir:
    """Join the launcher's process group (if any) and start the run directory on rank 0 only."""
    from .backends import check_backend

    check_backend(cfg.backend)
    from .models import resolve_device

    distributed.init(resolve_device(cfg.device))
    run = RunDir(out)
    distributed.on_main(lambda: run.start(_config_doc(cfg, spec, kind), overwrite=overwrite),
                        what=f"starting the run in {out}")
    return run


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
    run = _start(cfg, spec, "eval", out, overwrite)
    loaded = loaded or distributed.collective(lambda: _load(cfg, spec), what="loading the model")
    template = resolve_template(cfg.template, loaded.tokenizer)
    preds = score_questions_into(run, "predictions.jsonl", loaded, questions, template,
                                 batch_tokens=cfg.batch_tokens, progress=progress,
                                 description=f"eval {cfg.data}")

    def finish() -> RunRecord:
        title = f"{spec.name} on {cfg.data} ({cfg.split})"
        results = [_result("none", "none", cfg, cfg.split, preds, run, "predictions.jsonl", "reliability.png",
                           title)]
        return _finish(run, cfg, spec, "eval", results, {"template": template, "dtype": loaded.dtype,
                                                         "device": _device_label(loaded),
                                                         "n_questions": len(preds)})

    return _finish_on_main(finish, run)


def run_calibrate_ts(cfg: EvalConfig, out: str | Path, *, overwrite: bool = False, progress: bool = True,
                     loaded: LoadedModel | None = None) -> RunRecord:
    """``llmcal calibrate --method ts``: fit a temperature on the calib split, report test before/after."""
    from .data.splits import apply_split

    spec = loaded.spec if loaded else resolve_model(cfg.model, gguf_file=cfg.gguf_file, base=cfg.base)
    ds, questions = _load_questions(cfg, "all")
    fractions = {"calib": cfg.calib_fraction, "test": 1.0 - cfg.calib_fraction}
    calib = apply_split(questions, "calib", cfg.seed, fractions)
    test = apply_split(questions, "test", cfg.seed, fractions)
    if len(calib) < 2 or not test:
        raise LlmcalError(f"{cfg.data}: {len(questions)} questions leave {len(calib)} for calibration and "
                          f"{len(test)} for testing; use more questions (--limit) or change --calib-fraction")
    run = _start(cfg, spec, "calibrate", out, overwrite)
    loaded = loaded or distributed.collective(lambda: _load(cfg, spec), what="loading the model")
    template = resolve_template(cfg.template, loaded.tokenizer)
    # One scoring pass over both splits (one file, resumable), then split the predictions.
    allp = score_questions_into(run, "scores.jsonl", loaded, calib + test, template,
                                batch_tokens=cfg.batch_tokens, progress=progress,
                                description=f"score {cfg.data}")
    return _finish_on_main(lambda: _calibrate_outputs(cfg, spec, run, loaded, template, allp, calib, test), run)


def _calibrate_outputs(cfg: EvalConfig, spec: ModelSpec, run: RunDir, loaded: LoadedModel, template: str,
                       allp: list[Prediction], calib: list[Question], test: list[Question]) -> RunRecord:
    from .posthoc import TemperatureScaler, temperature_scale_predictions

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
                                                          "device": _device_label(loaded), **extra})


def _device_label(loaded: LoadedModel) -> str:
    """The device for the run's metadata: the same string for every process count."""
    world = distributed.current_world()
    dev = loaded.device
    if world.distributed and dev.startswith("cuda:"):
        dev = "cuda"
    return dev if not world.distributed else f"{dev} x{world.world_size}"


def _finish_on_main(finish, run: RunDir) -> RunRecord:
    """Rank 0 writes the run's outputs; every process returns the finished run."""
    rec = distributed.on_main(finish, what=f"writing the run in {run.path}")
    return rec if rec is not None else load_run(run.path)


def _finish(run: RunDir, cfg: EvalConfig, spec: ModelSpec, kind: str, results: list[RunResult],
            meta: dict) -> RunRecord:
    from .report.runreport import write_run_report

    config = _config_doc(cfg, spec, kind)
    write_run_report(run.path, config, results, meta)
    run.finish(kind=kind, model=spec.name, results=results, meta=meta)
    return load_run(run.path)
