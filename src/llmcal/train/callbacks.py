"""The EM loop and the bookkeeping around training, as Trainer callbacks.

* ``EStepCallback``: the E-step.  Estimates the per-bin accuracies a_b with
  the current model on the estimation set (``estimate_bin_accuracy``: each
  bin's accuracy shrunk toward a prior, docs/estep.md) and stores them in the
  TrainState the loss reads: when the RCFT term is on and there are no targets
  yet, then at the start of every epoch (or every N optimizer steps).  Each
  E-step logs how many questions it used, and warns when they are too few for
  the number of bins.
* ``AutoRegimeCallback`` (``--method auto``): at each epoch end, compares
  train and held-out accuracy; once ``left_calibratable`` says the model has
  left the calibratable regime, the RCFT term is on from then on.  Every check
  and the switch (when and why) are recorded.
* ``CurveCallback``: held-out accuracy, ECE and NLL before training and after
  each epoch (the training curve; the loss comes from Trainer's log history).
* ``LossBarCallback``: transformers' step bar, with the latest loss in the bar
  instead of a printed dict per logged step.
* ``StateCheckpointCallback``: writes the TrainState next to each checkpoint
  (and again at an epoch end that falls on a checkpoint), so ``--resume``
  restores it.

Epoch-wise refreshes are tagged with the epoch index, so resuming in the
middle of an epoch keeps the targets estimated at its start instead of
re-estimating them with a later model.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Sequence

from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

from ..prompts import EncodedQuestion
from ..regime import diagnose, left_calibratable
from .estimate import DEFAULT_PRIOR_STRENGTH, MIN_QUESTIONS_PER_BIN, Probe, estimate_bin_accuracy, too_few
from .state import TrainState

log = logging.getLogger(__name__)


class LossBarCallback(ProgressCallback):
    """The Trainer's step bar showing the latest loss, instead of printing every log dict.

    llmcal logs every step (the training curve reads the loss history), and the
    stock ProgressCallback writes each of those dicts as a line of its own.
    """

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and logs and "loss" in logs:
            self.training_bar.set_postfix(loss=f"{float(logs['loss']):.4g}", refresh=False)


def epoch_index(state) -> int:
    """The epoch the Trainer is in (0-based); exact at epoch boundaries and after a resume."""
    return int(math.floor((state.epoch or 0.0) + 1e-9))


class EStepCallback(TrainerCallback):
    def __init__(self, train_state: TrainState, probe: Probe, encoded: Sequence[EncodedQuestion],
                 every_steps: int | None = None, set_name: str = "heldout",
                 prior_strength: float = DEFAULT_PRIOR_STRENGTH):
        self.ts = train_state
        self.probe = probe
        self.encoded = encoded
        self.every_steps = every_steps  # None: every epoch
        self.set_name = set_name
        self.prior_strength = float(prior_strength)
        self._warned = False

    def _refresh(self, state, model, tag: str) -> None:
        stats = self.probe(f"estep-{self.set_name}", model, self.encoded, state.global_step)
        est = estimate_bin_accuracy(stats.bins, self.prior_strength)
        self.ts.set_targets(est.accuracy, tag, {
            "step": state.global_step, "epoch": state.epoch or 0.0, "set": self.set_name,
            **est.to_dict(), **stats.summary()})
        n_bins = len(est.count)
        log.info("E-step at step %d (%s): %d %s questions (per bin %s); bin accuracies %s", state.global_step, tag,
                 est.n, self.set_name, est.count, _rounded(self.ts.targets))
        if too_few(est.n, n_bins) and not self._warned:
            self._warned = True  # the set does not change during a run: once is enough
            log.warning(
                "RCFT E-step: %d %s questions for %d bins (fewer than %d per bin); the bin accuracies lean on the "
                "prior (strength %g questions per bin, docs/estep.md). Use more training data, a larger "
                "--heldout-fraction or fewer --n-bins.", est.n, self.set_name, n_bins, MIN_QUESTIONS_PER_BIN,
                self.prior_strength)

    def _tag(self, state) -> str:
        return f"step:{state.global_step}" if self.every_steps else f"epoch:{epoch_index(state)}"

    def on_train_begin(self, args, state, control, model=None, **kw):
        if self.ts.rcft_on and self.ts.targets is None:
            self._refresh(state, model, self._tag(state))

    def on_epoch_begin(self, args, state, control, model=None, **kw):
        if not self.ts.rcft_on:
            return
        if self.ts.targets is None or (self.every_steps is None and self.ts.targets_tag != self._tag(state)):
            self._refresh(state, model, self._tag(state))

    def on_step_end(self, args, state, control, model=None, **kw):
        if self.ts.rcft_on and self.every_steps and state.global_step % self.every_steps == 0:
            if state.global_step < state.max_steps:
                self._refresh(state, model, self._tag(state))


def _rounded(values) -> list:
    return [None if v is None else round(v, 3) for v in values or []]


class AutoRegimeCallback(TrainerCallback):
    def __init__(self, train_state: TrainState, probe: Probe, train_probe: Sequence[EncodedQuestion],
                 heldout: Sequence[EncodedQuestion], tolerance: float):
        self.ts = train_state
        self.probe = probe
        self.train_probe = train_probe
        self.heldout = heldout
        self.tolerance = tolerance

    def on_epoch_end(self, args, state, control, model=None, **kw):
        if self.ts.rcft_on:
            return
        tr = self.probe("train-probe", model, self.train_probe, state.global_step)
        ho = self.probe("heldout", model, self.heldout, state.global_step)
        d = diagnose(tr.accuracy, ho.accuracy, heldout_ece=ho.ece, heldout_mean_conf=ho.mean_conf,
                     tolerance=self.tolerance)
        check = {"epoch": state.epoch, "step": state.global_step, **d.to_dict()}
        self.ts.regime_checks.append(check)
        if left_calibratable(tr.accuracy, ho.accuracy, self.tolerance):
            if state.global_step >= state.max_steps:
                log.info("auto: the model left the calibratable regime at the end of training (%s)", d.reason)
                return
            self.ts.rcft_on = True
            self.ts.targets = None  # the E-step runs before the next batch
            self.ts.switched = {"epoch": state.epoch, "step": state.global_step, "reason": d.reason,
                                "train_accuracy": tr.accuracy, "heldout_accuracy": ho.accuracy, "gap": d.gap,
                                "tolerance": self.tolerance}
            log.info("auto: RCFT term on from step %d: %s", state.global_step, d.reason)


class CurveCallback(TrainerCallback):
    def __init__(self, train_state: TrainState, probe: Probe, heldout: Sequence[EncodedQuestion]):
        self.ts = train_state
        self.probe = probe
        self.heldout = heldout

    def _point(self, state, model) -> None:
        if not self.heldout:
            return
        if self.ts.curve and self.ts.curve[-1]["step"] == state.global_step:
            return
        s = self.probe("heldout", model, self.heldout, state.global_step)
        self.ts.curve.append({"epoch": state.epoch or 0.0, "step": state.global_step, "rcft_on": self.ts.rcft_on,
                              **{f"heldout_{k}": v for k, v in s.summary().items()}})

    def on_train_begin(self, args, state, control, model=None, **kw):
        if not self.ts.curve:
            self._point(state, model)

    def on_epoch_end(self, args, state, control, model=None, **kw):
        self._point(state, model)


class StateCheckpointCallback(TrainerCallback):
    def __init__(self, train_state: TrainState):
        self.ts = train_state

    def _write(self, args, state) -> None:
        if not state.is_world_process_zero:
            return
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if ckpt.is_dir():
            self.ts.save(ckpt)

    def on_save(self, args, state, control, **kw):
        self._write(args, state)

    def on_epoch_end(self, args, state, control, **kw):
        self._write(args, state)
