"""The EM loop and the bookkeeping around training, as Trainer callbacks.

* ``EStepCallback``: the E-step.  Estimates the per-bin accuracies a_b with
  the current model on the estimation set (``estimate_bin_accuracy``: each
  bin's accuracy shrunk toward a prior, docs/estep.md) and stores them in the
  TrainState the loss reads: when the RCFT term is on and there are no targets
  yet, then at the start of every epoch (or every N optimizer steps).  Each
  E-step logs how many questions it used, and warns when they are too few for
  the number of bins.
* ``OfficialEStepCallback`` (``--rcft-variant official``): the authors' E-step,
  once, on the whole training set, before the RCFT term first applies: raw bin
  accuracies and question counts, never refreshed.
* ``SquaredEpochsCallback`` (``--squared-epochs``): the authors' epoch loop in
  one Trainer run: the learning-rate schedule restarts, and the optimizer state
  is dropped, every ``--epochs`` epochs.
* ``AutoRegimeCallback`` (``--method auto``): at each epoch end, the regime
  diagnosis (the train minus held-out gap training added over the base model's,
  with its bootstrap interval); once ``left_calibratable`` says the model has
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

from ..errors import LlmcalError
from ..prompts import EncodedQuestion
from ..regime import diagnose_correct, left_calibratable
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


class OfficialEStepCallback(TrainerCallback):
    """The official code's E-step (``accuracy_all_sample`` in its trainer.py): one pass over the training set.

    Bin accuracies are the raw per-bin accuracies (no prior) and the counts N_k are kept for the loss's
    1 / N_k; a bin without questions has no estimate.  It runs when the RCFT term is on and has no
    estimates yet: before the first batch for ``--method rcft``, at the switch for ``--method auto``;
    the estimates travel with the checkpointed state, so a resumed run does not re-estimate them.
    """

    def __init__(self, train_state: TrainState, probe: Probe, encoded: Sequence[EncodedQuestion]):
        self.ts = train_state
        self.probe = probe
        self.encoded = encoded

    def _estimate(self, state, model) -> None:
        if not self.ts.rcft_on or self.ts.targets is not None:
            return
        stats = self.probe("estep-train", model, self.encoded, state.global_step)
        count = [int(round(c)) for c in stats.bins.count]
        acc = [float(s / c) if c else None for s, c in zip(stats.bins.sum_correct, count)]
        self.ts.set_targets(acc, f"once:{state.global_step}", {
            "step": state.global_step, "epoch": state.epoch or 0.0, "set": "train", "variant": "official",
            "n_questions": stats.n, "count": count, "raw_accuracy": acc, **stats.summary()}, counts=count)
        log.info("official E-step at step %d: %d training questions (per bin %s); bin accuracies %s",
                 state.global_step, stats.n, count, _rounded(self.ts.targets))

    def on_train_begin(self, args, state, control, model=None, **kw):
        self._estimate(state, model)

    def on_epoch_begin(self, args, state, control, model=None, **kw):
        self._estimate(state, model)


class SquaredEpochsCallback(TrainerCallback):
    """``--squared-epochs``: ``rounds`` restarts of a ``max_steps / rounds``-step schedule in one Trainer run.

    The authors' ``train()`` calls the base ``train()`` once per epoch, and each call builds a new
    optimizer and schedule and trains every epoch: with E epochs the data is seen E * E times, the
    schedule (cosine with warm-up) restarting E times and AdamW's moments starting from zero each
    time.  Here the Trainer runs E * E epochs (``training_args``); at the start the schedule's
    lambdas are replaced by the same schedule built for one round, taken modulo the round, and at
    the first step of every later round the optimizer state is cleared.  Global steps, checkpoints
    and ``--resume`` stay the Trainer's (a resume inside a round keeps the optimizer state it saved).
    """

    def __init__(self, rounds: int):
        self.rounds = int(rounds)
        self._cleared_at: int | None = None

    def _round_steps(self, state) -> int:
        if state.max_steps % self.rounds:
            raise LlmcalError(f"--squared-epochs: {state.max_steps} steps do not split into {self.rounds} rounds")
        return state.max_steps // self.rounds

    def on_train_begin(self, args, state, control, lr_scheduler=None, **kw):
        import torch
        from transformers import get_scheduler

        sched = getattr(lr_scheduler, "scheduler", lr_scheduler)  # accelerate may wrap it
        if not hasattr(sched, "lr_lambdas"):
            raise LlmcalError(f"--squared-epochs needs a step-wise learning-rate schedule (lr_scheduler_type "
                              f"{args.lr_scheduler_type!r} is not one)")
        n = self._round_steps(state)
        probe = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)  # only to build the lambda
        one = get_scheduler(args.lr_scheduler_type, probe, num_warmup_steps=args.get_warmup_steps(n),
                            num_training_steps=n, scheduler_specific_kwargs=args.lr_scheduler_kwargs).lr_lambdas[0]
        sched.lr_lambdas = [lambda step, f=one: f(step % n) for _ in sched.lr_lambdas]
        log.info("--squared-epochs: %d rounds of %d steps, the schedule restarting each round", self.rounds, n)

    def on_step_begin(self, args, state, control, optimizer=None, **kw):
        n = self._round_steps(state)
        step = state.global_step
        if step and step % n == 0 and self._cleared_at != step and optimizer is not None:
            getattr(optimizer, "optimizer", optimizer).state.clear()  # AdamW starts its moments afresh
            self._cleared_at = step
            log.info("--squared-epochs: round %d of %d starts at step %d", step // n + 1, self.rounds, step)


def _rounded(values) -> list:
    return [None if v is None else round(v, 3) for v in values or []]


class AutoRegimeCallback(TrainerCallback):
    """``--method auto``: the regime diagnosis after every epoch; the RCFT term on once it says non-calibratable.

    Before the first batch it scores the training probe and the held-out slice with the model as
    it is (the base), so every check judges the gap training added, with its paired bootstrap
    interval (``regime.diagnose_correct``); an undetermined check keeps CFT and is repeated at the
    next epoch.  The base model's per-question correctness is kept in the TrainState (a resumed run
    compares with the same base).
    """

    def __init__(self, train_state: TrainState, probe: Probe, train_probe: Sequence[EncodedQuestion],
                 heldout: Sequence[EncodedQuestion], tolerance: float, *, n_bootstrap: int = 1000, seed: int = 0):
        self.ts = train_state
        self.probe = probe
        self.train_probe = train_probe
        self.heldout = heldout
        self.tolerance = tolerance
        self.n_bootstrap = int(n_bootstrap)
        self.seed = int(seed)

    def on_train_begin(self, args, state, control, model=None, **kw):
        if self.ts.rcft_on or self.ts.regime_base is not None or state.global_step > 0:
            return  # a resume keeps the base it saved (a state from before the base was kept: no base)
        tr = self.probe("train-probe", model, self.train_probe, state.global_step)
        ho = self.probe("heldout", model, self.heldout, state.global_step)
        self.ts.regime_base = {"train": _as_list(tr.correct), "heldout": _as_list(ho.correct)}

    def on_epoch_end(self, args, state, control, model=None, **kw):
        if self.ts.rcft_on:
            return
        tr = self.probe("train-probe", model, self.train_probe, state.global_step)
        ho = self.probe("heldout", model, self.heldout, state.global_step)
        base = self.ts.regime_base or {}
        d = diagnose_correct(tr.correct, ho.correct, base_train_correct=base.get("train"),
                             base_heldout_correct=base.get("heldout"), tolerance=self.tolerance,
                             n_resamples=self.n_bootstrap, seed=self.seed, heldout_ece=ho.ece,
                             heldout_mean_conf=ho.mean_conf)
        check = {"epoch": state.epoch, "step": state.global_step, **d.to_dict()}
        self.ts.regime_checks.append(check)
        if left_calibratable(d):
            if state.global_step >= state.max_steps:
                log.info("auto: the model left the calibratable regime at the end of training (%s)", d.reason)
                return
            self.ts.rcft_on = True
            self.ts.targets = None  # the E-step runs before the next batch
            self.ts.switched = {"epoch": state.epoch, "step": state.global_step, "reason": d.reason,
                                "train_accuracy": tr.accuracy, "heldout_accuracy": ho.accuracy, "gap": d.gap,
                                "added_gap": d.added_gap, "interval": d.interval, "tolerance": self.tolerance}
            log.info("auto: RCFT term on from step %d: %s", state.global_step, d.reason)
        else:
            log.info("auto: %s after epoch %.2f: %s", d.regime, state.epoch or 0.0, d.reason)


def _as_list(correct) -> list[int] | None:
    return None if correct is None else [int(round(c)) for c in correct]


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
