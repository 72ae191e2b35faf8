"""Calibration-aware fine-tuning (docs/reference.md, "CFT" and "RCFT"): LoRA on transformers' Trainer.

    from llmcal.train import FinetuneConfig, run_finetune
    cfg = FinetuneConfig(model="smollm2-135m-instruct", train="mmlu", evals=["mmlu", "arc-challenge"],
                         train_split="train", eval_split="test", method="rcft")
    rec = run_finetune(cfg, "runs/rcft")  # mmlu: trained on its train part, evaluated on its test part

Files, one idea each: ``config`` (options, presets, checks), ``data`` (train /
held-out / eval questions), ``collator`` (examples and batches), ``losses``
(answer SFT loss, RCFT's L_ECE), ``trainer`` (the Trainer subclass),
``estimate`` (scoring statistics summed over ranks), ``callbacks`` (E-step,
auto regime switch, curve, checkpointed state), ``state`` (what the loss and
callbacks share, saved with checkpoints), ``model`` (load, LoRA, save),
``curve`` and ``run`` (``run_finetune``).  Several processes: ``llmcal.distributed``.
"""
from __future__ import annotations

from .config import FinetuneConfig, apply_preset, validate

__all__ = ["FinetuneConfig", "RcftLoss", "answer_ce_loss", "apply_preset", "run_finetune", "validate"]

_LAZY = {"run_finetune": "run", "RcftLoss": "losses", "answer_ce_loss": "losses"}


def __getattr__(name: str):
    # torch and transformers load only when training is actually asked for.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
