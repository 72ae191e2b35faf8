"""``run_finetune``: the library API behind ``llmcal calibrate --method cft|rcft|auto``.

Data flow::

    check options, model name, data (overlaps, held-out slice)    -- before anything loads
    -> score every eval set with the base model        (results "none")
    -> LoRA + CalibrationTrainer (checkpoints in RUN/checkpoints, E-step state beside them)
    -> RUN/adapter (+ llmcal_base.json), curve.json/png, RUN/merged with --merge
    -> score every eval set with the adapted model     (results labelled by the method)
    -> alignment drift, report.md, metrics.json

Under torchrun every process runs this function: Trainer trains
data-parallel, the E-step shards its questions and sums its statistics across
ranks, evaluation shards its batches (``llmcal.pipeline.Run.score``), and the main
process alone writes the run's files.
"""
from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path
from typing import Sequence

from ..errors import LlmcalError
from ..models import LoadedModel, ModelSpec, resolve_model
from ..pipeline import Run
from ..progress import enabled as progress_enabled
from ..prompts import encode_questions, resolve_template
from ..runs import RunRecord, RunResult
from .callbacks import (AutoRegimeCallback, CurveCallback, EStepCallback, LossBarCallback, OfficialEStepCallback,
                        SquaredEpochsCallback, StateCheckpointCallback)
from .collator import ExampleDataset, McqCollator, build_examples
from .config import FinetuneConfig, apply_preset, estep_steps, validate
from .curve import curve_points, write_curve
from .data import EvalSet, TrainingData, load_training_data
from .estimate import Probe
from .launch import launch_finetune, per_process_batch, resolve_processes
from .losses import OfficialRcftLoss, RcftLoss
from .model import add_lora, load_for_training, resolve_train_dtype, save_adapter, save_merged
from .state import STATE_FILE, TrainState
from .trainer import CalibrationTrainer, packs_questions

log = logging.getLogger(__name__)

KIND = "calibrate"
CHECKPOINTS = "checkpoints"
ADAPTER = "adapter"
MERGED = "merged"


def run_finetune(cfg: FinetuneConfig, out: str | Path, *, overwrite: bool = False, progress: bool = True,
                 callbacks: Sequence = ()) -> RunRecord:
    """Fine-tune with CFT / RCFT / auto and evaluate before and after; returns the finished run.

    ``callbacks`` are extra ``TrainerCallback`` objects (appended after ours).
    """
    cfg = apply_preset(cfg)
    validate(cfg)
    spec = resolve_model(cfg.model, gguf_file=cfg.gguf_file, base=cfg.base)
    data = load_training_data(cfg)
    n = resolve_processes(cfg.processes, cfg.batch_size, cfg.device)
    if n > 1 and not callbacks:  # (callbacks are objects of this process: they stay in it)
        return launch_finetune(cfg, out, processes=n, overwrite=overwrite, progress=progress)
    args = training_args(cfg, Path(out) / CHECKPOINTS, progress)  # starts the process group under torchrun
    run = Run.start(out, config_doc(cfg, spec), device=str(args.device), overwrite=overwrite, progress=progress,
                    restart=overwrite and not cfg.resume)
    last = last_checkpoint(run.path / CHECKPOINTS, cfg.resume)

    loaded = load_for_training(spec, cfg, str(args.device))
    tok = loaded.tokenizer
    template = resolve_template(cfg.template, tok)
    # The original model's scores come from the scoring cache when any earlier run made them.
    before = [evaluate_set(run, loaded, ev, "none", template, cache=not loaded.extra.get("quantization"))
              for ev in data.evals]

    model = add_lora(loaded, cfg)
    state = (TrainState.load(last) if last else None) or TrainState.initial(cfg.method, cfg.rcft_lambda, cfg.n_bins)
    trainer = build_trainer(cfg, args, model, tok, template, data, state, list(callbacks), progress)
    trainer.train(resume_from_checkpoint=str(last) if last else None)

    model.eval()
    tuned = dataclasses.replace(loaded, model=model)
    after = [evaluate_set(run, tuned, ev, cfg.method, template) for ev in data.evals]

    points = curve_points(state.curve, trainer.state.log_history)
    meta = {
        "method": cfg.method, "template": template, "dtype": loaded.dtype, "device": loaded.device,
        "world_size": args.world_size, "quantization": loaded.extra.get("quantization"),
        "train_data": data.train_name, "eval_data": ", ".join(ev.name for ev in data.evals),
        "n_train": len(data.train), "n_heldout": len(data.heldout), "global_step": trainer.state.global_step,
        "epochs_trained": trainer.state.epoch, "train_loss": _mean_loss(trainer.state.log_history),
        "resumed_from": last.name if last else None, "rcft_on_at_end": state.rcft_on,
        "rcft_switched": state.switched, "estep": state.estep_history, "regime_checks": state.regime_checks,
        "curve": points, "adapter": ADAPTER,
    }

    def outputs() -> dict:
        save_adapter(model, tok, spec, run.file(ADAPTER))
        write_curve(run.path, points, state.switched)
        extra = {"alignment_drift": alignment_drift(cfg, model, tok, progress, spec=spec, dtype=loaded.dtype)}
        if cfg.merge:
            extra["merged"] = _merge(loaded, model, tok, run)
        return extra

    meta.update(run.on_main(outputs, what=f"writing the adapter in {run.path}") or {})
    run.section("Training", training_section(cfg, data, meta))
    return run.finish(model=spec.name, results=before + after, meta=meta, kind=KIND)


