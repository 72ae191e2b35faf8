"""Regime diagnosis: the classification on hand cases, and ``llmcal regime`` end to end on a tiny model."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from llmcal.data import load_dataset
from llmcal.errors import LlmcalError
from llmcal.predictions import Prediction
from llmcal.regime import (CALIBRATABLE, DEFAULT_TOLERANCE, NON_CALIBRATABLE, UNDETERMINED, Diagnosis, RegimeConfig,
                           diagnose, diagnose_correct, diagnose_predictions, format_diagnosis, left_calibratable,
                           run_regime, settle_sizes)
from llmcal.runs import load_run

TASK = "synthetic:arithmetic?n=40&k=4"


# ---- the classification ------------------------------------------------------------
@pytest.mark.parametrize("train, held, tol, regime, rec, bound", [
    (0.70, 0.66, 0.05, CALIBRATABLE, "cft", 0.04),
    (0.50, 0.25, 0.25, CALIBRATABLE, "cft", 0.25),  # gap == tolerance: still calibratable
    (0.40, 0.60, 0.05, CALIBRATABLE, "cft", 0.0),  # negative gap: bound is 0
    (0.90, 0.60, 0.05, NON_CALIBRATABLE, "rcft", 0.30),
    (1.00, 0.25, 0.10, NON_CALIBRATABLE, "rcft", 0.75),
])
def test_diagnose_hand_cases(train, held, tol, regime, rec, bound):
    d = diagnose(train, held, heldout_ece=0.1, heldout_mean_conf=0.8, tolerance=tol)
    assert d.regime == regime and d.recommended == rec
    assert d.gap == pytest.approx(train - held)
    assert d.ece_lower_bound == pytest.approx(bound)
    assert d.ece_lower_bound == max(d.gap, 0.0)
    assert (d.train_accuracy, d.heldout_accuracy, d.tolerance) == (train, held, tol)
    assert (d.heldout_ece, d.heldout_mean_conf) == (0.1, 0.8)
    assert left_calibratable(d) == (regime == NON_CALIBRATABLE)
    assert f"{d.gap:.4f}" in d.reason
    assert d.added_gap == d.gap and d.base_gap is None and d.interval is None  # no base, no interval: the point


def test_diagnose_default_tolerance_and_roundtrip():
    d = diagnose(0.80, 0.70)
    assert d.tolerance == DEFAULT_TOLERANCE == 0.05 and d.regime == NON_CALIBRATABLE
    assert Diagnosis.from_dict(json.loads(json.dumps(d.to_dict()))) == d


def _pred(qid, logits, answer):
    return Prediction.from_logits(qid, None, answer, logits)


def test_diagnose_predictions_computes_the_numbers():
    # train: 4/4 right; held-out: conf 0.8 (logits ln4, 0) on 4 questions, 2 right -> acc 0.5, ECE 0.3
    import math

    z = [math.log(4.0), 0.0]
    train = [_pred(f"t{i}", z, 0) for i in range(4)]
    held = [_pred("h0", z, 0), _pred("h1", z, 0), _pred("h2", z, 1), _pred("h3", z, 1)]
    d = diagnose_predictions(train, held, tolerance=0.05)
    assert d.train_accuracy == 1.0 and d.heldout_accuracy == 0.5
    assert d.heldout_mean_conf == pytest.approx(0.8)
    assert d.heldout_ece == pytest.approx(0.3)
    # a gap of 0.5 on 4 + 4 questions: a held-out resample of 4 right ones is not rare, so no verdict
    assert d.gap == pytest.approx(0.5) and d.regime == UNDETERMINED and d.recommended == "auto"
    assert d.interval[0] <= 0.05 < 0.5 < d.interval[1] and d.settle["n_heldout"] > 4
    # the base model, matched by id (given in another order): it had the same gap, fine-tuning added none
    d0 = diagnose_predictions(train, held, base_train=train[::-1], base_heldout=held[::-1], tolerance=0.05)
    assert d0.base_gap == pytest.approx(0.5) and d0.added_gap == 0.0 and d0.interval == [0.0, 0.0]
    assert d0.regime == CALIBRATABLE
    with pytest.raises(LlmcalError, match="not on the same questions"):
        diagnose_predictions(train, held, base_train=train[:3], base_heldout=held)
    with pytest.raises(LlmcalError, match="held-out"):
        diagnose_predictions(train, [])


def test_format_diagnosis_lines():
    text = format_diagnosis(diagnose(0.9, 0.6, heldout_ece=0.2, heldout_mean_conf=0.85))
    for s in ("0.9000", "0.6000", "0.2000", "0.8500", "+0.3000", "0.3000", "non-calibratable", "--method rcft"):
        assert s in text
    assert len(text.splitlines()) == 7
    assert "conf-ECE" not in format_diagnosis(diagnose(0.6, 0.6))
    text = format_diagnosis(diagnose(0.6, 0.5, base_train_accuracy=0.52, base_heldout_accuracy=0.49,
                                     interval=(-0.02, 0.15), n_train=100, n_heldout=80))
    for s in ("base model's gap   +0.0300", "added gap          +0.0700  95% interval [-0.0200, +0.1500]",
              "undetermined", "would settle it", "--method auto", "on 100 + 80 questions"):
        assert s in text, s


# ---- the noise: the added gap, its interval, three verdicts -----------------------------------
def test_an_interval_straddling_the_tolerance_is_undetermined_with_the_sizes_that_settle_it():
    # the case: gap 0.066 on 252 + 200 questions, standard error ~0.047
    d = diagnose(0.541, 0.475, interval=(-0.026, 0.158), n_train=252, n_heldout=200, tolerance=0.05)
    assert d.regime == UNDETERMINED and d.recommended == "auto" and not left_calibratable(d)
    # the interval's lower side (0.066 - (-0.026) = 0.092) must shrink to 0.016: f = (0.092 / 0.016)^2
    f = (0.092 / 0.016) ** 2
    assert d.settle["factor"] == pytest.approx(f)
    assert (d.settle["n_train"], d.settle["n_heldout"]) == (math.ceil(252 * f), math.ceil(200 * f))
    assert "straddles the tolerance" in d.reason and str(d.settle["n_heldout"]) in d.reason
    assert diagnose(0.6, 0.5, interval=(0.06, 0.14), tolerance=0.05).regime == NON_CALIBRATABLE
    assert diagnose(0.6, 0.5, interval=(-0.03, 0.05), tolerance=0.05).regime == CALIBRATABLE  # hi == tol: in
    assert settle_sizes(0.05, (0.0, 0.1), 0.05, 10, 10) is None  # an estimate on the tolerance: no size settles it


def test_diagnose_correct_on_hand_made_questions():
    rng = np.random.default_rng(1)
    # 40 + 40 questions; the base model already 0.10 better on the training questions than held out
    base_t = (rng.random(40) < 0.55).astype(int)
    base_h = (rng.random(40) < 0.45).astype(int)
    tuned_t = base_t.copy()
    tuned_t[np.flatnonzero(tuned_t == 0)[:4]] = 1  # fine-tuning fixed 4 training questions: +0.10
    d = diagnose_correct(tuned_t, base_h, base_train_correct=base_t, base_heldout_correct=base_h, tolerance=0.05,
                         n_resamples=2000, seed=3)
    assert d.train_accuracy == pytest.approx(tuned_t.mean()) and d.heldout_accuracy == pytest.approx(base_h.mean())
    assert d.base_gap == pytest.approx(base_t.mean() - base_h.mean())
    assert d.added_gap == pytest.approx(0.10)  # the gap fine-tuning added, not the raw gap
    assert d.gap == pytest.approx(d.added_gap + d.base_gap) and (d.n_train, d.n_heldout) == (40, 40)
    lo, hi = d.interval
    # paired: the held-out side is unchanged (zero differences), the training side is 4 of 40 flipped to 1,
    # so every resample's added gap is (number of the 4 drawn) / 40 >= 0
    assert 0.0 <= lo < 0.10 < hi <= 0.25
    assert d.regime == UNDETERMINED and d.settle["n_train"] > 40
    # unpaired (no base) the same questions give a far wider interval, around the raw gap
    raw = diagnose_correct(tuned_t, base_h, tolerance=0.05, n_resamples=2000, seed=3)
    assert raw.added_gap == pytest.approx(raw.gap) and raw.interval[1] - raw.interval[0] > 2 * (hi - lo)
    # resampling follows metrics.bootstrap: same seed and N, the same draws
    from llmcal.metrics import accuracy
    from llmcal.metrics.bootstrap import bootstrap_values
    from llmcal.regime import _resampled_means

    probs = np.stack([tuned_t, 1 - tuned_t], axis=1).astype(float)  # argmax 0 exactly when correct
    assert np.allclose(_resampled_means(tuned_t.astype(float), 50, 7),
                       bootstrap_values(accuracy, probs, np.zeros(40, dtype=int), 50, 7))
    with pytest.raises(LlmcalError, match="same questions"):
        diagnose_correct(tuned_t, base_h, base_train_correct=base_t[:30], base_heldout_correct=base_h)
    with pytest.raises(LlmcalError, match="both sets or on neither"):
        diagnose_correct(tuned_t, base_h, base_train_correct=base_t)


def test_many_questions_settle_what_few_cannot():
    rng = np.random.default_rng(0)

    def case(n):
        t = (rng.random(n) < 0.60).astype(int)
        h = (rng.random(n) < 0.50).astype(int)  # true gap 0.10 against tolerance 0.05
        return diagnose_correct(t, h, tolerance=0.05, n_resamples=1000, seed=0)

    few, many = case(60), case(6000)
    assert few.regime == UNDETERMINED and few.settle["n_train"] > 60
    assert many.regime == NON_CALIBRATABLE and many.settle is None


def test_old_diagnosis_files_still_load():
    old = {k: v for k, v in diagnose(0.8, 0.7).to_dict().items()
           if k not in ("base_train_accuracy", "base_heldout_accuracy", "base_gap", "added_gap", "interval",
                        "level", "n_train", "n_heldout", "settle")}
    d = Diagnosis.from_dict(old)
    assert d.regime == NON_CALIBRATABLE and d.interval is None and "gap judged" in format_diagnosis(d)


# ---- the run ---------------------------------------------------------------------
def _cfg(model_dir, **kw):
    return RegimeConfig(model=str(model_dir), train=TASK, n_bootstrap=20, batch_tokens=4096, **kw)


def test_run_regime_writes_the_run(tiny_model_dir, tmp_path):
    out = tmp_path / "regime"
    rec, d = run_regime(_cfg(tiny_model_dir, heldout_fraction=0.3), out, progress=False)
    for name in ("config.json", "metrics.json", "predictions-train.jsonl", "predictions-heldout.jsonl",
                 "reliability-train.png", "reliability-heldout.png", "diagnosis.json", "report.md"):
        assert (out / name).is_file(), name
    assert not (out / "INCOMPLETE").exists()
    assert json.loads((out / "diagnosis.json").read_text()) == d.to_dict()
    assert rec.kind == "regime" and rec.meta["diagnosis"] == d.to_dict()
    assert rec.meta["n_train"] + rec.meta["n_heldout"] == 40 and rec.meta["n_heldout"] > 0
    by = {r.label: r for r in rec.results}
    assert set(by) == {"train", "heldout"}
    assert by["train"].metrics["n"] == rec.meta["n_train"]
    assert d.train_accuracy == pytest.approx(by["train"].metrics["accuracy"])
    assert d.heldout_accuracy == pytest.approx(by["heldout"].metrics["accuracy"])
    assert d.heldout_ece == pytest.approx(by["heldout"].metrics["conf_ece"])
    assert d.heldout_mean_conf == pytest.approx(by["heldout"].metrics["mean_conf"])
    assert d.interval is not None and d.interval[0] <= d.gap <= d.interval[1] and d.base_gap is None
    assert (d.n_train, d.n_heldout) == (rec.meta["n_train"], rec.meta["n_heldout"])
    assert d.regime in (CALIBRATABLE, NON_CALIBRATABLE, UNDETERMINED) and rec.meta["base_model"] is None
    train_ids = {json.loads(l)["id"] for l in (out / "predictions-train.jsonl").read_text().splitlines()}
    held_ids = {json.loads(l)["id"] for l in (out / "predictions-heldout.jsonl").read_text().splitlines()}
    assert not train_ids & held_ids and len(train_ids | held_ids) == 40
    report = (out / "report.md").read_text()
    assert "## Results" in report and "## Regime diagnosis" in report and f"--method {d.recommended}" in report
    assert "bootstrap interval" in report
    assert load_run(out).meta["regime"] == d.regime
    with pytest.raises(LlmcalError, match="complete run"):
        run_regime(_cfg(tiny_model_dir, heldout_fraction=0.3), out, progress=False)


def test_run_regime_with_a_heldout_dataset(tiny_model_dir, tmp_path):
    heldout = "synthetic:compare?n=12&k=4"
    out = tmp_path / "r"
    rec, d = run_regime(_cfg(tiny_model_dir, heldout=heldout, train_limit=10, tolerance=1.0), out, progress=False)
    assert rec.meta["n_train"] == 10 and rec.meta["n_heldout"] == 12
    assert d.tolerance == 1.0 and "tolerance 1.0000" in d.reason
    # the held-out side is --heldout (every question of it, with its answers), not a slice of --train
    held = [json.loads(line) for line in (out / "predictions-heldout.jsonl").read_text().splitlines()]
    expected = {q.id: q.answer for q in load_dataset(heldout).questions}
    assert {r["id"]: r["answer"] for r in held} == expected
    train_ids = {json.loads(line)["id"] for line in (out / "predictions-train.jsonl").read_text().splitlines()}
    assert len(train_ids) == 10 and train_ids <= {q.id for q in load_dataset(TASK).questions}
    assert not train_ids & set(expected)
    assert d.heldout_accuracy == pytest.approx(sum(r["pred"] == r["answer"] for r in held) / len(held), abs=1e-12)


def test_run_regime_rejects_overlapping_heldout(tiny_model_dir, tmp_path):
    out = tmp_path / "overlap"
    with pytest.raises(LlmcalError, match="shares 40 question id"):
        run_regime(_cfg(tiny_model_dir, heldout=TASK), out, progress=False)
    assert not out.exists()  # refused before anything was written
    with pytest.raises(LlmcalError, match="shares 5 question id"):
        run_regime(_cfg(tiny_model_dir, heldout="synthetic:arithmetic?n=5&k=4"), out, progress=False)


def test_run_regime_on_an_adapter_measures_the_gap_its_training_added(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    from llmcal.models import load_model, resolve_model
    from llmcal.train.model import save_adapter

    spec = resolve_model(str(tiny_model_dir))
    lm = load_model(spec, dtype="float32", device="cpu")
    peft = get_peft_model(lm.model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                               init_lora_weights=False))  # random B: the adapter changes answers
    adapter = save_adapter(peft, lm.tokenizer, spec, tmp_path / "adapter")
    out = tmp_path / "regime"
    rec, d = run_regime(_cfg(adapter, heldout_fraction=0.3), out, progress=False)
    by = {r.label: r for r in rec.results}
    assert set(by) == {"train", "heldout", "base-train", "base-heldout"}
    assert (out / "predictions-base-train.jsonl").is_file() and rec.meta["base_model"].endswith(tiny_model_dir.name)
    assert d.base_train_accuracy == pytest.approx(by["base-train"].metrics["accuracy"])
    assert d.base_heldout_accuracy == pytest.approx(by["base-heldout"].metrics["accuracy"])
    assert d.added_gap == pytest.approx(d.gap - d.base_gap) and d.interval[0] <= d.added_gap <= d.interval[1]
    assert "base model's gap" in (out / "report.md").read_text()
