"""Regime diagnosis: the classification on hand cases, and ``llmcal regime`` end to end on a tiny model."""
from __future__ import annotations

import json

import pytest

from llmcal.data import load_dataset
from llmcal.errors import LlmcalError
from llmcal.predictions import Prediction
from llmcal.regime import (CALIBRATABLE, DEFAULT_TOLERANCE, NON_CALIBRATABLE, Diagnosis, RegimeConfig, diagnose,
                           diagnose_predictions, format_diagnosis, left_calibratable, run_regime)
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
    assert left_calibratable(train, held, tol) == (regime == NON_CALIBRATABLE)
    assert f"{d.gap:.4f}" in d.reason


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
    assert d.gap == pytest.approx(0.5) and d.regime == NON_CALIBRATABLE and d.recommended == "rcft"
    with pytest.raises(LlmcalError, match="held-out"):
        diagnose_predictions(train, [])


def test_format_diagnosis_lines():
    text = format_diagnosis(diagnose(0.9, 0.6, heldout_ece=0.2, heldout_mean_conf=0.85))
    for s in ("0.9000", "0.6000", "0.2000", "0.8500", "+0.3000", "0.3000", "non-calibratable", "--method rcft"):
        assert s in text
    assert len(text.splitlines()) == 6
    assert "conf-ECE" not in format_diagnosis(diagnose(0.6, 0.6))


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
    assert d == diagnose(d.train_accuracy, d.heldout_accuracy, heldout_ece=d.heldout_ece,
                         heldout_mean_conf=d.heldout_mean_conf, tolerance=DEFAULT_TOLERANCE)
    train_ids = {json.loads(l)["id"] for l in (out / "predictions-train.jsonl").read_text().splitlines()}
    held_ids = {json.loads(l)["id"] for l in (out / "predictions-heldout.jsonl").read_text().splitlines()}
    assert not train_ids & held_ids and len(train_ids | held_ids) == 40
    report = (out / "report.md").read_text()
    assert "## Results" in report and "## Regime diagnosis" in report and f"--method {d.recommended}" in report
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
