"""The ``llmcal`` command line: a thin typer layer over the library API.

Every command maps LlmcalError to a red message on stderr and exit status 2.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from .errors import LlmcalError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Measure and restore the calibration of aligned language models on multiple-choice QA.")
data_app = typer.Typer(no_args_is_help=True, help="List datasets and show prompts exactly as the model sees them.")
app.add_typer(data_app, name="data")

out_console = Console()
err_console = Console(stderr=True)


def handle_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except LlmcalError as e:
            err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(2)
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted; rerun the same command to resume[/]")
            raise typer.Exit(130)

    return wrapper


def _mapping(mapping: Optional[str]) -> Optional[dict]:
    if not mapping:
        return None
    try:
        m = json.loads(mapping)
    except json.JSONDecodeError:
        # also accept field=column,field=column
        m = {}
        for part in mapping.split(","):
            if "=" not in part:
                raise LlmcalError(f"--mapping {mapping!r}: expected JSON or field=column pairs")
            k, v = part.split("=", 1)
            v = v.strip()
            # "choices=A|B|C|D": the options spread over several columns
            m[k.strip()] = [c.strip() for c in v.split("|")] if "|" in v else v
    if not isinstance(m, dict):
        raise LlmcalError(f"--mapping {mapping!r}: expected an object")
    return m


def _print_results(record, title: str) -> None:
    t = Table(title=title)
    for col in ("method", "split", "n", "accuracy", "conf-ECE", "cw-ECE", "Brier", "NLL", "mean conf"):
        t.add_column(col, justify="right" if col not in ("method", "split") else "left")
    for r in record.results:
        m = r.metrics
        t.add_row(r.label, str(r.split), str(m["n"]),
                  f"{m['accuracy']:.4f} [{m['ci']['accuracy'][0]:.3f}, {m['ci']['accuracy'][1]:.3f}]",
                  f"{m['conf_ece']:.4f} [{m['ci']['conf_ece'][0]:.3f}, {m['ci']['conf_ece'][1]:.3f}]",
                  f"{m['cw_ece']:.4f}", f"{m['brier']:.4f}", f"{m['nll']:.4f}", f"{m['mean_conf']:.4f}")
    out_console.print(t)


# Options shared by eval and calibrate.
ModelOpt = typer.Option(..., "--model", "-m", help="Hub id, local dir, .gguf file, LoRA adapter dir, or alias "
                        "(smollm2-135m-instruct, gemma3-270m).")
DataOpt = typer.Option(..., "--data", "-d", help="mmlu, arc-challenge, arc-easy, openbookqa, medmcqa, a "
                       ".jsonl/.json/.csv/.parquet file, or synthetic:<task>?difficulty=..")


def _eval_config(model, data, gguf_file, base, split, subject, limit, seed, template, dtype, device,
                 batch_tokens, mapping, n_bins, method="none", calib_fraction=0.2, backend="hf"):
    from .evaluate import EvalConfig

    return EvalConfig(model=model, data=data, gguf_file=gguf_file, base=base, split=split,
                      subjects=list(subject) or None, limit=limit, seed=seed, template=template, dtype=dtype,
                      device=device, batch_tokens=batch_tokens, mapping=_mapping(mapping), n_bins=n_bins,
                      method=method, calib_fraction=calib_fraction, backend=backend)


@app.command("eval")
@handle_errors
def eval_cmd(
    model: str = ModelOpt,
    data: str = DataOpt,
    out: Path = typer.Option(..., "--out", "-o", help="Run directory to write (resumed if interrupted)."),
    gguf_file: Optional[str] = typer.Option(None, help="GGUF file name inside --model's directory or hub repo."),
    base: Optional[str] = typer.Option(None, help="Base model for a LoRA adapter (default: the one it records)."),
    split: str = typer.Option("all", help="all, calib or test (deterministic, by a hash of id and seed)."),
    subject: List[str] = typer.Option([], "--subject", help="Keep only these subjects (repeatable)."),
    limit: Optional[int] = typer.Option(None, help="Use a fixed, seeded subset of this many questions."),
    seed: int = typer.Option(0),
    template: str = typer.Option("auto", help="plain, chat, or auto (chat when the tokenizer has a template)."),
    dtype: str = typer.Option("auto", help="auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16, float16."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:1, ..."),
    batch_tokens: int = typer.Option(2048, help="Token budget per batch (batch size x longest prompt)."),
    mapping: Optional[str] = typer.Option(None, help='Column mapping for files: JSON or "question=q,answer=label".'),
    n_bins: int = typer.Option(10, help="Bins for ECE and the reliability diagram."),
    overwrite: bool = typer.Option(False, help="Replace a complete run in --out."),
    backend: str = typer.Option("hf", help="hf (transformers, default) or vllm (GPU, needs vllm installed)."),
):
    """Evaluate a model's accuracy and calibration on a multiple-choice dataset."""
    from .evaluate import run_eval

    cfg = _eval_config(model, data, gguf_file, base, split, subject, limit, seed, template, dtype, device,
                       batch_tokens, mapping, n_bins, backend=backend)
    rec = run_eval(cfg, out, overwrite=overwrite)
    _print_results(rec, f"{rec.model} on {data}")
    out_console.print(f"run written to [bold]{out}[/] (report: {out / 'report.md'})")


