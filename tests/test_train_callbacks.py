"""The E-step and auto-regime callbacks, driven by hand (no model, no Trainer loop)."""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

from llmcal.metrics import bin_statistics
from llmcal.train.callbacks import AutoRegimeCallback, CurveCallback, EStepCallback, epoch_index
from llmcal.train.estimate import SetStats
from llmcal.train.state import TrainState


class FakeProbe:
    """Returns preset statistics per set name and counts the calls."""

    def __init__(self, stats: dict):
        self.stats = stats
        self.calls = []

    def __call__(self, name, model, encoded, step):
        self.calls.append((name, step))
        return self.stats[name]


def _stats(conf, correct):
    return SetStats(bins=bin_statistics(conf, correct, 10), nll_sum=float(len(conf)),
                    correct=np.asarray(correct, dtype=float))


def _trainer_state(epoch, step, max_steps=100):
    return SimpleNamespace(epoch=epoch, global_step=step, max_steps=max_steps, is_world_process_zero=True)


def test_epoch_index_is_exact_at_boundaries_and_after_resume():
    assert epoch_index(_trainer_state(None, 0)) == 0
    assert epoch_index(_trainer_state(1.0, 4)) == 1
    assert epoch_index(_trainer_state(1.5, 6)) == 1


def test_estep_refreshes_once_per_epoch_and_not_after_a_mid_epoch_resume():
    probe = FakeProbe({"estep-heldout": _stats([0.95, 0.95, 0.55, 0.35], [1, 0, 1, 0])})
    ts = TrainState.initial("rcft", 1.0, 10)
    cb = EStepCallback(ts, probe, encoded=[], every_steps=None, prior_strength=0.0)  # raw bin accuracies
    cb.on_train_begin(None, _trainer_state(None, 0), None)
    cb.on_epoch_begin(None, _trainer_state(None, 0), None)  # same epoch: no second E-step
    assert len(probe.calls) == 1 and ts.targets_tag == "epoch:0"
    assert ts.targets[9] == 0.5 and ts.targets[5] == 1.0 and ts.targets[3] == 0.0 and ts.targets[0] is None
    assert math.isnan(ts.targets_tensor()[0]) and ts.targets_tensor()[9] == 0.5
    cb.on_epoch_begin(None, _trainer_state(1.0, 4), None)
    assert len(probe.calls) == 2 and ts.targets_tag == "epoch:1"
    # a resume in the middle of epoch 1 restores the state: no re-estimation with the later model
    restored = TrainState.from_dict(ts.to_dict())
    cb2 = EStepCallback(restored, probe, encoded=[], every_steps=None)
    cb2.on_train_begin(None, _trainer_state(1.5, 6), None)
    cb2.on_epoch_begin(None, _trainer_state(1.5, 6), None)
    assert len(probe.calls) == 2


def test_estep_shrinks_logs_counts_and_warns_when_questions_are_few(caplog):
    import logging

    conf, correct = [0.95, 0.95, 0.55, 0.35], [1, 0, 1, 0]
    probe = FakeProbe({"estep-heldout": _stats(conf, correct)})
    ts = TrainState.initial("rcft", 1.0, 10)
    cb = EStepCallback(ts, probe, encoded=[], prior_strength=4.0)
    with caplog.at_level(logging.INFO, logger="llmcal.train.callbacks"):
        cb.on_train_begin(None, _trainer_state(None, 0), None)
        cb.on_epoch_begin(None, _trainer_state(1.0, 4), None)
    gap = (2 - sum(conf)) / 4  # pooled accuracy minus pooled confidence
    assert ts.targets[9] == pytest.approx((1 + 4 * (0.95 + gap)) / (2 + 4))
    assert ts.targets[5] == pytest.approx((1 + 4 * (0.55 + gap)) / (1 + 4))
    assert ts.targets[0] is None
    rec = ts.estep_history[-1]
    assert rec["n_questions"] == 4 and rec["count"] == [0, 0, 0, 1, 0, 1, 0, 0, 0, 2]
    assert rec["raw_accuracy"][9] == 0.5 and rec["prior_strength"] == 4.0
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert any("4 heldout questions (per bin [0, 0, 0, 1, 0, 1, 0, 0, 0, 2])" in m for m in infos)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "4 heldout questions for 10 bins" in warnings[0]  # warned once, not per E-step


