"""The fine-tuning configuration (``llmcal calibrate --method cft|rcft|auto``) and its checks.

``FinetuneConfig`` is a plain dataclass: the CLI builds it, ``run_finetune``
stores it as the run's config.json.  ``validate`` runs before anything is
loaded, so a typo costs nothing.  ``apply_preset`` fills in a preset's
hyper-parameters (``paper``: the settings of Xiao et al., ICML 2025).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..errors import LlmcalError
from ..regime import DEFAULT_TOLERANCE

METHODS = ("cft", "rcft", "auto")
NONMAX_RULES = ("proportional", "tanh")
ESTEP_SETS = ("heldout", "train")
PRESETS = ("default", "paper")
SPLITS = ("train", "heldout", "test")  # the parts of data.splits.TRAINING_SPLITS

# The paper's QLoRA settings (DESIGN.md "CFT").  4-bit base weights are used on
# top of these when bitsandbytes and a GPU are present.
PAPER = {"lora_r": 128, "lora_alpha": 64, "lora_dropout": 0.05, "target_modules": "all-linear",
         "lr": 5e-4, "epochs": 5, "batch_size": 2, "dtype": "bf16-if-supported"}


@dataclass
class FinetuneConfig:
    """Everything that decides a fine-tuning run's numbers (stored as config.json)."""

    model: str
    train: str  # dataset spec of the training data (split into train / held-out by heldout_fraction)
    evals: list[str] = field(default_factory=list)  # dataset specs evaluated before and after training
    gguf_file: str | None = None
    base: str | None = None  # base model of a LoRA adapter given as --model
    method: str = "cft"  # cft | rcft | auto
    epochs: float = 3
    max_steps: int = -1  # > 0 overrides epochs
    lr: float = 2e-4
    batch_size: int = 4
    grad_accum: int = 1
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: str | list[str] = "all-linear"
    seed: int = 0
    heldout_fraction: float = 0.2  # share of the training data kept out for the E-step and regime checks
    dtype: str = "auto"
    device: str = "auto"
    template: str = "auto"
    train_limit: int | None = None
    eval_limit: int | None = None
    subjects: list[str] | None = None  # of the training data
    eval_subjects: list[str] | None = None
    rcft_lambda: float = 1.0
    n_bins: int = 10
    estep_every: str | int = "epoch"  # "epoch" or a number of optimizer steps
    estep_set: str = "heldout"  # heldout | train
    nonmax_rule: str = "proportional"  # proportional | tanh
    tolerance: float = DEFAULT_TOLERANCE  # for --method auto
    preset: str = "default"  # default | paper
    merge: bool = False
    include_explanation: bool = False
    save_steps: int = 50
    resume: bool = False
    drift: bool = True
    batch_tokens: int = 2048  # scoring batches (E-step, curve, evaluation)
    mapping: dict | None = None
    n_bootstrap: int = 1000
    # Optional hash splits (data.splits.TRAINING_SPLITS: train 0.6 / heldout 0.2 / test 0.2) so that
    # one dataset can serve for training and for in-domain evaluation: --train-split train --eval-split test.
    train_split: str | None = None
    eval_split: str | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def apply_preset(cfg: FinetuneConfig) -> FinetuneConfig:
    """A copy of ``cfg`` with the preset's values for every field still at its default.

    Options set explicitly (to a non-default value) win over the preset, so
    ``--preset paper --epochs 1`` trains one epoch with the paper's other settings.
    ``dtype`` becomes ``bf16-if-supported`` (resolved when the device is known).
    """
    if cfg.preset not in PRESETS:
        raise LlmcalError(f"unknown --preset {cfg.preset!r}; choose one of {', '.join(PRESETS)}")
    if cfg.preset == "default":
        return dataclasses.replace(cfg)
    defaults = {f.name: f.default for f in dataclasses.fields(FinetuneConfig)}
    changes = {k: v for k, v in PAPER.items() if getattr(cfg, k) == defaults.get(k, object())}
    if cfg.dtype == "auto":
        changes["dtype"] = PAPER["dtype"]
    return dataclasses.replace(cfg, **changes)


