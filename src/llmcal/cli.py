"""The ``llmcal`` command line: a thin typer layer over the library API.

Every command maps LlmcalError and OSError (a path that cannot be read or
written, a full disk) to one red ``error:`` line on stderr and exit status 2;
anything else is a bug: one line and exit status 1.  No traceback is shown
unless ``llmcal --debug ...`` or ``LLMCAL_DEBUG=1`` asks for one.  Every
message is redacted (``llmcal.redact``): a URL's credentials never reach the
terminal.
"""
from __future__ import annotations

import functools
import logging
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from .errors import LlmcalError
from .options import parse_mapping

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Measure and restore the calibration of aligned language models on multiple-choice QA.")
data_app = typer.Typer(no_args_is_help=True, help="List datasets and show prompts exactly as the model sees them.")
app.add_typer(data_app, name="data")

out_console = Console()
err_console = Console(stderr=True)


DEBUG_ENV = "LLMCAL_DEBUG"


def debug_enabled() -> bool:
    """``LLMCAL_DEBUG=1`` (or ``llmcal --debug``): let errors raise with their traceback."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


_ERRNO_WORDS = {"ENOSPC": "no space left on the device", "EDQUOT": "disk quota exceeded",
                "EACCES": "permission denied", "EPERM": "operation not permitted",
                "EROFS": "read-only file system", "ENOENT": "no such file or directory",
                "ENOTDIR": "a part of the path is not a directory", "EISDIR": "is a directory",
                "EEXIST": "already exists", "ENAMETOOLONG": "file name too long", "EIO": "input/output error"}


def describe_os_error(e: OSError) -> str:
    """One line for an OSError: the path(s), what failed, and what to do."""
    import errno

    name = errno.errorcode.get(e.errno or -1, "")
    what = _ERRNO_WORDS.get(name) or e.strerror or str(e) or type(e).__name__
    paths = " -> ".join(str(p) for p in (e.filename, e.filename2) if p is not None)
    hint = ""
    if name in ("ENOSPC", "EDQUOT"):
        hint = "; free some space and rerun the same command (a run resumes from what was written)"
    elif name in ("EACCES", "EPERM", "EROFS"):
        hint = "; choose another --out, or fix the permissions"
    return f"{paths}: {what}{hint}" if paths else f"{what}{hint}"


def fail(message: str, code: int = 2):
    """Print ``error: message`` (redacted, Markdown/markup-free) and exit with ``code``."""
    from rich.text import Text

    from .redact import redact_text

    err_console.print(Text.assemble(("error: ", "bold red"), redact_text(str(message))), highlight=False,
                      soft_wrap=True)
    raise typer.Exit(code)


def handle_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted; rerun the same command to resume[/]")
            raise typer.Exit(130)
        except LlmcalError as e:
            if debug_enabled():
                raise
            fail(str(e))
        except OSError as e:
            if debug_enabled():
                raise
            fail(describe_os_error(e))
        except Exception as e:
            if debug_enabled() or type(e).__module__.split(".")[0] in ("click", "typer"):
                raise
            fail(f"internal error: {type(e).__name__}: {e} (a bug in llmcal; rerun with llmcal --debug, or "
                 f"{DEBUG_ENV}=1, for the traceback, and please report it)", code=1)

    return wrapper


def _print_results(record, title: str) -> None:
    # A served model's letter coverage goes next to its metrics (docs/reference.md#served).
    served = any(r.metrics.get("letter_coverage") for r in record.results)
    cols = ["method", "split", "n", "accuracy", "conf-ECE", "cw-ECE", "Brier", "NLL", "mean conf"]
    t = Table(title=title)
    for col in cols + (["letter mass", "missing"] if served else []):
        t.add_column(col, justify="right" if col not in ("method", "split") else "left")
    for r in record.results:
        m = r.metrics
        row = [r.label, str(r.split), str(m["n"]),
               f"{m['accuracy']:.4f} [{m['ci']['accuracy'][0]:.3f}, {m['ci']['accuracy'][1]:.3f}]",
               f"{m['conf_ece']:.4f} [{m['ci']['conf_ece'][0]:.3f}, {m['ci']['conf_ece'][1]:.3f}]",
               f"{m['cw_ece']:.4f}", f"{m['brier']:.4f}", f"{m['nll']:.4f}", f"{m['mean_conf']:.4f}"]
        if served:
            cov = m.get("letter_coverage") or {}
            row += [f"{cov['mean_letter_mass']:.3f} (min {cov['min_letter_mass']:.3f})" if cov else "-",
                    f"{cov['missing_share']:.1%}" if cov else "-"]
        t.add_row(*row)
    out_console.print(t)


OutOpt = typer.Option(..., "--out", "-o", help="Run directory to write (an interrupted run there resumes).")
OverwriteOpt = typer.Option(False, "--overwrite/--no-overwrite", help="Replace the run in --out (complete, or "
                            "interrupted with another configuration) instead of refusing.")


def _register(name: str, params: list, impl, *, extra_args: bool = False) -> None:
    from .options import command

    settings = {"allow_extra_args": True, "ignore_unknown_options": True} if extra_args else {}
    app.command(name, context_settings=settings)(handle_errors(command(params, impl)))


def _eval_params():
    import inspect

    from .evaluate import EvalConfig
    from .options import cli_parameters

    P = inspect.Parameter
    return cli_parameters(EvalConfig, exclude={"calib_fraction"}, optional={"model", "data"}) + [
        P("from_lm_eval", P.KEYWORD_ONLY, annotation=Optional[Path], default=typer.Option(
            None, "--from-lm-eval", help="Read an lm-evaluation-harness run instead of scoring a model: a "
            "samples_*.jsonl file or an `lm_eval --log_samples` output folder (multiple-choice tasks).")),
        P("lm_eval_norm", P.KEYWORD_ONLY, annotation=str, default=typer.Option(
            "none", "--lm-eval-norm", help="--from-lm-eval confidence: softmax over the options' log-likelihoods "
            "(none, lm-eval's acc), or over log-likelihoods per character (acc_norm) or per UTF-8 byte "
            "(acc_bytes).")),
        P("lm_eval_task", P.KEYWORD_ONLY, annotation=Optional[List[str]], default=typer.Option(
            None, "--lm-eval-task", help="--from-lm-eval: keep only this task or group (repeatable; default: "
            "every multiple-choice task in the folder).")),
        P("out", P.KEYWORD_ONLY, default=OutOpt, annotation=Path),
        P("overwrite", P.KEYWORD_ONLY, default=OverwriteOpt, annotation=bool)]


def eval_cmd(ctx, out: Path, overwrite: bool, from_lm_eval: Optional[Path], lm_eval_norm: str,
             lm_eval_task: Optional[List[str]], **values):
    """Evaluate a model's accuracy and calibration on a multiple-choice dataset (or read an lm-eval run)."""
    from .api import evaluate
    from .evaluate import EvalConfig
    from .options import given, to_field_values

    lm = given(ctx, {"lm_eval_norm": lm_eval_norm, "lm_eval_task": lm_eval_task})
    rec = evaluate(out=out, overwrite=overwrite, from_lm_eval=from_lm_eval,
                   **{k: v for k, v in lm.items() if v not in (None, [])},
                   **to_field_values(EvalConfig, given(ctx, values)))
    if from_lm_eval is not None:
        _print_results(rec, f"{rec.model} (lm-eval samples, {from_lm_eval})")
    else:
        _print_results(rec, f"{rec.model} on {values['data']}")
    out_console.print(f"run written to [bold]{out}[/] (report: {out / 'report.md'})")


