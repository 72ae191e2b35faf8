"""The cells of a study: the data a sweep point's cells share, and one runner per cell kind.

``none``/``ts`` score the base model and fit temperature scaling on ``calib``; ``cft``/``rcft``/``auto``
call ``llmcal.train.run.run_finetune``; ``regime`` scores the fine-tuned model on its own training questions
and diagnoses it.  Every cell is a run of ``llmcal.pipeline.Run``, so the base model's scores on a data file
come from the scoring cache when any cell (or any earlier run) made them.  Each runner takes the runner's
context (``runner.Context``: the study, the output directory, the loaded model).
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
from .grid import DOMAIN, EVAL_ROLES, REGIME, ROLES, TRAINING, Cell, Point, Study, bad, eval_config, finetune_config
from .util import read_json, rel

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
    from ..data import apply_split, load_dataset, take_limit
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
                selected = apply_split(ds.questions, e.split, study.seed, e.fractions)
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
    from ..evaluate import config_fields

    d = config_fields(cfg)  # no debiasing keys: a cell's config stays what it was, and interrupted cells resume
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
        "train": str(ctx.point(cell.point).paths["train"]), "heldout_fraction": scfg.get("heldout_fraction"), "seed": scfg.get("seed"),
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
    from ..evaluate import run_meta
    from ..models import resolve_model
    from ..pipeline import Run
    from ..posthoc import TemperatureScaler, temperature_scale_predictions
    from ..predictions import write_predictions
    from ..prompts import resolve_template

    pd = ctx.point(cell.point)
    cfg = eval_config(ctx.study, cell, pd.paths)
    config = posthoc_config(ctx, cell)
    spec = resolve_model(cfg.model, gguf_file=cfg.gguf_file, base=cfg.base)
    config["model_spec"] = spec.to_dict()
    run = Run.start(ctx.out / cell.rel, config, device=cfg.device, progress=ctx.progress)
    loaded = ctx.loaded(spec, cfg.backend, cfg.dtype, cfg.device)
    template = resolve_template(cfg.template, loaded.tokenizer)
    roles = [r for r in EVAL_ROLES if r in pd.paths]

    def score(role: str, filename: str, what: str):
        return run.score(filename, loaded, pd.questions[role], template, batch_tokens=cfg.batch_tokens, cache=True,
                         description=f"{cell.name}: {what}")

    preds = {r: score(r, f"predictions-{r}.jsonl", DOMAIN[r]) for r in roles}
    results = [run.result("none", preds[r], dataset=r, split="all", pred_file=f"predictions-{r}.jsonl",
                          png=f"reliability-none-{r}.png", title=f"{spec.name}: {DOMAIN[r]} ({r})") for r in roles]
    meta = run_meta(loaded, template, **{f"n_{r}": len(preds[r]) for r in roles})
    if cell.kind == "ts":
        role = config["calib"]["role"]
        pc = score(role, "predictions-calib.jsonl", "calibration set")
        ts = TemperatureScaler().fit([p.logits for p in pc], [p.answer for p in pc])
        extra = {"temperature": ts.temperature_, "calib_role": role, "calib_n": len(pc),
                 "calib_nll_before": ts.nll_before_, "calib_nll_after": ts.nll_after_}
        for r in roles:
            scaled = temperature_scale_predictions(preds[r], ts.temperature_)
            run.on_main(lambda: write_predictions(run.file(f"predictions-ts-{r}.jsonl"), scaled), what="writing")
            results.append(run.result("ts", scaled, dataset=r, split="all", pred_file=f"predictions-ts-{r}.jsonl",
                                      title=f"{spec.name}: TS T={ts.temperature_:.2f}, {DOMAIN[r]} ({r})",
                                      extra=extra))
        meta.update(extra)
    run.config = {**config, "data": ", ".join(f"{r}={rel(pd.paths[r], ctx.out)}" for r in roles)}
    run.finish(model=spec.name, results=results, meta=meta, kind=f"study-{cell.kind}")


def run_regime(ctx: Context, cell: Cell) -> None:
    """The fine-tuned model on the questions it trained on, against its in-domain test predictions."""
    from ..data.splits import split_heldout
    from ..io import atomic_write_json
    from ..models import resolve_model
    from ..pipeline import Run
    from ..predictions import load_predictions
    from ..regime import diagnose_predictions, format_diagnosis
    from ..runs import RunDir, load_run

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
    # the base model on the same test questions, scored by the source run before it trained
    base_held = next((r for r in srec.results if r.label == "none" and r.dataset == "test"), None)
    spec = resolve_model(config["model"])
    config["model_spec"] = spec.to_dict()
    run = Run.start(ctx.out / cell.rel, config, device=config["device"], progress=ctx.progress)
    loaded = ctx.loaded(spec, "hf", config["dtype"], config["device"])
    # Not cached: the adapter is a study output that a rerun of its source cell replaces.
    preds = run.score("predictions-train.jsonl", loaded, trained, config["template"],
                      batch_tokens=int(config["batch_tokens"]), description=f"{cell.name}: training questions")
    base_train = None
    base_spec = spec.base if spec.kind == "lora" else None
    if base_held is not None and base_spec is not None:  # the gap the base model had on the same questions
        base_loaded = ctx.loaded(base_spec, "hf", config["dtype"], config["device"])
        base_train = run.score("predictions-base-train.jsonl", base_loaded, trained, config["template"],
                               batch_tokens=int(config["batch_tokens"]), cache=True,
                               description=f"{cell.name}: training questions, base model")
    d = diagnose_predictions(preds, held_preds, base_train=base_train,
                             base_heldout=load_predictions(src.path / base_held.predictions) if base_train else None,
                             tolerance=config["tolerance"], n_bins=int(config["n_bins"]),
                             n_bootstrap=int(config.get("n_bootstrap") or 1000), seed=int(config.get("seed") or 0))
    run.on_main(lambda: atomic_write_json(run.file("diagnosis.json"), d.to_dict()), what="writing diagnosis.json")
    results = [run.result("train", preds, dataset="train", split="all", pred_file="predictions-train.jsonl",
                          png="reliability-train-train.png",
                          title=f"{srec.model} after {srec.config.get('method')}: training questions")]
    meta = {"source": config["source"], "n_trained": len(trained), "n_heldout": len(held_preds),
            "regime": d.regime, "recommended": d.recommended, "diagnosis": d.to_dict()}
    run.section("Regime diagnosis", f"```\n{format_diagnosis(d)}\n```\n\n{d.reason}")
    run.config = {**config, "data": rel(pd.paths["train"], ctx.out)}
    run.finish(model=spec.name, results=results, meta=meta, kind="study-regime")
