"""Evaluation runs: the library API behind ``llmcal eval`` and ``llmcal calibrate --method ts``.

Data flow: dataset -> encoded prompts -> scoring engine (flushed to the run as
it goes, through ``llmcal.pipeline.Run``) -> predictions in dataset order ->
metrics -> plots and report.

Under a launcher (``torchrun --nproc_per_node N`` or ``accelerate launch``)
every process scores its share of the batches; rank 0 writes the run, which
equals a single-process run (see ``llmcal.pipeline``).
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from . import distributed
from .data import load_dataset
from .data.schema import Question
from .errors import LlmcalError
from .models import LoadedModel, ModelSpec, resolve_model
from .options import option, shared
from .pipeline import Run
from .prompts import resolve_template
from .runs import RunRecord

log = logging.getLogger(__name__)

SPLIT_CHOICES = ("all", "train", "calib", "test")


@dataclass
class EvalConfig:
    """Everything that decides an evaluation's numbers (stored as the run's config.json)."""

    # pydantic validates YAML and study options against these fields: unknown keys are errors.
    __pydantic_config__ = {"extra": "forbid"}


    model: str = shared("model")
    data: str = option(help="mmlu, arc-challenge, arc-easy, openbookqa, medmcqa, a .jsonl/.json/.csv/.parquet "
                            "file, or synthetic:<task>?difficulty=N&n=N.", short="-d")
    gguf_file: str | None = shared("gguf_file")
    base: str | None = shared("base")
    split: str = option("all", help="Named split of --data: all, train (60%), calib (20%) or test (20%), by a "
                                    "hash of each question id and the seed.")
    subjects: list[str] | None = option(None, flag="--subject", help="Keep only this subject of --data "
                                                                     "(repeatable).")
    limit: int | None = option(None, help="Use a fixed, seeded subset of this many questions of --data.")
    seed: int = shared("seed")
    template: str = shared("template")
    dtype: str = shared("dtype")
    device: str = shared("device")
    batch_tokens: int = shared("batch_tokens")
    n_bins: int = shared("n_bins")
    n_bootstrap: int = shared("n_bootstrap")
    mapping: dict | None = shared("mapping")
    calib_fraction: float = option(0.2, help="ts: share of --data held out to fit the temperature (a hash of "
                                             "each id and the seed); the rest is the test part.")
    method: str = option("none", cli=False, help="none (eval) or ts (calibrate --method ts).")
    backend: str = option("hf", help="Scoring backend: hf (transformers) or vllm (GPU, needs vllm installed).")


def _check(cfg: EvalConfig) -> None:
    if cfg.split not in SPLIT_CHOICES:
        raise LlmcalError(f"--split {cfg.split!r}: choose one of {', '.join(SPLIT_CHOICES)}")
    for name in ("batch_tokens", "n_bins", "n_bootstrap"):
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise LlmcalError(f"--{name.replace('_', '-')} must be a positive integer (got {v!r})")
    if cfg.limit is not None and (isinstance(cfg.limit, bool) or not isinstance(cfg.limit, int) or cfg.limit < 1):
        raise LlmcalError(f"--limit must be a positive integer (got {cfg.limit!r})")
    if not 0 < cfg.calib_fraction < 1:
        raise LlmcalError(f"--calib-fraction must be between 0 and 1 (got {cfg.calib_fraction})")


def _load_questions(cfg: EvalConfig, split: str | None) -> list[Question]:
    ds = load_dataset(cfg.data, split=None if split in (None, "all") else split, subjects=cfg.subjects,
                      limit=cfg.limit, seed=cfg.seed, mapping=cfg.mapping)
    if not ds.questions:
        raise LlmcalError(f"{cfg.data}: no questions left after the split/subject/limit filters")
    return list(ds.questions)


def load_for(cfg: Any, spec: ModelSpec) -> LoadedModel:
    """Load the model for this process: the backend ``cfg`` names, on this rank's device."""
    from .backends import load_for_backend

    world = distributed.current_world()
    return distributed.collective(lambda: load_for_backend(spec, backend=getattr(cfg, "backend", "hf"),
                                                           dtype=cfg.dtype, device=cfg.device, world=world),
                                  what="loading the model")


def config_doc(cfg: Any, spec: ModelSpec, kind: str) -> dict:
    """A run's config.json: the config's fields, the command kind and the resolved model spec."""
    d = asdict(cfg)
    d["kind"] = kind
    d["model_spec"] = spec.to_dict()
    return d