_register("eval", _eval_params(), eval_cmd)


def _calibrate_params():
    import inspect

    from .evaluate import EvalConfig
    from .options import cli_parameters
    from .train.config import FinetuneConfig

    P = inspect.Parameter
    return [
        P("method", P.KEYWORD_ONLY, annotation=str, default=typer.Option(
            "ts", help="ts (temperature scaling, post-hoc), cft, rcft, or auto (CFT that switches the RCFT term "
                       "on once the model leaves the calibratable regime).")),
        P("from_run", P.KEYWORD_ONLY, annotation=Optional[Path], default=typer.Option(
            None, "--from", help="A finished run directory: fit the post-hoc calibrators named by --method "
                                 "(comma-separated: ts,vector,matrix,bias,contextual,batch,platt,isotonic,histogram, "
                                 "or all) on its stored predictions and compare them, without loading the model "
                                 "(contextual calibration loads it for its content-free inputs).")),
        P("config", P.KEYWORD_ONLY, annotation=Optional[Path], default=typer.Option(
            None, "--config", help="YAML file of options (keys: these options' names with underscores, and any "
                                   "transformers TrainingArguments field); flags given here win.")),
        *cli_parameters(FinetuneConfig, EvalConfig, exclude={"permutations", "pride_fraction"},
                       optional={"model", "train", "data"}),
        P("out", P.KEYWORD_ONLY, annotation=Optional[Path], default=typer.Option(
            None, "--out", "-o", help="Run directory to write (an interrupted run there resumes); with --from, "
                                      "where the comparison goes (default RUN/posthoc).")),
        P("overwrite", P.KEYWORD_ONLY, default=OverwriteOpt, annotation=bool),
        P("dry_run", P.KEYWORD_ONLY, annotation=bool, default=typer.Option(
            False, "--dry-run/--no-dry-run", help="Print the fully resolved configuration (every option, the preset "
                                                  "applied) as YAML and exit, without loading a model or writing a "
                                                  "run (the output is a valid --config file).")),
    ]


