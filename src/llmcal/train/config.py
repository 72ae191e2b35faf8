"""The fine-tuning configuration (``llmcal calibrate --method cft|rcft|auto``) and its checks.

``FinetuneConfig`` is a frozen config dataclass (``llmcal.options.config``): the
CLI, a YAML file or the Python API builds it, pydantic checks each field against
its type then, and ``run_finetune`` stores it as the run's config.json.
``validate`` checks the rules between fields and the TrainingArguments before
anything is loaded, so a typo costs nothing.  ``apply_preset`` fills in a preset's
hyper-parameters (``paper``: the settings of the authors' training script for
Xiao et al., ICML 2025); ``resolved_config`` is what ``calibrate --dry-run`` prints.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import Field

from ..data.splits import Split
from ..errors import LlmcalError
from ..options import Dtype, Template, config, flag_of, option, parse_every, parse_modules, shared
from ..regime import DEFAULT_TOLERANCE
from ..validation import (Fraction, Int, NonEmptyStr, NonNegativeNumber, PositiveInt, PositiveNumber, UnitInterval,
                          says)

Method = Literal["cft", "rcft", "auto"]
METHODS = typing.get_args(Method)
MaxSteps = Annotated[Union[Literal[-1], PositiveInt], says("a positive integer or -1")]
Processes = Annotated[Union[Literal["auto"], PositiveInt], says("auto or a positive integer")]
EstepEvery = Annotated[Union[Literal["epoch"], PositiveInt], says("'epoch' or a positive number of steps")]
# bf16-if-supported: the paper preset's (resolved when the device is known)
TrainDtype = Literal[(*typing.get_args(Dtype), "bf16-if-supported")]
TargetModules = Annotated[Union[NonEmptyStr, Annotated[list[NonEmptyStr], Field(min_length=1)]],
                          says("all-linear or a non-empty list of module names")]

# The authors' settings (docs/reference.md, "Paper preset"): scripts/submit_training.sh (lr, epochs, batch per
# GPU), utils/util_olmo.py (LoRA), train/trainer.py (SFTConfig: cosine schedule, warmup ratio 0.1, bf16) of
# github.com/ZhanliangAaronWang/RestoreLLMCalibration.  4-bit base weights are used on top of these when
# bitsandbytes and a GPU are present.  The schedule goes through TrainingArguments (warmup_steps < 1 is a ratio).
PAPER = {"lora_r": 128, "lora_alpha": 64, "lora_dropout": 0.05, "target_modules": "all-linear",
         "lr": 5e-6, "epochs": 5, "batch_size": 2, "dtype": "bf16-if-supported"}
PAPER_TRAINING_ARGS = {"lr_scheduler_type": "cosine", "warmup_steps": 0.1}


@config
class FinetuneConfig:
    """Everything that decides a fine-tuning run's numbers (stored as config.json).

    Every field is a ``llmcal calibrate`` flag (``--`` + its name with dashes unless
    noted), a key of ``calibrate --config FILE.yaml`` and a study option.
    """

    model: NonEmptyStr = shared("model")
    train: NonEmptyStr = option(help="cft/rcft/auto: in-domain training data (any --data spec); a held-out slice of it "
                                     "(--heldout-fraction) is never trained on.")
    evals: list[str] = option(flag="--eval", default_factory=list,
                              help="cft/rcft/auto: evaluation data, scored before and after training (repeatable: "
                                   "in-domain and out-of-domain).")
    gguf_file: Optional[str] = shared("gguf_file")
    base: Optional[str] = shared("base")
    method: Method = option("cft", cli=False, flag="--method", help="cft | rcft | auto (set by calibrate --method).")
    epochs: NonNegativeNumber = option(3, help="Training epochs.")
    max_steps: MaxSteps = option(-1, help="Stop after this many optimiser steps (-1: train --epochs epochs).")
    lr: PositiveNumber = option(2e-4, help="Learning rate of the LoRA weights (linear decay, no warm-up unless "
                                           "--lr-scheduler-type/--warmup-steps say otherwise).")
    batch_size: PositiveInt = option(4, help="Questions per optimiser step and process (before --grad-accum).")
    grad_accum: PositiveInt = option(1, help="Gradient accumulation steps.")
    processes: Processes = option("auto", parse=lambda v: int(v) if str(v).strip().isdigit() else str(v).strip(),
                                  cli_type=str,
                                  help="Training processes llmcal starts itself (data-parallel, gloo, one share of "
                                       "the cores each): auto = 2 on a CPU machine with at least 2 cores when "
                                       "--batch-size is even, else 1. --batch-size is split between them, so the "
                                       "optimiser sees the same batches as with 1 process. Under torchrun or "
                                       "accelerate launch the launcher decides (and --batch-size is per process).")
    packed_batches: bool = option(True, help="Pack each batch's questions into one row (no padding; each question "
                                             "attends only to itself) where the model supports it; "
                                             "--no-packed-batches pads them to the longest.")
    lora_r: PositiveInt = option(16, help="LoRA rank.")
    lora_alpha: PositiveInt = option(32, help="LoRA alpha (scale alpha/r).")
    lora_dropout: Fraction = option(0.05, help="LoRA dropout.")
    target_modules: TargetModules = option("all-linear", parse=parse_modules, cli_type=str,
                                           help="Modules that get LoRA adapters: all-linear or comma-separated "
                                                "names (q_proj,v_proj).")
    seed: Int = shared("seed")
    heldout_fraction: Fraction = option(0.2, help="Share of --train held out (never trained on) for the RCFT E-step, "
                                                  "the auto regime check and the training curve.")
    dtype: TrainDtype = shared("dtype")
    device: str = shared("device")
    template: Template = shared("template")
    train_limit: Optional[PositiveInt] = option(None, help="Use a fixed, seeded subset of this many --train "
                                                           "questions.")
    eval_limit: Optional[PositiveInt] = option(None, help="Use a fixed, seeded subset of this many questions per "
                                                          "--eval set.")
    train_subjects: Optional[list[str]] = option(None, flag="--train-subject",
                                                 help="Keep only this subject of --train (repeatable).")
    eval_subjects: Optional[list[str]] = option(None, flag="--eval-subject",
                                                help="Keep only this subject of the --eval sets (repeatable).")
    rcft_lambda: NonNegativeNumber = option(1.0, help="RCFT: weight of the ECE term (loss = CFT + lambda * L_ECE).")
    rcft_variant: Literal["llmcal", "official"] = option(
        "llmcal", help="RCFT objective: llmcal (CFT + lambda * L_ECE, E-step every epoch on "
                       "the held-out slice) or official (the authors' code: (1 - alpha) * "
                       "SFT + alpha * 1e-3 * R, one E-step on the training set before "
                       "training; docs/reference.md#rcft-official).")
    rcft_alpha: UnitInterval = option(
        1.0, help="--rcft-variant official: the mix alpha in [0, 1] (1.0: the authors' RCFT "
                  "runs, 0.0: their CFT).")
    rcft_skip_top_bin: bool = option(False, help="--rcft-variant official: leave the top bin [0.9, 1] "
                                                 "unregularised, as the authors' loss loop does.")
    n_bins: PositiveInt = shared("n_bins")
    estep_every: EstepEvery = option("epoch", parse=parse_every, cli_type=str,
                                     help="RCFT E-step frequency: epoch, or a number of optimiser steps.")
    estep_prior: NonNegativeNumber = option(
        4.0, help="RCFT E-step: weight, in questions per bin, of the prior each bin's "
                  "accuracy is shrunk toward (0: raw bin accuracy; docs/estep.md).")
    estep_set: Literal["heldout", "train"] = option(
        "heldout", help="Questions the E-step estimates bin accuracies on: heldout or train.")
    nonmax_rule: Literal["proportional", "tanh"] = option(
        "proportional", help="RCFT targets of the non-max options: proportional or tanh.")
    tolerance: NonNegativeNumber = option(DEFAULT_TOLERANCE, help="auto: the RCFT term switches on once train minus "
                                                                  "held-out accuracy exceeds this.")
    preset: Literal["default", "paper"] = option(
        "default", help="default (small models) or paper (the authors' script: r=128, alpha=64, "
                        "dropout 0.05, all linear layers, lr 5e-6, 5 epochs, batch 2, cosine "
                        "schedule with 10% warm-up, bf16; 4-bit base where bitsandbytes and a GPU "
                        "are present). Options you set win over the preset.")
    squared_epochs: bool = option(False, help="The authors' epoch loop: their train() runs the whole training "
                                              "of --epochs epochs --epochs times over, optimizer and schedule "
                                              "starting afresh each time (5 epochs: 25 passes over the data).")
    merge: bool = option(False, help="Also write the merged model (base + adapter) to RUN/merged.")
    include_explanation: bool = option(False, help="Also train on the explanation text that follows the answer, "
                                                   "when the data has one.")
    save_steps: PositiveInt = option(50, help="Checkpoint every N optimiser steps.")
    resume: bool = option(False, help="Continue an interrupted training run from its last checkpoint.")
    drift: bool = option(True, help="Measure alignment drift on the shipped instruction prompts.")
    batch_tokens: PositiveInt = shared("batch_tokens")
    mapping: Optional[dict] = shared("mapping")
    n_bootstrap: PositiveInt = shared("n_bootstrap")
    # One dataset for training and in-domain evaluation: its named splits (data.splits.SPLITS).
    train_split: Optional[Split] = option(None, help="Named split of --train to train on (train, calib or test); give "
                                                     "--eval-split too, e.g. --train-split train --eval-split test.")
    eval_split: Optional[Split] = option(None, help="Named split of an --eval set that is the --train dataset.")
    training_args: dict[str, Any] = option(default_factory=dict, cli=False,
                                           help="Any other transformers TrainingArguments field (report_to, "
                                                "gradient_checkpointing, lr_scheduler_type, warmup_steps, ...).")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# TrainingArguments fields that llmcal sets from its own options (or must own): the flag to use instead.
OWNED_TRAINING_ARGS = {
    "output_dir": "--out", "num_train_epochs": "--epochs", "max_steps": "--max-steps", "learning_rate": "--lr",
    "per_device_train_batch_size": "--batch-size", "gradient_accumulation_steps": "--grad-accum",
    "seed": "--seed", "data_seed": "--seed", "save_steps": "--save-steps", "use_cpu": "--device",
    "bf16": "--dtype", "fp16": "--dtype", "remove_unused_columns": None, "disable_tqdm": None,
}


def check_training_args(extra: dict) -> dict:
    """Validate ``training_args`` against transformers' TrainingArguments; returns them unchanged."""
    from transformers import TrainingArguments

    known = {f.name for f in dataclasses.fields(TrainingArguments)}
    for k in extra:
        if k in OWNED_TRAINING_ARGS:
            use = OWNED_TRAINING_ARGS[k]
            raise LlmcalError(f"training argument {k!r} is set by llmcal" + (f"; use {use}" if use else ""))
        if k not in known:
            close = difflib.get_close_matches(k, known, n=3)
            raise LlmcalError(f"unknown training argument {k!r} (not a field of transformers' TrainingArguments)"
                              + (f"; did you mean {', '.join(close)}?" if close else ""))
    if extra:
        _construct_training_args(extra)
    return extra