# ---- setup ---------------------------------------------------------------------
def config_doc(cfg: FinetuneConfig, spec: ModelSpec) -> dict:
    d = cfg.to_dict()
    d["kind"] = KIND
    d["model_spec"] = spec.to_dict()
    return d


def last_checkpoint(directory: Path, resume: bool) -> Path | None:
    """The newest complete checkpoint when resuming; an error when there is one and we are not resuming."""
    found = []
    if directory.is_dir():
        for p in directory.iterdir():
            m = re.fullmatch(r"checkpoint-(\d+)", p.name)
            if m and (p / "trainer_state.json").exists():
                found.append((int(m.group(1)), p))
    found.sort()
    if not found:
        if resume:
            log.info("%s: no checkpoint to resume from; training from the start", directory)
        return None
    if not resume:
        raise LlmcalError(f"{directory.parent}: holds checkpoints of an interrupted training (last at step "
                          f"{found[-1][0]}); pass --resume to continue it or --overwrite to start over")
    with_state = [p for _, p in found if (p / STATE_FILE).exists()]
    return with_state[-1] if with_state else found[-1][1]


def training_args(cfg: FinetuneConfig, output_dir: Path, progress: bool):
    import torch
    from transformers import TrainingArguments

    use_cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
    device = "cpu" if use_cpu else "cuda"
    bf16 = not use_cpu and resolve_train_dtype(cfg, device) in ("bfloat16", "bf16")
    kwargs = dict(
        output_dir=str(output_dir), max_steps=cfg.max_steps,
        num_train_epochs=float(cfg.epochs) * (int(cfg.epochs) if cfg.squared_epochs else 1),  # SquaredEpochsCallback
        learning_rate=cfg.lr, per_device_train_batch_size=per_process_batch(cfg.batch_size),
        gradient_accumulation_steps=cfg.grad_accum, seed=cfg.seed, data_seed=cfg.seed,
        lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0,
        save_strategy="steps", save_steps=cfg.save_steps, save_total_limit=2,
        logging_strategy="steps", logging_steps=1, report_to=[], use_cpu=use_cpu, bf16=bf16,
        remove_unused_columns=False, disable_tqdm=not progress_enabled(progress),
        dataloader_num_workers=0, dataloader_pin_memory=not use_cpu, ddp_find_unused_parameters=False,
    )
    # Any other TrainingArguments field (report_to, gradient_checkpointing, schedulers, ...) as the user gave
    # it (validated by config.check_training_args): llmcal's values above are only defaults.
    kwargs.update(cfg.training_args)
    try:
        args = TrainingArguments(**kwargs)
    except (ValueError, TypeError) as e:
        raise LlmcalError(f"training arguments {cfg.training_args}: {e}") from None
    _ = args.device  # set up devices (and torch.distributed under a launcher) now
    return args