def _training_args_from(tokens: list[str]) -> dict:
    """Extra ``--name value`` flags: transformers TrainingArguments fields, parsed by its own parser."""
    if not tokens:
        return {}
    from transformers import HfArgumentParser, TrainingArguments

    names = [t[2:].split("=", 1)[0].replace("-", "_") for t in tokens if t.startswith("--")]
    known = {f.name for f in __import__("dataclasses").fields(TrainingArguments)}
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise LlmcalError(f"no such option: {tokens[0] if not names else '--' + unknown[0].replace('_', '-')} "
                          f"(not an llmcal calibrate option nor a transformers TrainingArguments field; see "
                          f"llmcal calibrate --help)")
    parser = HfArgumentParser(TrainingArguments)

    def refuse(message: str):  # argparse would print its 7 KB usage, then exit: one line instead
        raise LlmcalError(f"training argument: {message} (see llmcal calibrate --help and transformers' "
                          f"TrainingArguments)")

    parser.error = refuse  # type: ignore[method-assign]
    try:
        args, rest = parser.parse_args_into_dataclasses(
            args=["--output_dir", "unused", *tokens], return_remaining_strings=True)
    except ValueError as e:  # TrainingArguments.__post_init__ refusing a value (--warmup-steps -5)
        raise LlmcalError(f"bad training arguments {' '.join(tokens)}: {e}") from None
    if rest:
        raise LlmcalError(f"cannot read training arguments {' '.join(rest)}")
    out = {}
    for n in names:
        v = getattr(args, n)
        out[n] = getattr(v, "value", v)
    return out


def _posthoc_from(ctx, run_dir: Path, method: str, values: dict, out: Optional[Path]) -> None:
    """``calibrate --from RUN``: every named post-hoc method on the run's stored predictions."""
    from .api import POSTHOC_FROM_OPTIONS, calibrate
    from .options import given

    typed = given(ctx, values)
    extra = [k for k in typed if k not in POSTHOC_FROM_OPTIONS]
    if extra or ctx.args:
        name = "--" + extra[0].replace("_", "-") if extra else ctx.args[0]
        raise LlmcalError(f"{name} does not apply to calibrate --from (it works on the run's stored predictions)")
    if "all" in method.split(",") and "contextual" not in method.split(","):
        out_console.print("contextual calibration needs the model: name it (--method all,contextual) to include it")
    report = calibrate(from_run=run_dir, method=method, out=out, **typed)
    t = Table(title=f"post-hoc calibration of {run_dir} ({report.source.get('split', '')})")
    for col in ("method", "accuracy", "Δ accuracy", "conf-ECE", "cw-ECE", "Brier", "NLL", "AURC"):
        t.add_column(col, justify="left" if col == "method" else "right")
    from .report.tables import SIG, format_value
    from .report.verdict import advice_text

    for row in report.comparison.rows:
        def cell(k):  # the report's numbers: 3 significant digits, the interval after them
            return format_value(row.scores[k], row.ci.get(k), sig=SIG)

        change = "—" if row.method == "none" else format_value(row.accuracy_change, row.accuracy_change_ci,
                                                                signed=True, sig=SIG)
        t.add_row(row.method, cell("accuracy"), change, cell("conf_ece"), cell("cw_ece"), cell("brier"), cell("nll"),
                  cell("aurc"))
    out_console.print(t)
    for name, why in report.comparison.skipped.items():
        out_console.print(f"[yellow]skipped {name}[/]: {why}")
    if report.verdict is not None:
        out_console.print(advice_text(report.verdict).replace("**", ""), highlight=False, markup=False)
    out_console.print(f"comparison written to [bold]{report.out_dir}[/] (report.md, report.html, posthoc.json, "
                      f"plots)")