FT_METHODS = ("cft", "rcft", "auto")


@app.command("calibrate")
@handle_errors
def calibrate_cmd(
    method: str = typer.Option("ts", help="ts (temperature scaling), cft, rcft, or auto (CFT that switches "
                               "the RCFT term on once the model leaves the calibratable regime)."),
    model: str = ModelOpt,
    data: Optional[str] = typer.Option(None, "--data", "-d", help="ts: dataset to split into calibration and test."),
    train: Optional[str] = typer.Option(None, "--train", help="cft/rcft/auto: in-domain training dataset."),
    eval_sets: List[str] = typer.Option([], "--eval", help="cft/rcft/auto: evaluation dataset (repeatable; "
                                        "in-domain and out-of-domain)."),
    out: Path = typer.Option(..., "--out", "-o"),
    gguf_file: Optional[str] = typer.Option(None),
    base: Optional[str] = typer.Option(None),
    subject: List[str] = typer.Option([], "--subject", help="Subjects of --data / --train."),
    eval_subject: List[str] = typer.Option([], "--eval-subject", help="Subjects kept in the --eval sets."),
    limit: Optional[int] = typer.Option(None, help="Questions of --data / --train (fixed seeded subset)."),
    eval_limit: Optional[int] = typer.Option(None, help="Questions per --eval set."),
    train_split: Optional[str] = typer.Option(None, help="Train and evaluate on one dataset: its hash split "
                                              "train (60%), with --eval-split test (20%)."),
    eval_split: Optional[str] = typer.Option(None, help="The hash split of the training dataset to evaluate on."),
    seed: int = typer.Option(0),
    template: str = typer.Option("auto"),
    dtype: str = typer.Option("auto"),
    device: str = typer.Option("auto"),
    batch_tokens: int = typer.Option(2048),
    mapping: Optional[str] = typer.Option(None),
    n_bins: int = typer.Option(10),
    calib_fraction: float = typer.Option(0.2, help="ts: share of the questions used to fit the temperature."),
    # training options (cft, rcft, auto)
    preset: str = typer.Option("default", help="default (small models) or paper (r=128, alpha=64, lr 5e-4, "
                               "5 epochs, batch 2, bf16, 4-bit base where bitsandbytes and a GPU are present)."),
    epochs: Optional[float] = typer.Option(None),
    max_steps: Optional[int] = typer.Option(None, help="Stop after this many optimiser steps."),
    lr: Optional[float] = typer.Option(None),
    batch_size: Optional[int] = typer.Option(None),
    grad_accum: Optional[int] = typer.Option(None),
    lora_r: Optional[int] = typer.Option(None),
    lora_alpha: Optional[int] = typer.Option(None),
    heldout_fraction: Optional[float] = typer.Option(None, help="Slice of --train kept out of training for the "
                                                     "E-step and the regime check."),
    rcft_lambda: Optional[float] = typer.Option(None, "--lambda", help="Weight of the ECE term (RCFT)."),
    estep_every: Optional[str] = typer.Option(None, help="E-step frequency: 'epoch' or a number of steps."),
    estep_set: Optional[str] = typer.Option(None, help="E-step estimation set: heldout (default) or train."),
    nonmax_rule: Optional[str] = typer.Option(None, help="Targets of non-max options: proportional or tanh."),
    tolerance: Optional[float] = typer.Option(None, help="Regime tolerance on train minus held-out accuracy."),
    include_explanation: bool = typer.Option(False, help="Also train on the explanation text when present."),
    save_steps: Optional[int] = typer.Option(None, help="Checkpoint every N steps."),
    merge: bool = typer.Option(False, help="Also write the merged model (base + adapter)."),
    drift: bool = typer.Option(True, help="Measure alignment drift on the shipped instruction prompts."),
    resume: bool = typer.Option(False, help="Continue an interrupted training run from its last checkpoint."),
    overwrite: bool = typer.Option(False),
):
    """Calibrate a model: post-hoc temperature scaling, or calibration-aware fine-tuning (CFT/RCFT/auto)."""
    if method == "ts":
        if not data:
            raise LlmcalError("--method ts needs --data (the dataset to split into calibration and test)")
        if not 0 < calib_fraction < 1:
            raise LlmcalError(f"--calib-fraction must be between 0 and 1 (got {calib_fraction})")
        from .evaluate import run_calibrate_ts

        cfg = _eval_config(model, data, gguf_file, base, "all", subject, limit, seed, template, dtype, device,
                           batch_tokens, mapping, n_bins, method="ts", calib_fraction=calib_fraction)
        rec = run_calibrate_ts(cfg, out, overwrite=overwrite)
        _print_results(rec, f"{rec.model}: temperature scaling (T={rec.meta['temperature']:.3f})")
        out_console.print(f"run written to [bold]{out}[/] (report: {out / 'report.md'})")
        return
    if method not in FT_METHODS:
        raise LlmcalError(f"unknown --method {method!r}; choose ts, cft, rcft or auto")
    if not train:
        raise LlmcalError(f"--method {method} needs --train (in-domain training data)")
    if not eval_sets:
        raise LlmcalError(f"--method {method} needs at least one --eval dataset")
    from .train.config import FinetuneConfig
    from .train.run import run_finetune

    overrides = {k: v for k, v in dict(
        epochs=epochs, max_steps=max_steps, lr=lr, batch_size=batch_size, grad_accum=grad_accum, lora_r=lora_r,
        lora_alpha=lora_alpha, heldout_fraction=heldout_fraction, rcft_lambda=rcft_lambda,
        estep_every=(int(estep_every) if estep_every and estep_every.isdigit() else estep_every),
        estep_set=estep_set, nonmax_rule=nonmax_rule, tolerance=tolerance, save_steps=save_steps,
    ).items() if v is not None}
    cfg = FinetuneConfig(model=model, train=train, evals=list(eval_sets), gguf_file=gguf_file, base=base,
                         method=method, seed=seed, dtype=dtype, device=device, template=template,
                         train_limit=limit, eval_limit=eval_limit, subjects=list(subject) or None,
                         eval_subjects=list(eval_subject) or None, n_bins=n_bins, preset=preset, merge=merge,
                         include_explanation=include_explanation, resume=resume, drift=drift,
                         batch_tokens=batch_tokens, mapping=_mapping(mapping), train_split=train_split,
                         eval_split=eval_split, **overrides)
    rec = run_finetune(cfg, out, overwrite=overwrite)
    from .distributed import current_world

    if not current_world().is_main:  # under torchrun every rank returns the record; one prints it
        return
    _print_results(rec, f"{rec.model}: {method.upper()}")
    drift_info = rec.meta.get("alignment_drift")
    if isinstance(drift_info, dict) and "mean_kl" in drift_info:
        out_console.print(f"alignment drift (mean per-token KL on the shipped prompts): "
                          f"{drift_info['mean_kl']:.4f}")
    out_console.print(f"run written to [bold]{out}[/] (adapter: {out / 'adapter'}; report: {out / 'report.md'})")