def build_trainer(cfg: FinetuneConfig, args, model, tok, template: str, data: TrainingData, state: TrainState,
                  extra_callbacks: list, progress: bool) -> CalibrationTrainer:
    from transformers import PrinterCallback, ProgressCallback

    enc_train = encode_questions(data.train, tok, template)
    enc_heldout = encode_questions(data.heldout, tok, template) if data.heldout else []
    probe = Probe(tok, n_bins=cfg.n_bins, batch_tokens=cfg.batch_tokens, progress=False)
    callbacks = []
    if cfg.method in ("rcft", "auto") and cfg.rcft_variant == "official":
        callbacks.append(OfficialEStepCallback(state, probe, enc_train))
    elif cfg.method in ("rcft", "auto"):
        est = enc_heldout if cfg.estep_set == "heldout" else enc_train
        callbacks.append(EStepCallback(state, probe, est, estep_steps(cfg), cfg.estep_set,
                                       prior_strength=cfg.estep_prior))
    if cfg.squared_epochs:
        callbacks.append(SquaredEpochsCallback(int(cfg.epochs)))
    callbacks.append(CurveCallback(state, probe, enc_heldout))
    if cfg.method == "auto":
        probe_set = encode_questions(data.train_probe(cfg.seed), tok, template)
        callbacks.append(AutoRegimeCallback(state, probe, probe_set, enc_heldout, cfg.tolerance,
                                            n_bootstrap=cfg.n_bootstrap, seed=cfg.seed))
    callbacks.append(StateCheckpointCallback(state))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    packed = cfg.packed_batches and packs_questions(model)
    if cfg.packed_batches and not packed:
        log.info("%s builds its own attention mask: training on padded batches", type(model).__name__)
    trainer = CalibrationTrainer(
        model=model, args=args, train_dataset=ExampleDataset(build_examples(enc_train, tok, cfg.include_explanation)),
        data_collator=McqCollator(pad, packed=packed), callbacks=callbacks + extra_callbacks, train_state=state,
        rcft_loss=(OfficialRcftLoss(cfg.rcft_alpha, cfg.rcft_skip_top_bin) if cfg.rcft_variant == "official"
                   else RcftLoss(cfg.n_bins, cfg.nonmax_rule)))
    if not progress_enabled(progress):
        trainer.remove_callback(PrinterCallback)  # it prints every log line to stdout
    elif trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(LossBarCallback)  # the same bar, without a printed dict per step
    return trainer


# ---- evaluation and outputs ------------------------------------------------------
def evaluate_set(run: Run, loaded: LoadedModel, ev: EvalSet, label: str, template: str, *,
                 cache: bool = False) -> RunResult:
    """Score one eval set into predictions-<label>-<slug>.jsonl (resumable, sharded, cached for the original
    model); metrics and the reliability PNG."""
    pred_file = f"predictions-{label}-{ev.slug}.jsonl"
    preds = run.score(pred_file, loaded, ev.questions, template, cache=cache, description=f"{label}: {ev.name}")
    who = "base model" if label == "none" else f"after {label.upper()}"
    return run.result(label, preds, dataset=ev.name, split=ev.split, pred_file=pred_file,
                      title=f"{loaded.spec.name}, {who}, on {ev.name}")


def alignment_drift(cfg: FinetuneConfig, model, tok, progress: bool, *, spec: ModelSpec | None = None,
                    dtype: str | None = None) -> dict | None:
    """``llmcal.drift.alignment_drift`` between the model with its adapter off (the original) and on."""
    if not cfg.drift:
        return None
    from ..drift import alignment_drift as drift

    from .model import base_spec

    # original_model=None: the tuned peft model with its adapter disabled is the original (no second copy);
    # original_spec keys the cache of its greedy responses by the weight files instead of hashing parameters.
    return drift(None, model, tok, progress=progress, original_spec=base_spec(spec) if spec is not None else None)