def calibrate_cmd(ctx, method: str, from_run: Optional[Path], config: Optional[Path], out: Optional[Path],
                  overwrite: bool, dry_run: bool, **values):
    """Calibrate a model: post-hoc methods (temperature scaling; with --from, every post-hoc method on a finished
    run), or calibration-aware fine-tuning (CFT/RCFT/auto)."""
    import dataclasses

    if from_run is not None:
        if dry_run:
            raise LlmcalError("--dry-run does not apply to calibrate --from (it loads no model and trains nothing)")
        return _posthoc_from(ctx, from_run, method, values, out)
    if out is None and not dry_run:
        raise LlmcalError("missing option --out (the run directory to write)")

    from .api import FINETUNE_METHODS, calibration_config, run_calibration
    from .evaluate import EvalConfig
    from .options import given, to_field_values
    from .train.config import FinetuneConfig

    method_given = "method" in given(ctx, {"method": method})
    typed = given(ctx, values)
    # a typed flag of either config is passed on; calibration_config says which method it applies to
    options = {**to_field_values(EvalConfig, typed), **to_field_values(FinetuneConfig, typed)}
    if ctx.args:
        if (method if method_given else None) not in FINETUNE_METHODS and not config:
            raise LlmcalError(f"no such option: {ctx.args[0]} (training arguments apply to --method cft, rcft, "
                              f"auto)")
        options["training_args"] = _training_args_from(list(ctx.args))
    cfg = calibration_config(method if method_given else None, config, **options)
    if dry_run:
        import yaml

        from .train.config import resolved_config

        doc = resolved_config(cfg) if isinstance(cfg, FinetuneConfig) else dataclasses.asdict(cfg)
        sys.stdout.write(yaml.safe_dump(doc, sort_keys=False, allow_unicode=True))
        return
    rec = run_calibration(cfg, out, overwrite=overwrite)
    if isinstance(cfg, EvalConfig):
        _print_results(rec, f"{rec.model}: temperature scaling (T={rec.meta['temperature']:.3f})")
        out_console.print(f"run written to [bold]{out}[/] (report: {out / 'report.md'})")
        return
    from .distributed import current_world

    if not current_world().is_main:  # under torchrun every rank returns the record; one prints it
        return
    _print_results(rec, f"{rec.model}: {cfg.method.upper()}")
    drift_info = rec.meta.get("alignment_drift")
    if isinstance(drift_info, dict) and "mean_kl" in drift_info:
        out_console.print(f"alignment drift (mean per-token KL on the shipped prompts): "
                          f"{drift_info['mean_kl']:.4f}")
    out_console.print(f"run written to [bold]{out}[/] (adapter: {out / 'adapter'}; report: {out / 'report.md'})")


_register("calibrate", _calibrate_params(), calibrate_cmd, extra_args=True)


def _regime_params():
    import inspect

    from .options import cli_parameters
    from .regime import RegimeConfig

    return cli_parameters(RegimeConfig, required={"model", "train"}) + [
        inspect.Parameter("out", inspect.Parameter.KEYWORD_ONLY, default=OutOpt, annotation=Path),
        inspect.Parameter("overwrite", inspect.Parameter.KEYWORD_ONLY, default=OverwriteOpt, annotation=bool)]