@app.command("regime")
@handle_errors
def regime_cmd(
    model: str = ModelOpt,
    train: str = typer.Option(..., "--train", help="Training data (what fine-tuning can fit)."),
    heldout: Optional[str] = typer.Option(None, "--heldout", help="Held-out data (default: a slice of --train)."),
    out: Path = typer.Option(..., "--out", "-o"),
    gguf_file: Optional[str] = typer.Option(None),
    base: Optional[str] = typer.Option(None),
    heldout_fraction: float = typer.Option(0.2),
    limit: Optional[int] = typer.Option(None, help="Training questions (fixed seeded subset)."),
    heldout_limit: Optional[int] = typer.Option(None),
    seed: int = typer.Option(0),
    template: str = typer.Option("auto"),
    dtype: str = typer.Option("auto"),
    device: str = typer.Option("auto"),
    batch_tokens: int = typer.Option(2048),
    tolerance: float = typer.Option(0.05, help="Largest train minus held-out accuracy still calibratable."),
    mapping: Optional[str] = typer.Option(None),
    overwrite: bool = typer.Option(False),
):
    """Diagnose the regime: can CFT calibrate this model on this domain, or does it need RCFT?"""
    from .regime import RegimeConfig, format_diagnosis, run_regime

    cfg = RegimeConfig(model=model, train=train, heldout=heldout, gguf_file=gguf_file, base=base,
                       heldout_fraction=heldout_fraction, train_limit=limit, heldout_limit=heldout_limit, seed=seed,
                       template=template, dtype=dtype, device=device, batch_tokens=batch_tokens, tolerance=tolerance,
                       mapping=_mapping(mapping))
    rec, diagnosis = run_regime(cfg, out, overwrite=overwrite)
    out_console.print(format_diagnosis(diagnosis), highlight=False)
    out_console.print(f"run written to [bold]{out}[/] (diagnosis: {out / 'diagnosis.json'})")