def _merge(loaded: LoadedModel, model, tok, run: Run) -> str | None:
    if loaded.extra.get("quantization"):
        log.warning("--merge: not merging into 4-bit base weights; use the adapter with the base model")
        return None
    save_merged(model, tok, run.file(MERGED))
    return MERGED


def _mean_loss(log_history: list[dict]) -> float | None:
    """The mean logged training loss over the whole run (a resumed run's history includes the first part)."""
    losses = [h["loss"] for h in log_history if "loss" in h]
    return sum(losses) / len(losses) if losses else None


def _auto_summary(switched: dict | None, checks: list[dict]) -> str:
    if switched:
        return f"RCFT term on from epoch {switched['epoch']:.2f} (step {switched['step']}): {switched['reason']}"
    if checks and checks[-1]["regime"] == "non-calibratable":
        return f"CFT throughout; the model left the calibratable regime only at the end: {checks[-1]['reason']}"
    if checks and checks[-1]["regime"] == "undetermined":
        return f"CFT throughout; the last check could not tell: {checks[-1]['reason']}"
    return "the model stayed in the calibratable regime; CFT throughout"


def training_section(cfg: FinetuneConfig, data: TrainingData, meta: dict) -> str:
    """The "Training" section of the report: method, data, RCFT/auto settings, drift, the per-epoch curve."""
    lines = []
    lines.append(f"- **method**: {cfg.method}; LoRA r={cfg.lora_r}, alpha={cfg.lora_alpha}, lr={cfg.lr}, "
                 f"batch {cfg.batch_size} x {cfg.grad_accum}, {meta['global_step']} steps "
                 f"({meta['epochs_trained']:.2f} epochs)")
    lines.append(f"- **data**: {len(data.train)} training and {len(data.heldout)} held-out questions of "
                 f"{data.train_name}")
    if cfg.method != "cft" and cfg.rcft_variant == "official":
        lines.append(f"- **RCFT term** (official variant): (1 - alpha) * SFT + alpha * 1e-3 * R, alpha="
                     f"{cfg.rcft_alpha}, bins estimated once on the training set"
                     + (", top bin not regularised" if cfg.rcft_skip_top_bin else "") + f"; {len(meta['estep'])} E-steps")
    elif cfg.method != "cft":
        every = "every epoch" if cfg.estep_every == "epoch" else f"every {cfg.estep_every} steps"
        lines.append(f"- **RCFT term**: lambda={cfg.rcft_lambda}, {cfg.n_bins} bins, E-step {every} on the "
                     f"{cfg.estep_set} set (bin accuracies shrunk toward a prior worth {cfg.estep_prior:g} questions per "
                     f"bin), non-max rule {cfg.nonmax_rule}; {len(meta['estep'])} E-steps")
    if cfg.method == "auto":
        lines.append(f"- **auto**: {_auto_summary(meta['rcft_switched'], meta['regime_checks'])}")
    drift = meta.get("alignment_drift")
    if isinstance(drift, dict) and "mean_kl" in drift:
        lines.append(f"- **alignment drift** (mean per-token KL, original vs calibrated, on the original's "
                     f"greedy responses): {drift['mean_kl']:.4f}")
    points = meta["curve"]
    if points:
        lines += ["", "| epoch | step | training loss | held-out accuracy | held-out conf-ECE | held-out NLL | RCFT |",
                  "|---:|---:|---:|---:|---:|---:|:---|"]
        for p in points:
            loss = "" if p.get("train_loss") is None else f"{p['train_loss']:.4f}"
            lines.append(f"| {p['epoch']:.2f} | {p['step']} | {loss} | {p['heldout_accuracy']:.4f} | "
                         f"{p['heldout_ece']:.4f} | {p['heldout_nll']:.4f} | {'on' if p['rcft_on'] else 'off'} |")
        lines += ["", "![training curve](curve.png)"]
    return "\n".join(lines)