def regime_cmd(ctx, out: Path, overwrite: bool, **values):
    """Diagnose the regime: can CFT calibrate this model on this domain, or does it need RCFT?"""
    from .api import diagnose
    from .options import given, to_field_values
    from .regime import RegimeConfig, format_diagnosis

    rec = diagnose(out=out, overwrite=overwrite, **to_field_values(RegimeConfig, given(ctx, values)))
    out_console.print(format_diagnosis(rec.diagnosis), highlight=False)
    out_console.print(f"run written to [bold]{out}[/] (diagnosis: {out / 'diagnosis.json'})")


_register("regime", _regime_params(), regime_cmd)


@app.command("conformal")
@handle_errors
def conformal_cmd(
    from_run: Path = typer.Option(..., "--from", help="A finished run directory; its stored predictions are used "
                                  "(no model is loaded)."),
    alpha: float = typer.Option(0.1, help="Miscoverage level: the sets contain the answer with probability >= 1 - alpha."),
    score: str = typer.Option("lac", help="Conformity score: lac (1 - p_k), aps (cumulative mass) or raps (APS + a "
                              "rank penalty)."),
    by: Optional[str] = typer.Option(None, "--by", help="Report coverage per group: subject."),
    mondrian: bool = typer.Option(False, "--mondrian/--no-mondrian", help="One threshold per --by group, calibrated "
                                  "on that group's questions (coverage guaranteed within each group)."),
    result: Optional[str] = typer.Option(None, help="Which result of the run (its label, e.g. none or ts; default: "
                                         "the uncalibrated one)."),
    dataset: Optional[str] = typer.Option(None, help="Which dataset of the run's results (e.g. test or ood)."),
    calib_fraction: float = typer.Option(0.2, help="Calibration slice of a run without predictions-calib.jsonl "
                                         "(the held-out rule the post-hoc methods use)."),
    raps_lambda: float = typer.Option(0.1, help="RAPS penalty per rank beyond --raps-k-reg."),
    raps_k_reg: int = typer.Option(1, help="RAPS: ranks up to this one are not penalised."),
    risk: Optional[float] = typer.Option(None, "--risk", help="Also choose the abstention threshold whose selective "
                                         "error is <= this with probability >= 1 - --delta."),
    delta: float = typer.Option(0.1, "--delta", help="Failure probability of the --risk guarantee."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Where conformal.json, conformal.md and the plot "
                                       "go (default RUN/conformal)."),
):
    """Conformal prediction sets with a coverage guarantee, from a finished run's stored predictions."""
    from .conformal import conformal_run

    res, files = conformal_run(from_run, alpha=alpha, score=score, by=by, mondrian=mondrian, result=result,
                               dataset=dataset, calib_fraction=calib_fraction, lam=raps_lambda, k_reg=raps_k_reg,
                               risk=risk, delta=delta, out_dir=out)
    s = res.summary
    exp = "n/a" if s["expected_range"] is None else f"[{s['expected_range'][0]:.3f}, {s['expected_range'][1]:.3f}]"
    out_console.print(f"{res.score} at alpha {res.alpha:g}: coverage {s['coverage']:.3f} "
                      f"[{s['coverage_ci'][0]:.3f}, {s['coverage_ci'][1]:.3f}] (expected {exp}) on {s['n']} test "
                      f"questions, {len(res.calibration_ids)} calibration; mean set size {s['mean_size']:.2f}, "
                      f"singletons {s['singleton_share']:.1%}, empty {s['empty_share']:.1%}", highlight=False)
    rc = res.risk_control
    if rc is not None:
        t = rc["test"]
        out_console.print("risk control: no threshold certified, abstain on every question" if rc["threshold"] is None
                          else f"risk control: answer when confidence >= {rc['threshold']:.4f} (selective error <= "
                          f"{rc['epsilon']:g} with probability >= {1 - rc['delta']:g}); test coverage "
                          f"{t['coverage']:.3f}, test selective error "
                          + ("n/a" if t["selective_error"] is None else f"{t['selective_error']:.3f}"), highlight=False)
    out_console.print(f"written to [bold]{files['json'].parent}[/] (conformal.json, conformal.md, conformal-alpha.png)")


