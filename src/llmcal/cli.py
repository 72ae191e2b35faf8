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


@app.command("calibrate")
@handle_errors
def calibrate_cmd(
    method: str = typer.Option("ts", help="ts (temperature scaling)."),
    model: str = ModelOpt,
    data: str = typer.Option(None, "--data", "-d", help="Dataset to split into calibration and test parts."),
    out: Path = typer.Option(..., "--out", "-o"),
    gguf_file: Optional[str] = typer.Option(None),
    base: Optional[str] = typer.Option(None),
    subject: List[str] = typer.Option([], "--subject"),
    limit: Optional[int] = typer.Option(None),
    seed: int = typer.Option(0),
    template: str = typer.Option("auto"),
    dtype: str = typer.Option("auto"),
    device: str = typer.Option("auto"),
    batch_tokens: int = typer.Option(2048),
    mapping: Optional[str] = typer.Option(None),
    n_bins: int = typer.Option(10),
    calib_fraction: float = typer.Option(0.2, help="Share of the questions used to fit the calibrator."),
    overwrite: bool = typer.Option(False),
):
    """Fit a post-hoc calibrator on a calibration split and report test metrics before and after."""
    if method != "ts":
        raise LlmcalError(f"unknown --method {method!r}; choose ts")
    if not data:
        raise LlmcalError("--data is required")
    if not 0 < calib_fraction < 1:
        raise LlmcalError(f"--calib-fraction must be between 0 and 1 (got {calib_fraction})")
    from .evaluate import run_calibrate_ts

    cfg = _eval_config(model, data, gguf_file, base, "all", subject, limit, seed, template, dtype, device,
                       batch_tokens, mapping, n_bins, method="ts", calib_fraction=calib_fraction)
    rec = run_calibrate_ts(cfg, out, overwrite=overwrite)
    _print_results(rec, f"{rec.model}: temperature scaling (T={rec.meta['temperature']:.3f})")
    out_console.print(f"run written to [bold]{out}[/] (report: {out / 'report.md'})")


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
    limit: int = typer.Option(300, help="MMLU questions (a fixed subset)."),
    overwrite: bool = typer.Option(False, help="Start again instead of resuming."),
):
    """Run the embedded default end to end, offline: smollm2-135m-instruct on MMLU, TS, and the report."""
    from .demo import run_demo

    report = run_demo(out, limit=limit, overwrite=overwrite, console=out_console)
    out_console.print(f"\n[bold green]demo finished.[/] Report: [bold]{report}[/]")


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
