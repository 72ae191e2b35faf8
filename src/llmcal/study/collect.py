"""Collecting a study's numbers: every cell's results, intervals, training record and diagnosis into one
JSON-able dict (DIR/study.json), and the per-method rows the report and RESULTS.md tabulate."""
from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from ..errors import LlmcalError
from ..redact import redact
from .conformal import conformal_doc
from .grid import METRIC_KEYS, REGIME, TRAINING, Cell
from .posthoc import posthoc_section
from .util import now, read_json, rel

if TYPE_CHECKING:
    from .runner import Context

PREFIX = {"test": "id", "ood": "ood"}


def _extra(pred_file: Path, base_file: Path | None, n_bootstrap: int, seed: int, n_bins: int, have_ci: dict
           ) -> dict:
    """What a run's metrics may not carry, from its predictions file: 95% bootstrap intervals of cw-ECE, Brier
    and NLL, the selective numbers (``posthoc.selective_summary``) and the accuracy change against
    ``base_file`` (the uncalibrated model's predictions of the same questions)."""
    import functools

    from ..metrics import bootstrap_ci, brier, classwise_ece, nll
    from ..predictions import load_predictions, stack_probs
    from .posthoc import paired_base, selective_summary

    try:
        preds = load_predictions(pred_file)
        p, a = stack_probs(preds)
        base = paired_base(preds, load_predictions(base_file)) if base_file is not None else None
    except LlmcalError:
        return {"ci": {}}
    if base is not None and base.shape != p.shape:
        base = None
    fns = {"cw_ece": functools.partial(classwise_ece, n_bins=n_bins), "brier": brier, "nll": nll}
    ci = {k: list(bootstrap_ci(fn, p, a, n_resamples=int(n_bootstrap), seed=seed)) for k, fn in fns.items()}
    out = selective_summary(p, a, base, n_bootstrap=int(n_bootstrap), seed=seed,
                            need_aurc_ci=have_ci.get("aurc") is None)
    out["ci"] = {**ci, **out["ci"]}
    return out


def _summary(res, run_path: Path, root: Path, cfg: dict, base=None) -> dict:
    m = res.metrics or {}
    out = {k: m.get(k) for k in METRIC_KEYS}
    ci = dict(m.get("ci") or {})
    pred = run_path / res.predictions
    if pred.exists():
        base_file = run_path / base.predictions if base is not None else None
        extra = _extra(pred, base_file if base_file is not None and base_file.exists() else None,
                       min(int(cfg.get("n_bootstrap") or 1000), 1000), int(cfg.get("seed") or 0),
                       int(cfg.get("n_bins") or 10), ci)
        ci.update(extra.pop("ci"))
        for k in ("aurc", "acc_at_80", "acc_at_50"):  # a run's own numbers, where it has them, come first
            if m.get(k) is not None:
                extra[k] = m[k]
        out.update(extra)
    out["ci"] = ci
    out["reliability"] = m.get("reliability")
    out["predictions"] = rel(pred, root)
    out["reliability_png"] = rel(run_path / res.reliability, root) if res.reliability else None
    return out


def _training(rec, kind: str) -> dict:
    """What study.json keeps of a fine-tuning run: budget, sizes, losses, E-steps, the held-out curve."""
    c, meta = rec.config, rec.meta
    return {
        "epochs": c.get("epochs"), "max_steps": c.get("max_steps"), "epochs_trained": meta.get("epochs_trained"),
        "global_step": meta.get("global_step"), "n_train": meta.get("n_train"),
        "n_heldout": meta.get("n_heldout"), "lr": c.get("lr"), "batch_size": c.get("batch_size"),
        "grad_accum": c.get("grad_accum"), "lora_r": c.get("lora_r"), "lora_alpha": c.get("lora_alpha"),
        "rcft_lambda": c.get("rcft_lambda") if kind != "cft" else None, "preset": c.get("preset"),
        "train_loss": meta.get("train_loss"), "estep_count": len(meta.get("estep") or []),
        "rcft_switched": meta.get("rcft_switched"), "regime_checks": meta.get("regime_checks") or [],
        "curve": [{k: p.get(k) for k in ("epoch", "step", "heldout_accuracy", "heldout_ece", "train_loss",
                                         "rcft_on")} for p in meta.get("curve") or []],
    }


def _cell_entry(ctx: Context, cell: Cell, failures: dict) -> dict:
    from ..runs import RunDir, load_run

    rd = RunDir(ctx.out / cell.rel)
    e = {"name": cell.name, "model": cell.model.key, "method": cell.method.key if cell.method else REGIME,
         "kind": cell.kind, "point": cell.point.name, "run": cell.rel,
         "status": "complete" if rd.is_complete else ("incomplete" if rd.is_started else "not run")}
    if cell.name in failures:
        e["status"], e["error"] = "failed", failures[cell.name]
    wall = ctx.timings.get(cell.rel)
    if not rd.is_complete:
        e["wall_s"] = wall
        return e
    rec = load_run(rd.path)
    if wall is None:  # not timed by a study (e.g. copied in): finished - created
        try:
            wall = (_dt.datetime.fromisoformat(read_json(rd.file("metrics.json"))["finished"])
                    - _dt.datetime.fromisoformat(rec.config["created"])).total_seconds()
        except (KeyError, TypeError, ValueError):
            wall = None
    e["wall_s"] = wall
    e["model_name"] = rec.model
    e["template"], e["dtype"], e["device"] = rec.meta.get("template"), rec.meta.get("dtype"), rec.meta.get("device")
    label = {"none": "none", "ts": "ts", REGIME: "train"}.get(cell.kind, rec.config.get("method", cell.kind))
    # the uncalibrated model on the same questions: the run's own "none" result of that dataset
    base = {r.dataset: r for r in rec.results if r.label == "none"}
    e["results"] = {r.dataset: _summary(r, rd.path, ctx.out, rec.config, base.get(r.dataset))
                    for r in rec.results if r.label == label}
    if cell.kind in TRAINING:
        e["before"] = {r.dataset: _summary(r, rd.path, ctx.out, rec.config, base.get(r.dataset))
                       for r in rec.results if r.label == "none"}
        drift = rec.meta.get("alignment_drift")
        e["alignment_drift"] = drift.get("mean_kl") if isinstance(drift, dict) else None
        e["training"] = _training(rec, cell.kind)
    if cell.kind == "ts":
        e["temperature"] = rec.meta.get("temperature")
        e["calib_n"] = rec.meta.get("calib_n")
    if cell.kind == REGIME:
        e["diagnosis"] = rec.meta.get("diagnosis")
        e["source"] = rec.meta.get("source")
    return e