@app.command("study")
@handle_errors
def study_cmd(
    config: Path = typer.Argument(..., help="Study YAML (models x datasets x methods), e.g. studies/offline.yaml."),
    out: Path = typer.Option(..., "--out", "-o", help="Study directory: one run per cell, and the report."),
    only: List[str] = typer.Option([], "--only", help="Run only cells matching this glob (model/method[-point]) or model key (repeatable)."),
    overwrite: bool = typer.Option(False, help="Rerun complete cells instead of skipping them."),
):
    """Run a grid of models x methods, resuming finished cells, and write one report."""
    from .study import run_study

    paths = run_study(config, out, overwrite=overwrite, only=list(only) or None)
    for k, p in paths.items():
        out_console.print(f"{k}: [bold]{p}[/]")


@app.command("results")
@handle_errors
def results_cmd(
    studies: List[Path] = typer.Argument(..., help="Study directories (each holds the study.json `llmcal study` wrote)."),
    out: Path = typer.Option(Path("studies/RESULTS.md"), "--out", "-o", help="The results page to (re)write."),
):
    """Write a results page from finished studies, next to the paper's numbers.

    Every number comes from the studies' study.json files; text written between
    the page's prose markers is kept when the page is regenerated.
    """
    from .study import write_results_md

    out_console.print(f"results: [bold]{write_results_md(list(studies), out)}[/]")