def _construct_training_args(extra: dict) -> None:
    """Build what the Trainer will build from ``extra`` (TrainingArguments, then its reporting integrations'
    callbacks), so that a bad value (``warmup_steps: -5``, ``report_to: nosuchthing``, an integration that is
    not installed) is refused before any data or model is loaded."""
    import tempfile

    from transformers import TrainingArguments
    from transformers.integrations import get_reporting_integration_callbacks

    described = ", ".join(f"{k}={v!r}" for k, v in extra.items())
    with tempfile.TemporaryDirectory(prefix="llmcal-check-") as tmp:
        kwargs = dict(output_dir=tmp, use_cpu=True, save_strategy="steps", save_steps=50, logging_steps=1,
                      report_to=[], remove_unused_columns=False, disable_tqdm=True)
        try:
            args = TrainingArguments(**{**kwargs, **extra})
        except (ValueError, TypeError, ImportError) as e:
            raise LlmcalError(f"training arguments {described}: {e}") from None
        try:
            for cb in get_reporting_integration_callbacks(args.report_to):
                cb()  # what the Trainer's CallbackHandler does: an integration that is not installed fails here
        except Exception as e:  # noqa: BLE001 - any integration's own complaint
            raise LlmcalError(f"training argument report_to={args.report_to!r}: {e}") from None


