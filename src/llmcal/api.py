"""The public API: what ``import llmcal`` gives, and what the ``llmcal`` commands call.

    import llmcal

    rec = llmcal.evaluate("smollm2-135m-instruct", "mmlu", out="runs/eval", limit=100)
    rec.metrics["conf_ece"]                      # the main result's metrics
    ts = llmcal.calibrate("smollm2-135m-instruct", "mmlu", method="ts", out="runs/ts")
    ft = llmcal.calibrate("smollm2-135m-instruct", method="rcft", train="mmlu", evals=["mmlu"],
                          train_split="train", eval_split="test", out="runs/rcft")
    cmp = llmcal.calibrate(from_run="runs/eval", method="all")   # post-hoc methods on a finished run
    reg = llmcal.diagnose("runs/rcft/adapter", "mmlu", out="runs/regime")
    llmcal.load_run("runs/eval").metrics

Options are the fields of the config classes (``EvalConfig``, ``FinetuneConfig``,
``RegimeConfig``): the same names as the command-line flags with underscores,
checked by pydantic against the same field types when the config is built
(``llmcal.options.config``), then by each run's check of the rules between
options, so a value the CLI refuses is refused here with the same message.
Every function writes a run directory (``out``) and returns its
:class:`~llmcal.runs.RunRecord`; the post-hoc comparison returns a
:class:`~llmcal.posthoc.compare.PosthocReport`.  Problems a user can fix raise
:class:`~llmcal.errors.LlmcalError`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Sequence

from .errors import LlmcalError
from .lmeval import NORMS as LM_EVAL_NORMS
from .lmeval import Norm as LmEvalNorm
from .train.config import METHODS as FINETUNE_METHODS
from .validation import check_value

__all__ = ["evaluate", "calibrate", "diagnose", "FINETUNE_METHODS", "LM_EVAL_NORMS", "POSTHOC_FROM_OPTIONS"]

CalibrateMethod = Literal[("ts", *FINETUNE_METHODS)]
# What a run read from lm-eval samples keeps of the eval options (the rest describe a model to score).
_LM_EVAL_KEEPS = {"n_bins", "n_bootstrap", "seed"}
# The options of a post-hoc comparison on a finished run (the rest describe a model to score or train).
POSTHOC_FROM_OPTIONS = ("calib_fraction", "n_bins", "n_bootstrap", "seed", "batch_tokens", "dtype", "device")


def _given(model: Any, data: Any, options: dict, data_key: str = "data") -> dict:
    """The options with ``model`` and the data argument added when they were given."""
    out = {k: os.fspath(v) if isinstance(v, os.PathLike) else v for k, v in options.items()}
    if model is not None:
        out["model"] = os.fspath(model)
    if data is not None:
        out[data_key] = os.fspath(data)
    return out


def _config(cls: type, values: dict, *, refuse: Sequence[str] = (), what: str) -> Any:
    from .options import fields_of, flag_of, from_mapping

    fields = fields_of(cls)
    for k in values:
        if k in refuse or (k in fields and not fields[k].metadata.get("cli", True)):
            raise LlmcalError(f"{flag_of(cls, k)} does not apply to {what}")
    return from_mapping(cls, {}, options=values)


def eval_config(**options: Any):
    """The ``EvalConfig`` of ``llmcal eval`` from its options (validated; defaults from the class)."""
    from .evaluate import EvalConfig

    return _config(EvalConfig, options, refuse=("calib_fraction",), what="eval")


def evaluate(model: str | None = None, data: str | None = None, *, out: str | Path, overwrite: bool = False,
             progress: bool = True, from_lm_eval: str | Path | None = None, lm_eval_norm: str | None = None,
             lm_eval_task: str | Sequence[str] | None = None, **options: Any):
    """Score ``model`` on ``data`` and measure accuracy and calibration (``llmcal eval``).

    ``options``: any other ``EvalConfig`` field (``limit``, ``split``, ``template``,
    ``num_fewshot``, ``backend``, ``base_url``, ...).  ``from_lm_eval``: read an
    lm-evaluation-harness run (a samples_*.jsonl file or a ``--log_samples``
    folder) instead of scoring a model; ``lm_eval_norm`` (none, acc_norm,
    acc_bytes) and ``lm_eval_task`` go with it.  Returns the finished run.
    """
    from .evaluate import EvalConfig, run_eval
    from .options import flag_of

    values = _given(model, data, options)
    if from_lm_eval is not None:
        from .lmeval import run_from_lm_eval

        extra = sorted(set(values) - _LM_EVAL_KEEPS)
        if extra:
            raise LlmcalError(f"{', '.join(flag_of(EvalConfig, k) for k in extra)}: not used with --from-lm-eval, "
                              f"which reads the scores of an lm-eval run already made")
        norm = check_value(LmEvalNorm, "none" if lm_eval_norm is None else lm_eval_norm, "--lm-eval-norm")
        cfg = eval_config(**values, model="lm-eval", data="lm-eval")
        task = [lm_eval_task] if isinstance(lm_eval_task, str) else list(lm_eval_task or []) or None
        return run_from_lm_eval(from_lm_eval, out, norm=norm, task=task, n_bins=cfg.n_bins,
                                n_bootstrap=cfg.n_bootstrap, seed=cfg.seed, overwrite=overwrite, progress=progress)
    for name, v in (("lm_eval_norm", lm_eval_norm), ("lm_eval_task", lm_eval_task)):
        if v is not None:
            raise LlmcalError(f"--{name.replace('_', '-')} goes with --from-lm-eval")
    missing = [flag_of(EvalConfig, k) for k in ("model", "data") if values.get(k) is None]
    if missing:
        raise LlmcalError(f"eval needs {' and '.join(missing)} (or --from-lm-eval PATH to read an lm-eval run)")
    return run_eval(eval_config(**values), out, overwrite=overwrite, progress=progress)


def calibration_config(method: str | None = "ts", config: str | Path | None = None, **options: Any):
    """The config of ``llmcal calibrate --method METHOD``: ``EvalConfig`` for ts, ``FinetuneConfig`` otherwise.

    ``config``: a YAML file of options (keys: the options' names; for fine-tuning
    also any transformers TrainingArguments field); ``options`` win over it, and
    a ``method`` key in the file is used when ``method`` is None.
    """
    from .evaluate import EvalConfig
    from .options import fields_of, flag_of, from_mapping, read_yaml_options
    from .train.config import FinetuneConfig, check_training_args

    from_file, lines = read_yaml_options(config) if config else ({}, {})
    file_method = from_file.pop("method", None)
    method = check_value(CalibrateMethod, method or file_method or "ts", "--method")
    cls, other = (EvalConfig, FinetuneConfig) if method == "ts" else (FinetuneConfig, EvalConfig)
    mine = fields_of(cls)
    training_args = dict(options.pop("training_args", None) or {})
    wrong = [k for k in options if k not in mine and k in fields_of(other)]
    if wrong:
        applies = "ts" if other is EvalConfig else "cft, rcft and auto"
        raise LlmcalError(f"{flag_of(other, wrong[0])} applies to --method {applies}, not to --method {method}")
    if cls is FinetuneConfig:
        ta_file = {k: from_file.pop(k) for k in list(from_file) if k not in mine}
        check_training_args(ta_file)
        extra = check_training_args({**ta_file, **training_args})
        from_file["training_args"] = {**from_file.get("training_args", {}), **extra}
    elif training_args:
        raise LlmcalError(f"training arguments ({', '.join(training_args)}) apply to --method cft, rcft, auto")
    given = {**options, "method": method}
    for need in ("model", "data", "train"):
        if need in mine and not {**from_file, **given}.get(need):
            raise LlmcalError(f"--method {method} needs {flag_of(cls, need)}")
    return from_mapping(cls, from_file, str(config) if config else None, lines=lines, options=given)


def calibrate(model: str | None = None, data: str | None = None, *, method: str | None = None,
              out: str | Path | None = None, from_run: str | Path | None = None, config: str | Path | None = None,
              overwrite: bool = False, progress: bool = True, **options: Any):
    """Calibrate a model (``llmcal calibrate``); returns the finished run.

    - ``method="ts"`` (the default): temperature fitted on a held-out slice of
      ``data`` (``calib_fraction``), the rest reported before and after.
    - ``method="cft" | "rcft" | "auto"``: calibration-aware fine-tuning on
      ``train=...``, evaluated on ``evals=[...]`` before and after; any
      transformers TrainingArguments field goes in ``training_args={...}``.
    - ``from_run=RUN``: the post-hoc methods named by ``method`` (comma-separated
      or a list: ts, vector, matrix, bias, contextual, batch, platt, isotonic,
      histogram, or all; default ts) fitted on a finished run's stored
      predictions and compared, written to ``out`` (default RUN/posthoc); returns
      the :class:`~llmcal.posthoc.compare.PosthocReport`.  ``all`` leaves out
      contextual calibration, the one method that loads the model; name it to
      include it.
    """
    if from_run is not None:
        if model is not None or data is not None or config is not None:
            raise LlmcalError("calibrate --from works on the run's stored predictions: give no model, data or "
                              "--config")
        return _posthoc(from_run, method or "ts", out, options)
    if out is None:
        raise LlmcalError("missing option --out (the run directory to write)")
    cfg = calibration_config(method, config, **_given(model, data, options))
    return run_calibration(cfg, out, overwrite=overwrite, progress=progress)


def run_calibration(cfg: Any, out: str | Path, *, overwrite: bool = False, progress: bool = True):
    """Run a config :func:`calibration_config` built: temperature scaling or fine-tuning."""
    from .evaluate import EvalConfig, run_calibrate_ts

    if isinstance(cfg, EvalConfig):
        return run_calibrate_ts(cfg, out, overwrite=overwrite, progress=progress)
    from .train.run import run_finetune

    if not cfg.evals:
        raise LlmcalError(f"--method {cfg.method} needs at least one --eval dataset")
    return run_finetune(cfg, out, overwrite=overwrite, progress=progress)  # frozen: no copy needed


def _posthoc(run_dir: str | Path, method: str | Sequence[str], out: str | Path | None, options: dict):
    """``calibrate --from RUN``: every named post-hoc method on the run's stored predictions."""
    from .posthoc import resolve_methods
    from .posthoc.compare import compare_run, select_predictions

    run_dir = Path(run_dir)
    extra = [k for k in options if k not in POSTHOC_FROM_OPTIONS]
    if extra:
        raise LlmcalError(f"--{extra[0].replace('_', '-')} does not apply to calibrate --from (it works on the "
                          f"run's stored predictions)")
    text = method if isinstance(method, str) else ",".join(method)
    names, want_all = resolve_methods(text)
    if want_all and "contextual" not in text.split(","):
        names = [n for n in names if n != "contextual"]  # "all" means what runs without the model
    calib_fraction = options.get("calib_fraction", 0.2)
    priors = None
    if "contextual" in names:  # the one method that needs the model: its content-free inputs
        from .models import load_model
        from .posthoc import content_free_distribution
        from .runs import load_run, recorded_model_spec

        rec = load_run(run_dir)
        spec_doc = rec.config.get("model_spec")
        if not spec_doc:
            raise LlmcalError(f"{run_dir}: its config.json records no model_spec; contextual calibration needs it")
        if spec_doc.get("kind") == "api":
            raise LlmcalError(f"{run_dir}: a served model's run (--backend openai); contextual calibration scores "
                              f"content-free prompts with a local model, so it cannot run here: leave 'contextual' "
                              f"out of --method")
        _, test, source = select_predictions(run_dir, calib_fraction=calib_fraction)
        # lazy: priors from llmcal's store (the priors namespace) never load the weights
        loaded = load_model(recorded_model_spec(spec_doc, run_dir), dtype=options.get("dtype") or "auto",
                            device=options.get("device") or "auto", lazy=True)
        priors = content_free_distribution(loaded, source["template"], sorted({len(p.probs) for p in test}))
    return compare_run(run_dir, names, out, calib_fraction=calib_fraction, contextual_priors=priors,
                       n_bins=options.get("n_bins"), n_bootstrap=options.get("n_bootstrap"), seed=options.get("seed"))


def regime_config(**options: Any):
    """The ``RegimeConfig`` of ``llmcal regime`` from its options (validated; defaults from the class)."""
    from .regime import RegimeConfig

    for need in ("model", "train"):
        if options.get(need) is None:
            raise LlmcalError(f"the regime diagnosis needs --{need}")
    return _config(RegimeConfig, options, what="regime")


def diagnose(model: str | None = None, train: str | None = None, *, out: str | Path, overwrite: bool = False,
             progress: bool = True, **options: Any):
    """The regime diagnosis (``llmcal regime``): can CFT calibrate ``model`` on ``train``'s domain, or does it need
    RCFT?  ``options``: any other ``RegimeConfig`` field (``heldout``, ``tolerance``, ``train_limit``, ...).

    Returns the finished run; ``rec.diagnosis`` is the :class:`~llmcal.regime.Diagnosis`
    and ``rec.metrics`` the held-out side's metrics.
    """
    from .regime import run_regime

    cfg = regime_config(**_given(model, train, options, data_key="train"))
    rec, _ = run_regime(cfg, out, overwrite=overwrite, progress=progress)
    return rec