@app.command("study")
@handle_errors
def study_cmd(
    config: Path = typer.Argument(..., help="Study YAML (models x datasets x methods), e.g. studies/offline.yaml."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Study directory: one run per cell, and the "
                                       "report (required, except with --list-cells)."),
    only: List[str] = typer.Option([], "--only", help="Run only cells matching this glob (model/method[-point]) or model key (repeatable)."),
    overwrite: bool = typer.Option(False, help="Rerun complete cells instead of skipping them."),
    list_cells: bool = typer.Option(False, "--list-cells", help="Print the cells (those --only selects) as "
                                    "NAME KIND STATUS lines, one a cell, and exit: NAME as --only takes it; STATUS "
                                    "(with --out) done, partial or missing. Loads no data and no model."),
    report: bool = typer.Option(True, "--report/--no-report", help="Assemble study.json and the report after "
                                "the cells (--no-report: a fan-out task; `llmcal report DIR` assembles later)."),
):
    """Run a grid of models x methods, resuming finished cells, and write one report.

    Several processes or nodes may run cells of one study directory at once (--only per process): each cell
    owns its run directory, a cell another process is running is refused (exit 2, after the other cells),
    and the shared files are written under the study's lock.
    """
    if list_cells:
        from .study.runner import list_cells as cells_of

        for row in cells_of(config, out, list(only) or None):
            fields = [row["name"], row["kind"]] + ([row["status"]] if out is not None else [])
            if row["after"]:
                fields.append(f"(runs after {row['after']})")
            sys.stdout.write("\t".join(fields) + "\n")
        return
    if out is None:
        raise LlmcalError("llmcal study: --out DIR is required (the study directory), except with --list-cells")
    from .study import run_study

    paths = run_study(config, out, overwrite=overwrite, only=list(only) or None, report=report)
    for k, p in paths.items():
        out_console.print(f"{k}: [bold]{p}[/]")
    if not paths:
        out_console.print(f"cells done; no report written (--no-report): `llmcal report {out}` assembles it")


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
    runs: List[Path] = typer.Argument(..., help="Run directories to put side by side, or one study directory "
                                      "(the --out of `llmcal study`) to assemble."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Directory for report.md, report.html and plots "
                                       "(required for runs; a study's report goes into its own directory)."),
):
    """Put runs side by side, or assemble a study's report from its finished cells.

    Given runs: the paper's results table and every reliability diagram (Markdown + HTML) in --out. Given a
    study directory: its study.json, report.md, report.html and figures from the cells finished there, loading
    no model; safe while other processes still run cells of it.
    """
    if len(runs) == 1 and (runs[0] / "study.yaml").is_file():
        if out is not None and out.resolve() != runs[0].resolve():
            raise LlmcalError(f"--out {out}: a study's report is written into the study directory {runs[0]}; "
                              f"leave --out out")
        from .study import report_from_dir

        paths = report_from_dir(runs[0])
    else:
        if out is None:
            raise LlmcalError("--out DIR is required to put runs side by side (a study directory, which holds "
                              "study.yaml, takes none)")
        from .report.runreport import write_comparison

        paths = write_comparison(list(runs), out)
    for k, p in paths.items():
        out_console.print(f"{k}: [bold]{p}[/]")