def apply_preset(cfg: FinetuneConfig) -> FinetuneConfig:
    """``cfg`` with the preset's values for every field still at its default (``cfg`` itself for ``default``:
    configs are frozen).

    Options set explicitly (to a non-default value) win over the preset, so
    ``--preset paper --epochs 1`` trains one epoch with the paper's other settings.
    ``dtype`` becomes ``bf16-if-supported`` (resolved when the device is known).
    """
    if cfg.preset == "default":
        return cfg
    defaults = {f.name: f.default for f in dataclasses.fields(FinetuneConfig)}
    changes = {k: v for k, v in PAPER.items() if getattr(cfg, k) == defaults.get(k, object())}
    if cfg.dtype == "auto":
        changes["dtype"] = PAPER["dtype"]
    changes["training_args"] = {**PAPER_TRAINING_ARGS, **cfg.training_args}  # training arguments given win
    return dataclasses.replace(cfg, **changes)


def resolved_config(cfg: FinetuneConfig) -> dict:
    """Every option of ``cfg`` as a run would use it (the preset applied, validated): ``calibrate --dry-run``."""
    cfg = apply_preset(cfg)
    validate(cfg)
    return cfg.to_dict()


def estep_steps(cfg: FinetuneConfig) -> int | None:
    """None for an E-step every epoch, else the number of optimizer steps between E-steps."""
    if cfg.estep_every == "epoch":
        return None
    return int(cfg.estep_every)