@app.command("report")
@handle_errors
def report_cmd(
    runs: List[Path] = typer.Argument(..., help="Run directories to put side by side."),
    out: Path = typer.Option(..., "--out", "-o", help="Directory for report.md, report.html and plots."),
):
    """Put runs side by side: the paper's results table and reliability diagrams (Markdown + HTML)."""
    from .report.runreport import write_comparison

    paths = write_comparison(list(runs), out)
    for k, p in paths.items():
        out_console.print(f"{k}: [bold]{p}[/]")


@data_app.command("list")
@handle_errors
def data_list():
    """List the datasets llmcal knows and whether they are available offline."""
    from .data.registry import list_datasets

    t = Table(title="datasets")
    for col in ("name", "source", "offline", "description"):
        t.add_column(col)
    for d in list_datasets():
        t.add_row(d.name, d.source, "yes" if d.offline else "no", d.description)
    out_console.print(t)
    out_console.print("Files: any .jsonl/.json/.csv/.parquet path (see --mapping). "
                      "Synthetic: synthetic:<task>?difficulty=N&n=N&k=N&seed=N")


@data_app.command("show")
@handle_errors
def data_show(
    data: str = typer.Argument(..., help="Dataset name, file or synthetic spec."),
    n: int = typer.Option(3, "-n", help="How many questions to show."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Render with this model's tokenizer "
                                        "(needed for the chat template and to show the letter tokens)."),
    gguf_file: Optional[str] = typer.Option(None),
    template: str = typer.Option("plain", help="plain, chat or auto."),
    subject: List[str] = typer.Option([], "--subject"),
    split: str = typer.Option("all"),
    seed: int = typer.Option(0),
    mapping: Optional[str] = typer.Option(None),
):
    """Show a few prompts exactly as the model will see them, with the answer continuation."""
    from .data import load_dataset
    from .data.schema import LETTERS
    from .prompts import continuation, encode_questions, format_prompt, resolve_template

    ds = load_dataset(data, split=None if split == "all" else split, subjects=list(subject) or None,
                      limit=n, seed=seed, mapping=_mapping(mapping))
    tok = None
    if model:
        from .models import load_tokenizer, resolve_model

        tok = load_tokenizer(resolve_model(model, gguf_file=gguf_file))
        template = resolve_template(template, tok)
    elif template != "plain":
        raise LlmcalError("--template chat/auto needs --model (the chat template belongs to the tokenizer)")
    out_console.print(f"[bold]{ds.name}[/]: {len(ds.questions)} question(s) shown, template {template}")
    encoded = encode_questions(ds.questions, tok, template) if tok is not None else None
    for i, q in enumerate(ds.questions):
        out_console.rule(f"{q.id}  (subject: {q.subject}, answer: {LETTERS[q.answer]})")
        sys.stdout.write(format_prompt(q, template, tok))
        sys.stdout.write(f"\u2038[continuation {continuation(LETTERS[q.answer], template)!r}]\n")
        if encoded is not None:
            ids = encoded[i].letter_ids
            out_console.print(f"prompt tokens: {len(encoded[i].input_ids)}; letter token ids: "
                              + ", ".join(f"{LETTERS[j]}={t}" for j, t in enumerate(ids)), highlight=False)


@app.command("demo")
@handle_errors
def demo_cmd(
    out: Path = typer.Option(Path("demo-run"), "--out", "-o", help="Where the demo writes its runs and report."),
    overwrite: bool = typer.Option(False, help="Start again instead of resuming."),
):
    """Run the embedded default offline: smollm2-135m-instruct on MMLU, uncalibrated / TS / CFT / RCFT."""
    from .demo import demo_config_path, run_demo

    out_console.print(f"[bold]llmcal demo[/]: the study {demo_config_path()} (about 10-15 minutes on 2 CPU cores)")
    report = run_demo(out, overwrite=overwrite)
    out_console.print(f"\n[bold green]demo finished.[/] Report: [bold]{report}[/] (and {Path(report).with_suffix('.md')})")


def main() -> None:
    # transformers' own per-load progress bars and advice are noise next to ours.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    logging.basicConfig(level=os.environ.get("LLMCAL_LOG", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    app()


if __name__ == "__main__":
    main()