def estep_steps(cfg: FinetuneConfig) -> int | None:
    """None for an E-step every epoch, else the number of optimizer steps between E-steps."""
    if cfg.estep_every == "epoch":
        return None
    return int(cfg.estep_every)


def validate(cfg: FinetuneConfig) -> None:
    """Raise LlmcalError for any bad option; runs before any data or model is loaded."""

    def bad(msg: str) -> None:
        raise LlmcalError(msg)

    if cfg.method not in METHODS:
        bad(f"unknown --method {cfg.method!r}; choose one of {', '.join(METHODS)} (ts is post-hoc, see calibrate)")
    if not cfg.model:
        bad("no model given (--model)")
    if not cfg.train:
        bad("no training data given (--train)")
    if not cfg.evals:
        bad("no evaluation data given (--eval)")
    if cfg.nonmax_rule not in NONMAX_RULES:
        bad(f"unknown --nonmax-rule {cfg.nonmax_rule!r}; choose one of {', '.join(NONMAX_RULES)}")
    if cfg.estep_set not in ESTEP_SETS:
        bad(f"unknown --estep-set {cfg.estep_set!r}; choose one of {', '.join(ESTEP_SETS)}")
    if cfg.preset not in PRESETS:
        bad(f"unknown --preset {cfg.preset!r}; choose one of {', '.join(PRESETS)}")
    if cfg.estep_every != "epoch":
        try:
            n = int(cfg.estep_every)
        except (TypeError, ValueError):
            n = 0
        if isinstance(cfg.estep_every, bool) or n < 1 or str(n) != str(cfg.estep_every).strip():
            bad(f"--estep-every must be 'epoch' or a positive number of steps (got {cfg.estep_every!r})")
    for name, value in (("--train-split", cfg.train_split), ("--eval-split", cfg.eval_split)):
        if value is not None and value not in SPLITS:
            bad(f"{name} {value!r}: choose one of {', '.join(SPLITS)}")
    if (cfg.train_split is None) != (cfg.eval_split is None):
        bad("give --train-split and --eval-split together (e.g. --train-split train --eval-split test)")
    if cfg.train_split is not None and cfg.train_split == cfg.eval_split:
        bad(f"--train-split and --eval-split are both {cfg.train_split!r}; the evaluation must use other questions")
    _positive(cfg.epochs, "--epochs", allow_zero=cfg.max_steps > 0)
    if not isinstance(cfg.max_steps, int) or (cfg.max_steps < 1 and cfg.max_steps != -1):
        bad(f"--max-steps must be a positive integer or -1 (got {cfg.max_steps!r})")
    _positive(cfg.lr, "--lr")
    for name, value in (("--batch-size", cfg.batch_size), ("--grad-accum", cfg.grad_accum),
                        ("--lora-r", cfg.lora_r), ("--lora-alpha", cfg.lora_alpha), ("--n-bins", cfg.n_bins),
                        ("--save-steps", cfg.save_steps), ("--batch-tokens", cfg.batch_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            bad(f"{name} must be a positive integer (got {value!r})")
    if not 0 <= cfg.lora_dropout < 1:
        bad(f"--lora-dropout must be in [0, 1) (got {cfg.lora_dropout})")
    if not 0 <= cfg.heldout_fraction < 1:
        bad(f"--heldout-fraction must be in [0, 1) (got {cfg.heldout_fraction})")
    if cfg.rcft_lambda < 0:
        bad(f"--rcft-lambda must be >= 0 (got {cfg.rcft_lambda})")
    if cfg.tolerance < 0:
        bad(f"--tolerance must be >= 0 (got {cfg.tolerance})")
    if cfg.n_bootstrap < 1:
        bad(f"--n-bootstrap must be >= 1 (got {cfg.n_bootstrap})")
    for name, value in (("--train-limit", cfg.train_limit), ("--eval-limit", cfg.eval_limit)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            bad(f"{name} must be a positive integer (got {value!r})")
    if not cfg.target_modules:
        bad("--target-modules is empty; use all-linear or a list of module names")


def _positive(value, name: str, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (value > 0 or (allow_zero and value == 0))
    if not ok:
        raise LlmcalError(f"{name} must be a positive number (got {value!r})")