def collect(ctx: Context, failures: Sequence[tuple[Cell, str]] = ()) -> dict:
    """Everything the report and RESULTS.md need, as one JSON-able dict (written as DIR/study.json)."""
    from .. import __version__

    study = ctx.study
    fail = {c.name: msg for c, msg in failures}
    cells = [_cell_entry(ctx, c, fail) for c in study.cells()]
    data = {p.name: ctx.point(p).info for p in study.points}
    diagnoses = []
    for e in cells:
        if e["kind"] == REGIME and e.get("diagnosis"):
            diagnoses.append({"model": e["model"], "point": e["point"], "run": e["run"], "source": e["source"],
                              **e["diagnosis"], "measured": _measured(cells, e["model"], e["point"])})
    autos = [{"model": e["model"], "point": e["point"], "method": e["method"],
              "switched": e["training"]["rcft_switched"], "checks": e["training"]["regime_checks"]}
             for e in cells if e["kind"] == "auto" and e["status"] == "complete"]
    walls = [e["wall_s"] for e in cells if isinstance(e.get("wall_s"), (int, float))]
    posthoc = posthoc_section(ctx.out, cells, study.posthoc)
    conformal = conformal_doc(ctx.out, cells, study.conformal, study.seed)
    # A served model's base_url may carry a key (http://user:KEY@host): it stays out of study.json and the report.
    return redact({
        "llmcal_version": __version__, "name": study.name, "description": study.description,
        "config": json.loads(json.dumps(study.raw, default=str)), "config_file": str(study.path), "updated": now(),
        "seed": study.seed,
        "models": {m.key: {"model": m.model, "options": m.options, "methods": list(m.methods or [])}
                   for m in study.models},
        "methods": {m.key: {"method": m.method, "options": m.options} for m in study.methods},
        "points": [p.name for p in study.points], "data": data, "cells": cells, "diagnoses": diagnoses,
        "auto": autos, "posthoc": posthoc, "conformal": conformal, "wall_s_total": sum(walls) if walls else None,
    })


def _measured(cells: list[dict], model: str, point: str) -> dict:
    """In-domain conf-ECE and accuracy of each complete fine-tuning cell of a model and point."""
    out = {}
    for e in cells:
        if e["model"] == model and e["point"] == point and e["kind"] in TRAINING and e["status"] == "complete":
            r = e["results"].get("test") or {}
            out[e["method"]] = {"accuracy": r.get("accuracy"), "conf_ece": r.get("conf_ece")}
    return out


def method_rows(doc: dict, posthoc: bool = False) -> list[dict]:
    """One row per (model, point, method) with results: the none cell, or the base model as measured by the
    first fine-tuning cell ("none (before cft)") when the study has no none cell, then every other method;
    with ``posthoc``, then the post-hoc methods fitted on the ts cell's predictions (kind "posthoc")."""
    rows = []
    for mkey in doc["models"]:
        for point in doc["points"]:
            order = list(doc["methods"])
            cells = sorted((e for e in doc["cells"] if e["model"] == mkey and e["point"] == point
                            and e["kind"] != REGIME), key=lambda e: order.index(e["method"]))
            if not cells:
                continue
            if not any(e["kind"] == "none" for e in cells):
                first = next((e for e in cells if e["kind"] in TRAINING and e.get("before")), None)
                if first is not None:
                    rows.append(_row(mkey, point, f"none (before {first['method']})", "none", first["before"],
                                     None, first))
            for e in cells:
                if e["status"] == "complete":
                    rows.append(_row(mkey, point, e["method"], e["kind"], e["results"], e.get("alignment_drift"), e))
                else:
                    rows.append({"model": mkey, "point": point, "method": e["method"], "kind": e["kind"],
                                 "status": e["status"], "results": {}})
            if posthoc:
                for entry in (doc.get("posthoc") or {}).get("entries", []):
                    if entry["model"] == mkey and entry["point"] == point:
                        for name, meth in entry["methods"].items():
                            rows.append(_row(mkey, point, name, "posthoc", meth["results"], None,
                                             {"run": entry["source"]}))
    return rows


def _row(model: str, point: str, method: str, kind: str, results: dict, drift, cell: dict) -> dict:
    row = {"model": model, "point": point, "method": method, "kind": kind, "status": "complete",
           "results": results, "drift": drift, "run": cell["run"]}
    for role, pre in PREFIX.items():
        r = results.get(role) or {}
        for k in ("n", "accuracy", "conf_ece", "cw_ece", "brier", "nll", "mean_conf", "accuracy_change", "aurc",
                  "acc_at_80", "acc_at_50"):
            row[f"{pre}_{k}"] = r.get(k)
            ci = (r.get("ci") or {}).get(k)
            if ci is not None:
                row[f"{pre}_{k}_ci"] = ci
    return row