def test_estep_with_enough_questions_does_not_warn(caplog):
    import logging

    rng = np.random.default_rng(0)
    conf = rng.uniform(0.3, 1.0, 60)
    probe = FakeProbe({"estep-heldout": _stats(conf, (rng.random(60) < conf).astype(int))})
    cb = EStepCallback(TrainState.initial("rcft", 1.0, 10), probe, encoded=[])
    with caplog.at_level(logging.INFO, logger="llmcal.train.callbacks"):
        cb.on_train_begin(None, _trainer_state(None, 0), None)
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_estep_every_n_steps():
    probe = FakeProbe({"estep-heldout": _stats([0.95], [1])})
    ts = TrainState.initial("rcft", 1.0, 10)
    cb = EStepCallback(ts, probe, encoded=[], every_steps=3)
    cb.on_train_begin(None, _trainer_state(None, 0), None)
    for step in range(1, 8):
        cb.on_step_end(None, _trainer_state(step / 4, step), None)
    assert [s for _, s in probe.calls] == [0, 3, 6]
    assert ts.targets_tag == "step:6"


def test_cft_never_runs_an_estep():
    probe = FakeProbe({})
    ts = TrainState.initial("cft", 1.0, 10)
    cb = EStepCallback(ts, probe, encoded=[])
    cb.on_train_begin(None, _trainer_state(None, 0), None)
    cb.on_epoch_begin(None, _trainer_state(1.0, 4), None)
    assert probe.calls == [] and ts.targets is None


