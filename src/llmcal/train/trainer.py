"""``CalibrationTrainer``: transformers' Trainer with the CFT / RCFT loss, and nothing else changed.

Logging, checkpointing, resume, mixed precision, gradient accumulation and
multi-process training all stay the base class's.  The loss is

    loss = answer SFT loss                                  (CFT)
         + lambda * L_ECE(K-letter logits; bin targets)     (when the RCFT term is on)

The bin targets live in a ``TrainState`` that the E-step callback refreshes.

The forward goes through the (possibly DDP-wrapped) model, so gradients are
synchronised as usual, and asks for vocabulary logits only at the positions
that have a target (``logits_to_keep`` with a tensor of positions): one (B x V)
projection per batch instead of (B x L x V).  The K-letter logits are read
from the same vocabulary logits at the answer position, so they equal the
scoring engine's ``option_logits`` for the same weights.
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch
from transformers import Trainer

from .collator import IGNORE
from .losses import RcftLoss, answer_ce_loss
from .state import TrainState


@dataclass
class AnswerOutput:
    sft_loss: torch.Tensor  # mean CE over the target tokens (full vocabulary)
    letter_logits: torch.Tensor  # (B, K) float32, -inf on padded option slots


def _core(model):
    while hasattr(model, "module"):  # DDP and friends
        model = model.module
    if hasattr(model, "get_base_model"):  # peft
        model = model.get_base_model()
    return model


@functools.lru_cache(maxsize=None)
def _takes_logits_to_keep(model_type: type) -> bool:
    return "logits_to_keep" in inspect.signature(model_type.forward).parameters


def answer_forward(model, batch: dict) -> AnswerOutput:
    """The training forward: SFT loss on the targets and the K-letter logits at the answer position."""
    ids, mask, targets = batch["input_ids"], batch["attention_mask"], batch["targets"]
    cols = torch.nonzero((targets != IGNORE).any(dim=0)).squeeze(1)  # positions with a target in some row
    if _takes_logits_to_keep(type(_core(model))):
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=cols).logits
    else:
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, cols]
    B, P, V = logits.shape
    sft = answer_ce_loss(logits.reshape(B * P, V), targets[:, cols].reshape(B * P))
    at = torch.searchsorted(cols, batch["answer_pos"])  # column of each row's answer position
    answer_logits = logits[torch.arange(B, device=logits.device), at].float()  # (B, V)
    letters = answer_logits.gather(1, batch["letter_ids"]).masked_fill(~batch["letter_mask"], float("-inf"))
    return AnswerOutput(sft_loss=sft, letter_logits=letters)


class CalibrationTrainer(Trainer):
    """Trainer whose loss is the answer SFT loss plus, when ``state.rcft_on``, lambda * L_ECE."""

    loss_is_scaled_for_ga = False  # compute_loss returns a per-batch mean; Trainer divides by grad_accum

    def __init__(self, *args, train_state: TrainState, rcft_loss: RcftLoss, **kwargs):
        super().__init__(*args, **kwargs)
        self.train_state = train_state
        self.rcft_loss = rcft_loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = answer_forward(model, inputs)
        loss = out.sft_loss
        st = self.train_state
        if st.rcft_on and st.targets is not None:
            ece = self.rcft_loss(out.letter_logits, st.targets_tensor(), inputs["letter_mask"])
            loss = loss + st.lam * ece
        return (loss, {"logits": out.letter_logits}) if return_outputs else loss
