"""The cells of a study: the data a sweep point's cells share, and one runner per cell kind.

``none``/``ts`` score the base model (reusing another cell's base-model predictions of the same data)
and fit temperature scaling on ``calib``; ``cft``/``rcft``/``auto`` call ``llmcal.train.run.run_finetune``;
``regime`` scores the fine-tuned model on its own training questions and diagnoses it.  Each runner
takes the runner's context (``runner.Context``: the study, the output directory, the loaded model).
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import LlmcalError
from ..io import atomic_write_text
from .grid import (DOMAIN, EVAL_ROLES, REGIME, ROLES, SPLIT_SALT, TRAINING, Cell, Point, Study, bad, eval_config,
                   finetune_config)
from .util import norm, read_json, rel

if TYPE_CHECKING:
    from .runner import Context

log = logging.getLogger(__name__)


# ---- data --------------------------------------------------------------------------------
@dataclass
class PointData:
    paths: dict  # role -> Path
    questions: dict  # role -> tuple[Question, ...]
    info: dict  # role -> {path, n, hash, subjects, entries}


def materialise(study: Study, point: Point, out: Path) -> PointData:
    """Load every role of a point, check the roles are disjoint, write them as JSONL under DIR/data/<hash>/."""
    from ..data import TRAINING_SPLITS, apply_split, load_dataset, take_limit
    from ..io import dumps

    roles = study.point_data(point)
    where = f"sweep point {point.name}: " if point.name else ""
    paths, questions, info = {}, {}, {}
    for role, entries in roles.items():
        qs, seen = [], {}
        for i, e in enumerate(entries):
            key = f"data.{role}" + (f"[{i}]" if len(entries) > 1 else "")
            try:
                ds = load_dataset(e.spec, subjects=list(e.subjects) if e.subjects else None, seed=study.seed,
                                  mapping=e.mapping)
                selected = apply_split(ds.questions, e.split, study.seed + SPLIT_SALT, e.fractions or TRAINING_SPLITS)
                if e.limit is not None:
                    selected = take_limit(selected, e.limit, study.seed)
            except LlmcalError as x:
                raise bad(study.path, key, f"{where}{x}") from None
            if not selected:
                raise bad(study.path, key, f"{where}{e.spec}: no questions left after the split/subject/limit "
                                           f"filters")
            for q in selected:
                if q.id in seen:
                    raise bad(study.path, key, f"{where}question id {q.id!r} appears twice in data.{role} "
                                               f"(entries {seen[q.id]} and {i}); make the entries disjoint")
                seen[q.id] = i
            qs += selected
        text = "".join(dumps(q.to_dict()) + "\n" for q in qs)
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]
        p = (out / "data" / digest / f"{role}.jsonl").resolve()
        if not p.exists() or p.read_text(encoding="utf-8") != text:
            atomic_write_text(p, text)
        paths[role], questions[role] = p, tuple(qs)
        subjects: dict[str, int] = {}
        for q in qs:
            subjects[q.subject or "-"] = subjects.get(q.subject or "-", 0) + 1
        info[role] = {"path": rel(p, out), "n": len(qs), "hash": digest, "subjects": subjects,
                      "options": sorted({len(q.choices) for q in qs}), "entries": [e.to_dict() for e in entries]}
    ids = {r: {q.id for q in qs} for r, qs in questions.items()}
    order = [r for r in ROLES if r in ids]
    for i, a in enumerate(order):
        for b in order[i + 1:]:
            if {a, b} == {"train", "calib"}:
                continue
            shared = sorted(ids[a] & ids[b])
            if shared:
                raise bad(study.path, f"data.{a} / data.{b}",
                          f"{where}share {len(shared)} question id(s) (e.g. {', '.join(shared[:5])}); roles must be "
                          f"disjoint: use different subjects or hash splits (split: train / split: test)")
    return PointData(paths=paths, questions=questions, info=info)


# ---- configs -------------------------------------------------------------------------------
def run_dir(ctx: Context, cell: Cell):
    from ..runs import RunDir

    return RunDir(ctx.out / cell.rel)


def cell_config(ctx: Context, cell: Cell) -> dict:
    """The config a cell's run records (what decides whether a complete run is this cell's)."""
    pd = ctx.point(cell.point)
    if cell.kind in TRAINING:
        from ..train.config import apply_preset

        return dataclasses.asdict(apply_preset(finetune_config(ctx.study, cell, pd.paths, resume=False)))
    if cell.kind == REGIME:
        return regime_config(ctx, cell)
    return posthoc_config(ctx, cell)


def posthoc_config(ctx: Context, cell: Cell) -> dict:
    pd = ctx.point(cell.point)
    cfg = eval_config(ctx.study, cell, pd.paths)
    d = dataclasses.asdict(cfg)
    for k in ("data", "split", "subjects", "limit", "mapping", "calib_fraction"):
        d.pop(k, None)
    d["evals"] = {r: str(pd.paths[r]) for r in EVAL_ROLES if r in pd.paths}
    if cell.kind == "ts":
        role = "calib" if "calib" in pd.paths else "train"
        d["calib"] = {"role": role, "path": str(pd.paths[role])}
    d["kind"] = f"study-{cell.kind}"
    return d


def regime_source(ctx: Context, cell: Cell) -> Cell:
    return next(c for c in ctx.study.cells() if c.model.key == cell.model.key and c.point.name == cell.point.name
                and c.method is not None and c.method.key == ctx.study.regime_from)


def regime_config(ctx: Context, cell: Cell) -> dict:
    from ..runs import RunDir

    src = regime_source(ctx, cell)
    srd = RunDir(ctx.out / src.rel)
    if not srd.is_complete:
        raise LlmcalError(f"{cell.name}: needs the complete run of {src.name} (the fine-tuned model it diagnoses)")
    scfg = read_json(srd.file("config.json"))
    smeta = read_json(srd.file("metrics.json"))
    opts = ctx.study.options(cell)
    return {
        "kind": "study-regime", "source": src.rel, "source_finished": smeta.get("finished"),
        "model": str(srd.path / smeta.get("meta", {}).get("adapter", "adapter")),
        "train": scfg.get("train"), "heldout_fraction": scfg.get("heldout_fraction"), "seed": scfg.get("seed"),
        "template": smeta.get("meta", {}).get("template"), "dtype": opts.get("dtype", "auto"),
        "device": opts.get("device", "auto"), "backend": "hf", "batch_tokens": scfg.get("batch_tokens", 2048),
        "n_bins": scfg.get("n_bins", 10), "n_bootstrap": scfg.get("n_bootstrap", 1000),
        "tolerance": _tolerance(ctx.study, cell),
    }


def _tolerance(study: Study, cell: Cell) -> float:
    from ..regime import DEFAULT_TOLERANCE

    if study.tolerance is not None:
        return float(study.tolerance)
    return float(study.options(cell).get("tolerance", DEFAULT_TOLERANCE))


# ---- the runners ---------------------------------------------------------------------------
def run_cell(ctx: Context, cell: Cell) -> None:
    if cell.kind in TRAINING:
        run_training(ctx, cell)
    elif cell.kind == REGIME:
        run_regime(ctx, cell)
    else:
        run_posthoc(ctx, cell)


def run_training(ctx: Context, cell: Cell) -> None:
    from ..train.run import run_finetune

    rd = run_dir(ctx, cell)
    resume = rd.is_started and not rd.is_complete
    cfg = finetune_config(ctx.study, cell, ctx.point(cell.point).paths, resume=resume)
    ctx.release()
    run_finetune(cfg, rd.path, overwrite=False, progress=ctx.progress)


def run_posthoc(ctx: Context, cell: Cell) -> None:
    """none: the base model on every test role; ts: also its temperature, fitted on calib (or train)."""
    from ..models import resolve_model
    from ..posthoc import TemperatureScaler, temperature_scale_predictions
    from ..predictions import write_predictions
    from ..prompts import resolve_template
    from ..report.runreport import write_run_report

    pd = ctx.point(cell.point)
    cfg = eval_config(ctx.study, cell, pd.paths)
    config = posthoc_config(ctx, cell)
    spec = resolve_model(cfg.model, gguf_file=cfg.gguf_file, base=cfg.base)
    config["model_spec"] = spec.to_dict()
    rd = run_dir(ctx, cell)
    rd.start(config, overwrite=False)
    template = resolve_template(cfg.template, ctx.tokenizer(spec))
    dev_dtype = _device_dtype(cfg.dtype, cfg.device)
    common = dict(cell=cell, cfg=cfg, spec=spec, template=template, dev_dtype=dev_dtype)
    roles = [r for r in EVAL_ROLES if r in pd.paths]
    preds = {r: _score(ctx, rd, f"predictions-{r}.jsonl", pd.questions[r], data_path=pd.paths[r],
                       description=f"{cell.name}: {DOMAIN[r]}", **common) for r in roles}
    results = [_result(rd, "none", r, preds[r], cfg, f"{spec.name}: {DOMAIN[r]} ({r})") for r in roles]
    meta = {"template": template, "dtype": dev_dtype[1], "device": dev_dtype[0],
            **{f"n_{r}": len(preds[r]) for r in roles}}
    if cell.kind == "ts":
        role = config["calib"]["role"]
        pc = _score(ctx, rd, "predictions-calib.jsonl", pd.questions[role], data_path=pd.paths[role],
                    description=f"{cell.name}: calibration set", **common)
        ts = TemperatureScaler().fit([p.logits for p in pc], [p.answer for p in pc])
        extra = {"temperature": ts.temperature_, "calib_role": role, "calib_n": len(pc),
                 "calib_nll_before": ts.nll_before_, "calib_nll_after": ts.nll_after_}
        for r in roles:
            scaled = temperature_scale_predictions(preds[r], ts.temperature_)
            write_predictions(rd.file(f"predictions-ts-{r}.jsonl"), scaled)
            results.append(_result(rd, "ts", r, scaled, cfg,
                                   f"{spec.name}: TS T={ts.temperature_:.2f}, {DOMAIN[r]} ({r})", extra))
        meta.update(extra)
    report_cfg = {**config, "data": ", ".join(f"{r}={rel(pd.paths[r], ctx.out)}" for r in roles)}
    write_run_report(rd.path, report_cfg, results, meta)
    rd.finish(kind=f"study-{cell.kind}", model=spec.name, results=results, meta=meta)


@dataclass
class _RegimeScoring:
    """What _score and _result read of a config, for the regime cell (which has no EvalConfig)."""

    model: str
    gguf_file: str | None
    base: str | None
    backend: str
    dtype: str
    device: str
    batch_tokens: int
    n_bins: int
    n_bootstrap: int
    seed: int


def run_regime(ctx: Context, cell: Cell) -> None:
    """The fine-tuned model on the questions it trained on, against its in-domain test predictions."""
    from ..io import atomic_write_json
    from ..models import resolve_model
    from ..predictions import load_predictions
    from ..regime import diagnose_predictions, format_diagnosis
    from ..report.runreport import write_run_report
    from ..runs import RunDir, load_run
    from ..train.data import split_heldout

    config = regime_config(ctx, cell)
    src = RunDir(ctx.out / config["source"])
    srec = load_run(src.path)
    pd = ctx.point(cell.point)
    trained, _ = split_heldout(pd.questions["train"], float(config["heldout_fraction"]), int(config["seed"]))
    if srec.meta.get("n_train") not in (None, len(trained)):
        raise LlmcalError(f"{src.path}: trained on {srec.meta['n_train']} questions, but the held-out rule gives "
                          f"{len(trained)}; cannot tell which questions it trained on")
    held = next((r for r in srec.results if r.label == srec.config.get("method") and r.dataset == "test"), None)
    if held is None:
        raise LlmcalError(f"{src.path}: has no in-domain test result after training; rerun {config['source']}")
    held_preds = load_predictions(src.path / held.predictions)
    spec = resolve_model(config["model"])
    config["model_spec"] = spec.to_dict()
    rd = run_dir(ctx, cell)
    rd.start(config, overwrite=False)
    cfg = _RegimeScoring(config["model"], None, None, "hf", config["dtype"], config["device"],
                         int(config["batch_tokens"]), int(config["n_bins"]), int(config["n_bootstrap"]),
                         int(config["seed"]))
    preds = _score(ctx, rd, "predictions-train.jsonl", trained, cell=cell, cfg=cfg, spec=spec,
                   template=config["template"], dev_dtype=_device_dtype(cfg.dtype, cfg.device), data_path=None,
                   description=f"{cell.name}: training questions", base=False)
    d = diagnose_predictions(preds, held_preds, tolerance=config["tolerance"], n_bins=cfg.n_bins)
    atomic_write_json(rd.file("diagnosis.json"), d.to_dict())
    results = [_result(rd, "train", "train", preds, cfg, f"{srec.model} after {srec.config.get('method')}: "
                                                          f"training questions", pred_file="predictions-train.jsonl")]
    meta = {"source": config["source"], "n_trained": len(trained), "n_heldout": len(held_preds),
            "regime": d.regime, "recommended": d.recommended, "diagnosis": d.to_dict()}
    report = write_run_report(rd.path, {**config, "data": config["train"]}, results, meta)
    text = report.read_text(encoding="utf-8").rstrip("\n")
    atomic_write_text(report, f"{text}\n\n## Regime diagnosis\n\n```\n{format_diagnosis(d)}\n```\n\n{d.reason}\n")
    rd.finish(kind="study-regime", model=spec.name, results=results, meta=meta)


# ---- scoring and results -----------------------------------------------------------------------
def _device_dtype(dtype: str, device: str) -> tuple[str, str]:
    from ..models import dtype_name, resolve_device, resolve_dtype

    dev = resolve_device(device)
    return dev, dtype_name(resolve_dtype(dtype, dev))


def _base_sources(ctx: Context, cell: Cell) -> list[tuple[dict, Path]]:
    """Base-model predictions of complete cells of the same model and point: ({data, template, dtype, ...}, file)."""
    from ..runs import RunDir, load_run

    found = []
    for other in ctx.study.cells():
        if other.model.key != cell.model.key or other.point.name != cell.point.name or other.kind == REGIME:
            continue
        rd = RunDir(ctx.out / other.rel)
        if not rd.is_complete or other.rel == cell.rel:
            continue
        try:
            rec = load_run(rd.path)
        except LlmcalError:
            continue
        cfg, meta = rec.config, rec.meta
        if meta.get("quantization"):
            continue
        if other.kind in TRAINING:
            paths = {Path(p).stem: p for p in cfg.get("evals") or []}
        else:
            paths = dict(cfg.get("evals") or {})
        key = {"model": cfg.get("model"), "gguf_file": cfg.get("gguf_file"), "base": cfg.get("base"),
               "backend": cfg.get("backend", "hf"), "template": meta.get("template"), "dtype": meta.get("dtype"),
               "device": meta.get("device")}
        for res in rec.results:
            if res.label == "none" and res.dataset in paths:
                found.append(({**key, "data": norm(paths[res.dataset])}, rd.path / res.predictions))
    return found


def _score(ctx: Context, run, filename: str, questions, *, cell: Cell, cfg, spec, template: str,
           dev_dtype: tuple[str, str], data_path: Path | None, description: str, base: bool = True):
    """Predictions for ``questions`` into RUN/filename: what is there, then a matching base-model file of
    another cell, then the model (loaded once for all cells that use it)."""
    from .. import evaluate
    from ..io import read_jsonl_tolerant
    from ..predictions import Prediction, write_predictions

    path = run.file(filename)
    wanted = {q.id for q in questions}
    have = {r["id"]: r for r in read_jsonl_tolerant(path) if r.get("id") in wanted}
    if len(have) < len(wanted) and base and data_path is not None:
        key = {"model": cfg.model, "gguf_file": cfg.gguf_file, "base": cfg.base, "backend": cfg.backend,
               "template": template, "dtype": dev_dtype[1], "device": dev_dtype[0], "data": norm(str(data_path))}
        for src_key, src in _base_sources(ctx, cell):
            if src_key == key and src.exists():
                for r in read_jsonl_tolerant(src):
                    if r.get("id") in wanted and r["id"] not in have:
                        have[r["id"]] = r
                log.info("%s: reusing base-model predictions from %s", cell.name, rel(src, ctx.out))
                break
    if len(have) == len(wanted):
        preds = [Prediction.from_dict(have[q.id]) for q in questions]
        write_predictions(path, preds)
        return preds
    if have:
        write_predictions(path, [Prediction.from_dict(r) for r in have.values()])
    loaded = ctx.loaded(spec, cfg.backend, cfg.dtype, cfg.device)
    return evaluate.score_questions_into(run, filename, loaded, questions, template, batch_tokens=cfg.batch_tokens,
                                         progress=ctx.progress, description=description)


def _result(run, label: str, role: str, preds, cfg, title: str, extra: dict | None = None,
            pred_file: str | None = None):
    from ..metrics import metrics_from_predictions
    from ..report.plots import save_reliability
    from ..runs import RunResult

    m = metrics_from_predictions(preds, n_bins=cfg.n_bins, n_bootstrap=cfg.n_bootstrap, seed=cfg.seed)
    png = f"reliability-{label}-{role}.png"
    save_reliability(m["reliability"], run.file(png), title, metrics=m)
    if pred_file is None:
        pred_file = f"predictions-{role}.jsonl" if label == "none" else f"predictions-{label}-{role}.jsonl"
    return RunResult(label=label, method=label, dataset=role, split="all", predictions=pred_file, metrics=m,
                     reliability=png, extra=extra or {})