def test_auto_switches_rcft_on_when_the_model_leaves_the_calibratable_regime():
    n = 200
    base_t, base_h = _stats([0.9] * n, [1, 0] * (n // 2)), _stats([0.9] * n, [1, 0] * (n // 2))  # both 0.5
    held = _stats([0.9] * n, [1, 0] * (n // 2))  # held-out accuracy stays 0.5
    probe = FakeProbe({"train-probe": base_t, "heldout": base_h})
    ts = TrainState.initial("auto", 1.0, 10)
    auto = AutoRegimeCallback(ts, probe, train_probe=[], heldout=[], tolerance=0.1, n_bootstrap=500)
    estep = EStepCallback(ts, probe, encoded=[])
    auto.on_train_begin(None, _trainer_state(None, 0), None)  # the base model, before any step
    estep.on_train_begin(None, _trainer_state(None, 0), None)
    assert ts.targets is None and ts.regime_base["train"] == [1, 0] * (n // 2)  # auto starts as CFT
    # epoch 1: 4 of the wrong training answers right: added gap 0.02, interval well below 0.1
    probe.stats = {"train-probe": _stats([0.9] * n, [1, 0] * (n // 2 - 2) + [1, 1] * 2), "heldout": held}
    auto.on_epoch_end(None, _trainer_state(1.0, 4), None)
    assert not ts.rcft_on and ts.regime_checks[-1]["regime"] == "calibratable"
    # epoch 2: 16 more: added gap 0.10, the interval straddles the tolerance: keep CFT
    probe.stats["train-probe"] = _stats([0.9] * n, [1, 0] * (n // 2 - 20) + [1, 1] * 20)
    auto.on_epoch_end(None, _trainer_state(2.0, 8), None)
    c = ts.regime_checks[-1]
    assert not ts.rcft_on and c["regime"] == "undetermined" and c["interval"][0] < 0.1 < c["interval"][1]
    # epoch 3: all training questions right: added gap 0.5, clearly above
    probe.stats["train-probe"] = _stats([0.9] * n, [1] * n)
    auto.on_epoch_end(None, _trainer_state(3.0, 12), None)
    assert ts.rcft_on and ts.switched["step"] == 12 and ts.switched["added_gap"] == pytest.approx(0.5)
    assert ts.switched["interval"][0] > 0.1 and "use RCFT" in ts.switched["reason"]
    probe.stats["estep-heldout"] = held
    estep.on_epoch_begin(None, _trainer_state(3.0, 12), None)  # the next epoch starts with an E-step
    assert ts.targets is not None and ts.targets[9] == pytest.approx(0.5, abs=0.05)


def test_auto_judges_the_gap_training_added_not_the_sets_own():
    # the training questions are easier for the base model already (0.9 vs 0.5): that gap is not fine-tuning's
    n = 100
    probe = FakeProbe({"train-probe": _stats([0.9] * n, [1] * 90 + [0] * 10),
                       "heldout": _stats([0.9] * n, [1, 0] * (n // 2))})
    ts = TrainState.initial("auto", 1.0, 10)
    auto = AutoRegimeCallback(ts, probe, [], [], 0.05)
    auto.on_train_begin(None, _trainer_state(None, 0), None)
    auto.on_epoch_end(None, _trainer_state(1.0, 4), None)  # nothing changed
    c = ts.regime_checks[-1]
    assert c["gap"] == pytest.approx(0.4) and c["base_gap"] == pytest.approx(0.4) and c["added_gap"] == 0.0
    assert c["regime"] == "calibratable" and not ts.rcft_on
    restored = TrainState.from_dict(ts.to_dict())  # the base travels with the checkpointed state
    assert restored.regime_base == ts.regime_base
    calls = len(probe.calls)
    AutoRegimeCallback(restored, probe, [], [], 0.05).on_train_begin(None, _trainer_state(1.0, 4), None)
    assert len(probe.calls) == calls  # a resumed run does not re-measure the base with the trained model


def test_auto_does_not_switch_after_the_last_step():
    probe = FakeProbe({"train-probe": _stats([0.9] * 40, [1] * 40), "heldout": _stats([0.9] * 40, [0] * 40)})
    ts = TrainState.initial("auto", 1.0, 10)
    AutoRegimeCallback(ts, probe, [], [], 0.05).on_epoch_end(None, _trainer_state(3.0, 12, max_steps=12), None)
    assert not ts.rcft_on and ts.switched is None and ts.regime_checks[-1]["regime"] == "non-calibratable"


def test_official_estep_runs_once_on_its_set_with_raw_accuracies_and_counts():
    from llmcal.train.callbacks import OfficialEStepCallback

    probe = FakeProbe({"estep-train": _stats([0.95, 0.95, 0.55, 0.35], [1, 0, 1, 0])})
    ts = TrainState.initial("rcft", 1.0, 10)
    cb = OfficialEStepCallback(ts, probe, encoded=[])
    cb.on_train_begin(None, _trainer_state(None, 0), None)
    cb.on_epoch_begin(None, _trainer_state(None, 0), None)
    cb.on_epoch_begin(None, _trainer_state(1.0, 4), None)  # never refreshed
    assert probe.calls == [("estep-train", 0)] and ts.targets_tag == "once:0"
    assert ts.targets[9] == 0.5 and ts.targets[5] == 1.0 and ts.targets[3] == 0.0 and ts.targets[0] is None
    assert ts.counts == [0, 0, 0, 1, 0, 1, 0, 0, 0, 2] and ts.counts_tensor()[9] == 2.0
    cft = TrainState.initial("cft", 1.0, 10)
    OfficialEStepCallback(cft, probe, encoded=[]).on_train_begin(None, _trainer_state(None, 0), None)
    assert cft.targets is None and len(probe.calls) == 1


def test_curve_records_each_epoch_once():
    probe = FakeProbe({"heldout": _stats([0.9, 0.6], [1, 0])})
    ts = TrainState.initial("cft", 1.0, 10)
    cb = CurveCallback(ts, probe, heldout=["x"])
    cb.on_train_begin(None, _trainer_state(None, 0), None)
    cb.on_epoch_end(None, _trainer_state(1.0, 4), None)
    cb.on_epoch_end(None, _trainer_state(1.0, 4), None)
    assert [p["step"] for p in ts.curve] == [0, 4]
    assert ts.curve[1]["heldout_accuracy"] == 0.5
    assert np.isclose(ts.curve[1]["heldout_ece"], (abs(0.9 - 1) + abs(0.6 - 0)) / 2)


def test_loss_bar_shows_the_loss_in_the_bar_and_prints_nothing(capsys):
    from llmcal.train.callbacks import LossBarCallback

    class Bar:
        postfix = None

        def set_postfix(self, refresh=True, **kw):
            self.postfix = kw

        def write(self, text):  # what the stock ProgressCallback does with each log dict
            print(text)

    cb = LossBarCallback()
    cb.training_bar = Bar()
    state = _trainer_state(0.5, 3)
    cb.on_log(None, state, None, logs={"loss": 1.23456, "grad_norm": 2.0, "learning_rate": 1e-4})
    cb.on_log(None, state, None, logs={"train_runtime": 3.0})  # the end-of-training summary: no loss
    assert cb.training_bar.postfix == {"loss": "1.235"}
    assert capsys.readouterr().out == ""
