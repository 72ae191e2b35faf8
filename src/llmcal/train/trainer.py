"""``CalibrationTrainer``: transformers' Trainer with the CFT / RCFT loss and a faster CPU training step.

Logging, checkpointing, resume, mixed precision, gradient accumulation and
multi-process training all stay the base class's.  The loss is

    loss = answer SFT loss                                  (CFT)
         + lambda * L_ECE(K-letter logits; bin targets)     (when the RCFT term is on)

or, with ``--rcft-variant official``, (1 - alpha) * SFT + alpha * 1e-3 * R (``losses.OfficialRcftLoss``).

The bin targets live in a ``TrainState`` that the E-step callback refreshes.

The forward goes through the (possibly DDP-wrapped) model, so gradients are
synchronised as usual, and asks for vocabulary logits only at the positions
that have a target (``logits_to_keep`` with a tensor of positions): one (B x V)
projection per batch instead of (B x L x V).  The K-letter logits are read
from the same vocabulary logits at the answer position, so they equal the
scoring engine's ``option_logits`` for the same weights.

What makes the step fast (bench/RESULTS.md, "Training", measures each):

* packed batches (``collator``): the batch's questions end to end in one row,
  position ids restarting for each, no attention mask; transformers' mask
  builder keeps each question to itself.  No compute goes to padding.  Used
  when the model builds its mask that way (``packs_questions``), padded
  batches otherwise;
* no attention mask for padded batches either: they are right-padded, and in a causal decoder a real
  position never attends to a later one, so padding cannot reach a position
  with a target; without a mask, scaled-dot-product attention takes its causal
  path instead of building and applying a (B, 1, L, L) mask;
* length-bucketed batches, on request only (``--train-sampling-strategy
  group_by_length`` uses ``collator.LengthBucketSampler``): questions of
  similar length share a batch, so little of each batch is padding.  Not the
  default: on the demo (29 training questions, 8 steps) they moved the model's
  answers onto one letter (in-domain accuracy 0.54 -> 0.36) where random
  batches did not (0.58); similar lengths are correlated questions;
* bfloat16 LoRA compute on CPU: with the base model in bfloat16 and the LoRA
  weights in float32 (peft's default), peft casts every adapted layer's input
  to float32 and its output back, and its dropout runs in float32: copies of
  every activation, twice per layer, forward and backward.  The forward
  instead runs under CPU autocast (bfloat16) with peft's input cast off: the
  adapter matmuls run in bfloat16 on bfloat16 activations, the small adapter
  weights are cast instead of the large activations, and the weights, their
  gradients and the optimizer state stay float32 (bfloat16 mixed precision, as
  ``bf16=True`` does on a GPU).

Memory (bench/RESULTS.md, "Memory", ``bench/bench_memory.py``): in several CPU processes the base
weights stay the weights file's shared pages (``keep_frozen_weights_out_of_ddp`` and the CPU placement
below); at batch 2 the weights are three quarters of a step; the rest is mostly what autograd keeps
for the backward pass, 159 KB per token and decoder layer on Qwen2.5-1.5B.  ``--gradient_checkpointing
true`` (``checkpoint_layers``) keeps one hidden state per token and layer instead and computes each layer
again in the backward pass.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import itertools
import sys
from dataclasses import dataclass

import torch
from transformers import Trainer

from .collator import IGNORE, LengthBucketSampler
from .losses import OfficialRcftLoss, RcftLoss, answer_ce_loss
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


def _right_padded(mask: torch.Tensor) -> bool:
    """Every row is ones then zeros (the collator's layout): the mask changes nothing in a causal decoder."""
    return bool((mask[:, 1:] <= mask[:, :-1]).all())


def packs_questions(model) -> bool:
    """Whether packed batches keep this model's questions apart.

    True when the model builds its attention mask with transformers' ``create_causal_mask``, which,
    given position ids and no attention mask, finds where the ids restart and masks each packed
    sequence off from the others (and takes ``position_ids``, so the rotary positions restart too).
    A model with its own mask code would let a packed question attend to the ones before it.
    """
    core = _core(model)
    module = sys.modules.get(type(getattr(core, "model", core)).__module__)
    return (module is not None and hasattr(module, "create_causal_mask")
            and "position_ids" in inspect.signature(type(core).forward).parameters)


def answer_forward(model, batch: dict) -> AnswerOutput:
    """The training forward: SFT loss on the targets and the K-letter logits at the answer position.

    ``batch`` is a ``McqCollator`` batch, packed (``position_ids``, one row) or right-padded."""
    ids, targets, answer_pos = batch["input_ids"], batch["targets"], batch["answer_pos"]
    position_ids = batch.get("position_ids")
    mask = batch.get("attention_mask")
    if position_ids is not None or _right_padded(mask):
        mask = None  # see the module docstring: packed rows need none, padding comes after every real position
    kwargs = {} if position_ids is None else {"position_ids": position_ids}
    cols = torch.nonzero((targets != IGNORE).any(dim=0)).squeeze(1)  # positions with a target in some row
    if _takes_logits_to_keep(type(_core(model))):
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=cols, **kwargs).logits
    else:
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False, **kwargs).logits[:, cols]
    B, P, V = logits.shape
    sft = answer_ce_loss(logits.reshape(B * P, V), targets[:, cols].reshape(B * P))
    at = torch.searchsorted(cols, answer_pos)  # column of each question's answer position
    # the row of each question: all in row 0 when packed, one row each when padded
    rows = torch.zeros_like(answer_pos) if position_ids is not None else torch.arange(B, device=logits.device)
    answer_logits = logits[rows, at].float()  # (questions, V)
    letters = answer_logits.gather(1, batch["letter_ids"]).masked_fill(~batch["letter_mask"], float("-inf"))
    return AnswerOutput(sft_loss=sft, letter_logits=letters)