def validate(cfg: FinetuneConfig) -> None:
    """Raise LlmcalError for a bad combination of options (each option's own type was checked when ``cfg``
    was built) or a bad training argument; runs before any data or model is loaded."""

    def bad(msg: str) -> None:
        raise LlmcalError(msg)

    if not cfg.evals:
        bad("no evaluation data given (--eval)")
    _check_rcft_variant(cfg)
    if cfg.squared_epochs and (cfg.max_steps != -1 or float(cfg.epochs) != int(cfg.epochs) or cfg.epochs < 1):
        bad(f"--squared-epochs repeats a whole number of epochs that many times: give --epochs as a whole number "
            f">= 1 and no --max-steps (got --epochs {cfg.epochs}, --max-steps {cfg.max_steps})")
    if (cfg.train_split is None) != (cfg.eval_split is None):
        bad("give --train-split and --eval-split together (e.g. --train-split train --eval-split test)")
    if cfg.train_split is not None and cfg.train_split == cfg.eval_split:
        bad(f"--train-split and --eval-split are both {cfg.train_split!r}; the evaluation must use other questions")
    if cfg.epochs == 0 and cfg.max_steps < 1:
        bad(f"--epochs must be a positive number (got {cfg.epochs!r}); 0 goes only with --max-steps")
    if isinstance(cfg.processes, int) and cfg.processes > 1 and cfg.batch_size % cfg.processes:
        bad(f"--batch-size {cfg.batch_size} does not split evenly between --processes {cfg.processes}")
    check_training_args(cfg.training_args)


# Options of llmcal's RCFT that the official variant has no use for (its E-step and its mix are fixed).
_LLMCAL_ONLY = ("rcft_lambda", "estep_every", "estep_prior", "estep_set", "nonmax_rule")
_OFFICIAL_ONLY = ("rcft_alpha", "rcft_skip_top_bin")


def _check_rcft_variant(cfg: FinetuneConfig) -> None:
    """No option of the other RCFT variant is set away from its default."""
    defaults = {f.name: f.default for f in dataclasses.fields(FinetuneConfig)}
    unused = _LLMCAL_ONLY if cfg.rcft_variant == "official" else _OFFICIAL_ONLY
    for name in unused:
        if getattr(cfg, name) != defaults[name]:
            other = "official" if cfg.rcft_variant == "llmcal" else "llmcal"
            why = (" (the official objective mixes with --rcft-alpha and estimates its bins once, on the training "
                   "set, with the tanh targets)" if cfg.rcft_variant == "official" else "")
            raise LlmcalError(f"{flag_of(FinetuneConfig, name)} applies to --rcft-variant {other}, not to "
                              f"--rcft-variant {cfg.rcft_variant}{why}")