@app.command("compare-confidence")
@handle_errors
def compare_confidence_cmd(
    runs: List[Path] = typer.Argument(..., help="Finished runs of one model on the same questions, one per "
                                      "confidence source (eval --confidence logprobs|verbalized|ptrue|consistency)."),
    out: Path = typer.Option(..., "--out", "-o", help="Directory for comparison.json, report.md, report.html and "
                             "the figures."),
    methods: str = typer.Option(",".join(("ts", "platt", "isotonic", "histogram")), "--methods",
                                help="Post-hoc calibrators applied to each source (comma-separated; see `llmcal "
                                "calibrate --method`; not contextual)."),
    calib_fraction: float = typer.Option(0.2, "--calib-fraction", help="Share of the questions the calibrators are "
                                         "fitted on (llmcal's held-out rule, the same questions for every source)."),
    n_bootstrap: Optional[int] = typer.Option(None, "--n-bootstrap", help="Bootstrap resamples (default: the first "
                                              "run's)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Bootstrap and calibration-split seed (default: the "
                                       "first run's)."),
):
    """Compare confidence sources of one model side by side: calibration, ranking, parse rate, cost, post-hoc.

    Refuses runs of different models or questions. Writes comparison.json (every number), report.md and a
    self-contained report.html that opens with the verdict.
    """
    from .confidence_compare import compare_confidence

    comp = compare_confidence(list(runs), out, methods=methods, calib_fraction=calib_fraction,
                              n_bootstrap=n_bootstrap, seed=seed)
    t = Table(title=f"{comp.model}: {len(comp.ids)} questions")
    for col in ("source", "accuracy", "conf-ECE", "AUROC", "parsed", "s / question"):
        t.add_column(col, justify="left" if col == "source" else "right")
    for s in comp.sources:
        cost = (s.get("cost") or {}).get("per_question", {}).get("seconds")
        parse = s.get("parse")
        t.add_row(s["label"], f"{s['accuracy']:.3f}", f"{s['conf_ece']:.3f}",
                  "—" if s["auroc"] is None else f"{s['auroc']:.3f}",
                  "—" if not parse or parse.get("parse_rate") is None else f"{parse['parse_rate']:.1%}",
                  "—" if cost is None else f"{cost:.2f}")
    out_console.print(t)
    for line in comp.verdict["lines"][:2]:
        out_console.print(line.replace("**", ""), highlight=False, markup=False)
    for k in ("json", "md", "html"):
        out_console.print(f"{k}: [bold]{comp.files[k]}[/]")


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
    gguf_file: Optional[str] = typer.Option(None, help="GGUF file name inside --model's directory or hub "
                                            "repository."),
    template: str = typer.Option("auto", help="plain, chat, or auto (chat when --model's tokenizer has a chat "
                                 "template; plain without --model)."),
    subject: List[str] = typer.Option([], "--subject", help="Keep only this subject (repeatable)."),
    split: str = typer.Option("all", help="Named split: all, train, calib or test."),
    seed: int = typer.Option(0, help="Seed of the split and of the subset shown."),
    mapping: Optional[str] = typer.Option(None, help='Column mapping of a data file: JSON, or '
                                          '"question=q,choices=A|B|C|D,answer=label".'),
):
    """Show a few prompts exactly as the model will see them, with the answer continuation."""
    from .data import load_dataset
    from .data.schema import LETTERS
    from .prompts import continuation, encode_questions, format_prompt, resolve_template

    ds = load_dataset(data, split=None if split == "all" else split, subjects=list(subject) or None,
                      limit=n, seed=seed, mapping=parse_mapping(mapping))
    tok = None
    if model:
        from .models import load_tokenizer, resolve_model

        tok = load_tokenizer(resolve_model(model, gguf_file=gguf_file))
        template = resolve_template(template, tok)
    elif template == "auto":
        template = "plain"  # no tokenizer, no chat template
    elif template != "plain":
        raise LlmcalError("--template chat needs --model (the chat template belongs to the tokenizer)")
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
    """Run the embedded default offline: qwen2.5-coder-1.5b-instruct on MMLU, uncalibrated / TS / CFT / RCFT."""
    from .demo import demo_config_path, run_demo

    out_console.print(f"[bold]llmcal demo[/]: the study {demo_config_path()} (about 10 minutes on 2 CPU cores)")
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
    if sys.argv[1:2] == ["--debug"]:  # llmcal --debug COMMAND ...: tracebacks instead of one-line errors
        del sys.argv[1]
        os.environ[DEBUG_ENV] = "1"
    logging.basicConfig(level=os.environ.get("LLMCAL_LOG", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(_redact_record)
    app()


def _redact_record(record: logging.LogRecord) -> bool:
    """A logging filter: the message with a URL's credentials redacted (``llmcal.redact``)."""
    from .redact import redact_text

    msg = record.getMessage()
    clean = redact_text(msg)
    if clean != msg:
        record.msg, record.args = clean, None
    return True


if __name__ == "__main__":
    main()