def run_meta(loaded: LoadedModel, template: str, **extra: Any) -> dict:
    return {"template": template, "dtype": loaded.dtype, "device": device_label(loaded), **extra}


def run_eval(cfg: EvalConfig, out: str | Path, *, overwrite: bool = False, progress: bool = True,
             loaded: LoadedModel | None = None) -> RunRecord:
    """``llmcal eval``: score a dataset, write predictions, metrics, reliability diagram, report."""
    from .backends import check_backend

    _check(cfg)
    check_backend(cfg.backend)
    spec = loaded.spec if loaded else resolve_model(cfg.model, gguf_file=cfg.gguf_file, base=cfg.base)
    questions = _load_questions(cfg, cfg.split)
    run = Run.start(out, config_doc(cfg, spec, "eval"), device=cfg.device, overwrite=overwrite, progress=progress)
    loaded = loaded or load_for(cfg, spec)
    template = resolve_template(cfg.template, loaded.tokenizer)
    preds = run.score("predictions.jsonl", loaded, questions, template, cache=True, description=f"eval {cfg.data}")
    res = run.result("none", preds, dataset=cfg.data, split=cfg.split, pred_file="predictions.jsonl",
                     png="reliability.png", title=f"{spec.name} on {cfg.data} ({cfg.split})")
    return run.finish(model=spec.name, results=[res], meta=run_meta(loaded, template, n_questions=len(preds)))


def run_calibrate_ts(cfg: EvalConfig, out: str | Path, *, overwrite: bool = False, progress: bool = True,
                     loaded: LoadedModel | None = None) -> RunRecord:
    """``llmcal calibrate --method ts``: fit a temperature on a held-out slice, report the rest before/after."""
    from .backends import check_backend
    from .data.splits import split_heldout
    from .posthoc import TemperatureScaler, temperature_scale_predictions
    from .predictions import write_predictions

    _check(cfg)
    check_backend(cfg.backend)
    spec = loaded.spec if loaded else resolve_model(cfg.model, gguf_file=cfg.gguf_file, base=cfg.base)
    questions = _load_questions(cfg, cfg.split)
    test, calib = split_heldout(questions, cfg.calib_fraction, cfg.seed)
    if len(calib) < 2 or not test:
        raise LlmcalError(f"{cfg.data}: {len(questions)} questions leave {len(calib)} for calibration and "
                          f"{len(test)} for testing; use more questions (--limit) or change --calib-fraction")
    run = Run.start(out, config_doc(cfg, spec, "calibrate"), device=cfg.device, overwrite=overwrite,
                    progress=progress)
    loaded = loaded or load_for(cfg, spec)
    template = resolve_template(cfg.template, loaded.tokenizer)
    # One scoring pass over both parts (one file, resumable, cached), then split the predictions.
    allp = run.score("scores.jsonl", loaded, list(calib) + list(test), template, cache=True,
                     description=f"score {cfg.data}")
    pc, pt = allp[:len(calib)], allp[len(calib):]
    ts = TemperatureScaler().fit([p.logits for p in pc], [p.answer for p in pc])
    pt_ts = temperature_scale_predictions(pt, ts.temperature_)

    def write() -> None:
        write_predictions(run.file("predictions-calib.jsonl"), pc)
        write_predictions(run.file("predictions.jsonl"), pt)
        write_predictions(run.file("predictions-ts.jsonl"), pt_ts)

    run.on_main(write, what="writing the predictions")
    extra = {"temperature": ts.temperature_, "calib_n": len(pc), "calib_nll_before": ts.nll_before_,
             "calib_nll_after": ts.nll_after_}
    results = [
        run.result("none", pt, dataset=cfg.data, split="test", pred_file="predictions.jsonl", png="reliability.png",
                   title=f"{spec.name}: before (test)"),
        run.result("ts", pt_ts, dataset=cfg.data, split="test", pred_file="predictions-ts.jsonl",
                   title=f"{spec.name}: temperature scaling T={ts.temperature_:.2f} (test)", extra=extra),
    ]
    return run.finish(model=spec.name, results=results, meta=run_meta(loaded, template, **extra))


def device_label(loaded: LoadedModel) -> str:
    """The device for the run's metadata: the same string for every process count."""
    world = distributed.current_world()
    dev = loaded.device
    if world.distributed and dev.startswith("cuda:"):
        dev = "cuda"
    return dev if not world.distributed else f"{dev} x{world.world_size}"