def _cpu_bf16_mixed(model) -> bool:
    """A CPU model whose base runs in bfloat16 while its trainable (LoRA) weights are float32."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    frozen = next((p for p in model.parameters() if not p.requires_grad), None)
    return (frozen is not None and frozen.device.type == "cpu" and frozen.dtype == torch.bfloat16
            and any(p.dtype == torch.float32 for p in trainable))


def training_precision(model, *, recompute: bool = False, mixed: bool | None = None):
    """The context the training forward runs in: bfloat16 autocast without peft's input casts on a CPU
    bfloat16 base with float32 adapters (module docstring), else nothing.

    ``recompute``: the same for a checkpointed layer's recomputation in the backward pass, which
    ``torch.utils.checkpoint`` starts inside the forward's autocast state (``checkpoint_layers``);
    ``mixed``: ``_cpu_bf16_mixed(model)`` when the caller already knows it."""
    # The cheap test first: _cpu_bf16_mixed walks every parameter.
    if (torch.is_autocast_enabled("cpu") and not recompute) or not (
            _cpu_bf16_mixed(model) if mixed is None else mixed):
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(torch.autocast("cpu", dtype=torch.bfloat16))
    try:
        from peft.helpers import disable_input_dtype_casting
    except ImportError:  # an older peft: its casts stay (slower, same arithmetic class)
        return stack
    stack.enter_context(disable_input_dtype_casting(model))
    return stack


def checkpoint_layers(model, every_n_layers: int = 1) -> None:
    """Activation checkpointing of the decoder layers (transformers' own), for llmcal's training forward.

    A checkpointed layer keeps only its input for the backward pass and computes its forward again
    there, under the RNG state of the first time (the same dropout masks) and in the same precision:
    the recomputation runs in ``training_precision(model, recompute=True)``, without which peft would
    cast the adapters' inputs to float32 in the recomputation only and the two passes would differ.
    Non-reentrant ``torch.utils.checkpoint``; ``every_n_layers`` layers share one checkpoint.
    The losses and gradients are those without it (``tests/test_train_memory.py``); the memory they save and
    the time they cost are in bench/RESULTS.md, "Memory"."""
    core = _core(model)

    mixed: list[bool] = []  # whether the model is a CPU bf16 base with float32 adapters, found once

    @contextlib.contextmanager
    def recompute():  # entered when the backward pass recomputes, not when the forward builds it
        # Decided at the first recomputation (after the Trainer has placed the model), not per layer and
        # step: the parameters' devices and dtypes do not change while training runs.
        if not mixed:
            mixed.append(_cpu_bf16_mixed(model))
        if not mixed[0]:
            yield
            return
        with training_precision(model, recompute=True, mixed=True):
            yield

    def contexts():
        return contextlib.nullcontext(), recompute()

    kwargs = {"use_reentrant": False, "context_fn": contexts}
    if hasattr(core, "activation_checkpointing_enable"):
        core.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs, every_n_layers=every_n_layers)
    else:  # transformers before the rename
        core.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def keep_frozen_weights_out_of_ddp(model) -> list[str]:
    """Tell DDP not to broadcast the frozen parameters (the base weights) when it wraps ``model``; their names.

    DDP makes the ranks agree by broadcasting every parameter and buffer from rank 0 when it wraps a
    model, and every rank, rank 0 included, copies the result back into its own tensors.  The base
    weights are memory-mapped from the weights file, copy-on-write (``load_model``), so that copy
    turned each of their pages into a private one: each process held the whole model in anonymous
    memory instead of sharing the file's pages in the page cache (bench/RESULTS.md, "Memory").
    Frozen weights need no broadcast: every rank reads them from the same file and no step changes
    them.  The LoRA weights, which each rank initialises from the same seed, are still broadcast, and
    their gradients averaged, as before (``tests/test_train_memory.py``).
    """
    from torch.nn.parallel import DistributedDataParallel

    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    if frozen:
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen)
    return frozen


def _on_cpu(model) -> bool:
    return all(t.device.type == "cpu" for t in itertools.chain(model.parameters(), model.buffers()))


def _checkpointing_requested(args) -> bool:
    return bool(getattr(args, "activation_checkpointing", None) or getattr(args, "gradient_checkpointing", None))


class CalibrationTrainer(Trainer):
    """Trainer whose loss is the answer SFT loss plus, when ``state.rcft_on``, the RCFT term (``rcft_loss.total``)."""

    loss_is_scaled_for_ga = False  # compute_loss returns a per-batch mean; Trainer divides by grad_accum

    def __init__(self, *args, train_state: TrainState, rcft_loss: RcftLoss | OfficialRcftLoss, **kwargs):
        super().__init__(*args, **kwargs)
        # The same for a transformers whose Trainer does not read ``loss_is_scaled_for_ga``: there the Trainer divides by
        # grad_accum unless the model takes loss kwargs (num_items_in_batch), which our compute_loss never passes.
        self.model_accepts_loss_kwargs = False
        self.train_state = train_state
        self.rcft_loss = rcft_loss
        keep_frozen_weights_out_of_ddp(self.model)  # read when train() wraps the model in DDP, if it does
        if _checkpointing_requested(self.args):
            # --gradient_checkpointing (TrainingArguments): llmcal's checkpointing, whose recomputation runs in the
            # training precision; the Trainer's own would recompute with peft's float32 casts on a CPU bf16 model.
            kw = dict(getattr(self.args, "activation_checkpointing_kwargs", None)
                      or getattr(self.args, "gradient_checkpointing_kwargs", None) or {})
            checkpoint_layers(self.model, int(kw.get("every_n_layers", 1)))
            for name in ("activation_checkpointing", "gradient_checkpointing"):
                if hasattr(self.args, name):
                    setattr(self.args, name, False)  # on already: the Trainer must not enable its own over it

    # Under a CPU process group the device that transformers and accelerate place the model on is ``cpu:0``,
    # and torch's ``.to("cpu:0")`` copies every CPU tensor (whose device then reads ``cpu``, so the next such
    # ``.to`` copies again): the Trainer's placement and accelerate's ``prepare`` at every ``train()`` each
    # gave every process a private copy of the whole base model in its heap, instead of the weights file's
    # shared, memory-mapped pages (bench/RESULTS.md, "Memory"; tests/test_train_memory.py).  On a CPU the
    # model is already where it should be, so neither places it.

    def _move_model_to_device(self, model, device):
        if torch.device(device).type == "cpu" and _on_cpu(model):
            return
        super()._move_model_to_device(model, device)

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        if self.accelerator.device.type == "cpu" and self.model is not None and _on_cpu(self.model):
            # prepare() places no model (nor optimizer state, nor batches: _prepare_inputs moves those)
            self.accelerator.device_placement = False

    def _get_train_sampler(self, train_dataset=None):
        """``group_by_length``: llmcal's length-bucketed batches (module docstring); anything else as the Trainer."""
        ds = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.train_sampling_strategy != "group_by_length" or ds is None or not hasattr(ds, "examples"):
            return super()._get_train_sampler(train_dataset)
        # one batch per process and step; under several processes accelerate deals consecutive batches out
        return LengthBucketSampler([len(e["input_ids"]) for e in ds.examples], self.args.train_batch_size)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        with training_precision(model):
            out = answer_forward(model, inputs)
        loss = out.sft_loss
        st = self.train_state
        if st.rcft_on and st.targets is not None:
            # RcftLoss: SFT + lambda * L_ECE; OfficialRcftLoss: (1 - alpha) * SFT + alpha * 1e-3 * R
            loss = self.rcft_loss.total(loss, out.letter_logits, st, inputs["letter_mask"])
        return (loss, {"logits": out.letter_logits}) if return_outputs else loss
