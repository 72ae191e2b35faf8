"""Running studies: a two-cell grid end to end on the tiny model, skip and resume, --only, sweeps, a training
study with its regime diagnosis, the reports they write."""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
import pytest

from llmcal.errors import LlmcalError
from llmcal.posthoc import TemperatureScaler
from llmcal.predictions import load_predictions
from llmcal.regime import CALIBRATABLE, DEFAULT_TOLERANCE, NON_CALIBRATABLE, UNDETERMINED
from llmcal.study import run_study, write_results_md

ARITH = "synthetic:arithmetic?difficulty=1&n=120"


def write_config(path: Path, model_dir: Path, methods: str = "none: {}\n  ts: {}", extra: str = "") -> Path:
    path.write_text(f"""
name: tiny
seed: 0
defaults: {{dtype: float32, device: cpu, template: plain, n_bootstrap: 50}}
models:
  tiny: {{model: "{model_dir}"}}
data:
  train: {{spec: "{ARITH}", split: train, limit: 24}}
  test: {{spec: "{ARITH}", split: test, limit: 16}}
  ood: {{spec: "synthetic:compare?difficulty=1&n=40", limit: 12}}
methods:
  {methods}
{extra}""", encoding="utf-8")
    return path


@pytest.fixture
def score_calls(monkeypatch):
    """Counts the questions the scoring engine is asked to score (the pipeline's scoring pass, after the cache)."""
    import llmcal.pipeline as pl

    calls = []
    real = pl._score_into

    def counting(run, filename, loaded, questions, *a, **kw):
        calls.append((Path(run.path).name, filename, len(questions)))
        return real(run, filename, loaded, questions, *a, **kw)

    monkeypatch.setattr(pl, "_score_into", counting)
    return calls


# ---- data checks before any model loads --------------------------------------------------
def test_overlapping_roles_fail_before_any_model_loads(tmp_path, tiny_model_dir):
    cfg = tmp_path / "s.yaml"
    cfg.write_text(f"""
models: {{tiny: "{tiny_model_dir}"}}
data:
  train: {{spec: "{ARITH}", limit: 30}}
  test: {{spec: "{ARITH}", limit: 30}}
methods: [none]
""", encoding="utf-8")
    with pytest.raises(LlmcalError, match=r"s\.yaml: data\.train / data\.test: share"):
        run_study(cfg, tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "runs").exists()


# ---- a two-cell study end to end -----------------------------------------------------------
def test_none_ts_study_end_to_end_skip_and_resume(tmp_path, tiny_model_dir, score_calls, monkeypatch):
    cfg = write_config(tmp_path / "tiny.yaml", tiny_model_dir)
    out = tmp_path / "study"

    # First attempt: the ts cell fails once (after scoring), the none cell completes.
    import llmcal.posthoc as posthoc

    real_fit = posthoc.TemperatureScaler.fit

    def boom(self, *a, **kw):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(posthoc.TemperatureScaler, "fit", boom)
    t0 = time.perf_counter()
    with pytest.raises(LlmcalError, match=r"1 cell\(s\).*tiny/ts.*simulated crash"):
        run_study(cfg, out, progress=False)
    first_wall = time.perf_counter() - t0
    assert (out / "runs/tiny/none/metrics.json").exists()
    assert (out / "runs/tiny/ts/INCOMPLETE").exists()
    partial = json.loads((out / "study.json").read_text())
    assert {c["name"]: c["status"] for c in partial["cells"]} == {"tiny/none": "complete", "tiny/ts": "failed"}
    # none scored test and ood; ts reused those scores and scored only its calibration set.
    assert sorted((r, f) for r, f, _ in score_calls) == [("none", "predictions-ood.jsonl"),
                                                          ("none", "predictions-test.jsonl"),
                                                          ("ts", "predictions-calib.jsonl")]

    # Rerun: the complete cell is skipped, the failed one resumes from its predictions on disk.
    monkeypatch.setattr(posthoc.TemperatureScaler, "fit", real_fit)
    none_mtime = (out / "runs/tiny/none/metrics.json").stat().st_mtime_ns
    score_calls.clear()
    written = run_study(cfg, out, progress=False)
    assert score_calls == []
    assert (out / "runs/tiny/none/metrics.json").stat().st_mtime_ns == none_mtime
    assert (out / "runs/tiny/ts/metrics.json").exists() and not (out / "runs/tiny/ts/INCOMPLETE").exists()

    # The report: markdown, self-contained html, figures, study.json with all numbers.
    for key in ("md", "html", "json", "grid:test", "grid:ood", "plane"):
        assert written[key].exists(), key
    md = (out / "report.md").read_text()
    for section in ("Results (the paper's layout)", "Reliability diagrams", "Accuracy vs conf-ECE",
                    "Regime diagnosis", "Sizes and time"):
        assert section in md
    for png in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md):
        assert (out / png).is_file(), png
    page = (out / "report.html").read_text()
    assert "data:image/png;base64," in page
    assert not re.search(r'src="(?!data:)', page) and "<link" not in page
    doc = json.loads((out / "study.json").read_text())
    cells = {c["name"]: c for c in doc["cells"]}
    assert all(c["status"] == "complete" for c in cells.values())
    none, ts = cells["tiny/none"], cells["tiny/ts"]
    # study.json carries each cell's metrics.json numbers, and those are the numbers of its predictions files.
    none_metrics = {r["dataset"]: r["metrics"] for r in json.loads((out / "runs/tiny/none/metrics.json").read_text())
                    ["results"] if r["label"] == "none"}
    for role in ("test", "ood"):
        for k in ("accuracy", "conf_ece", "cw_ece", "brier", "nll", "n"):
            assert none["results"][role][k] == none_metrics[role][k], (role, k)
        preds = load_predictions(out / f"runs/tiny/none/predictions-{role}.jsonl")
        assert none["results"][role]["accuracy"] == pytest.approx(np.mean([p.correct for p in preds]), abs=1e-12)
        assert none["results"][role]["nll"] == pytest.approx(-np.mean([np.log(p.probs[p.answer]) for p in preds]),
                                                             rel=1e-9)
        assert set(none["results"][role]["ci"]) >= {"accuracy", "conf_ece", "cw_ece", "brier", "nll"}
        # temperature scaling keeps every argmax: same accuracy on the same questions
        assert ts["results"][role]["accuracy"] == none["results"][role]["accuracy"]
        assert ts["results"][role]["n"] == none["results"][role]["n"]
    # the temperature is the one a fresh scaler fits on the cell's calibration predictions
    calib = load_predictions(out / "runs/tiny/ts/predictions-calib.jsonl")
    refit = TemperatureScaler().fit([p.logits for p in calib], [p.answer for p in calib])
    assert ts["temperature"] == pytest.approx(refit.temperature_, rel=1e-9)
    assert ts["calib_n"] == len(calib) == doc["data"][""]["train"]["n"]
    assert doc["data"][""]["test"]["n"] == 16 and doc["data"][""]["ood"]["n"] == 12
    # the none cell completed in the first call: its wall time is the one timings.json recorded then
    timings = json.loads((out / "timings.json").read_text())
    assert none["wall_s"] == timings["runs/tiny/none"] and 0 < none["wall_s"] <= first_wall

    # A third run with nothing to do only rewrites the report.
    score_calls.clear()
    run_study(cfg, out, progress=False)
    assert score_calls == []

    # RESULTS.md from the committed outputs.
    res = write_results_md([out], tmp_path / "RESULTS.md")
    text = res.read_text()
    assert "0.1953" in text and "0.0239" in text  # the paper's numbers
    assert f"{none['results']['test']['accuracy']:.4f}" in text
    assert "Study `tiny`" in text and "<!-- edit:" in text
    # prose written between the markers survives regeneration; the numbers are rewritten
    res.write_text(text.replace("<!-- edit: one paragraph: what was run", "We ran it.\n<!-- x").replace(
        f"{none['results']['test']['accuracy']:.4f}", "9.9999"))
    text = write_results_md([out], res).read_text()
    assert "We ran it." in text and "9.9999" not in text
    assert f"{none['results']['test']['accuracy']:.4f}" in text and "<!-- edit: where tiny differs" in text

    # A changed config of a complete cell is an error naming what differs; overwrite reruns the cell.
    write_config(cfg, tiny_model_dir, extra="", methods="none: {n_bins: 5}\n  ts: {}")
    with pytest.raises(LlmcalError, match=r"tiny/none.*n_bins"):
        run_study(cfg, out, progress=False)
    run_study(cfg, out, progress=False, overwrite=True, only="tiny/none")
    assert json.loads((out / "runs/tiny/none/config.json").read_text())["n_bins"] == 5


def test_only_selects_cells(tmp_path, tiny_model_dir):
    cfg = write_config(tmp_path / "tiny.yaml", tiny_model_dir)
    out = tmp_path / "study"
    run_study(cfg, out, progress=False, only=["*/none"])
    assert (out / "runs/tiny/none/metrics.json").exists() and not (out / "runs/tiny/ts").exists()
    doc = json.loads((out / "study.json").read_text())
    assert {c["name"]: c["status"] for c in doc["cells"]} == {"tiny/none": "complete", "tiny/ts": "not run"}
    with pytest.raises(LlmcalError, match="matches no cell"):
        run_study(cfg, out, progress=False, only="tiny/cft")


def test_sweep_points_materialise_their_own_data(tmp_path, tiny_model_dir):
    cfg = tmp_path / "sweep.yaml"
    cfg.write_text(f"""
defaults: {{dtype: float32, device: cpu, template: plain, n_bootstrap: 20}}
models: {{tiny: "{tiny_model_dir}"}}
data:
  test: {{spec: "synthetic:arithmetic?difficulty={{d}}&n=60", limit: 8}}
methods: [none]
sweep:
  difficulty:
    d1: {{vars: {{d: 1}}}}
    d3: {{vars: {{d: 3}}}}
""", encoding="utf-8")
    out = tmp_path / "out"
    written = run_study(cfg, out, progress=False)
    doc = json.loads((out / "study.json").read_text())
    assert [c["name"] for c in doc["cells"]] == ["tiny/none-d1", "tiny/none-d3"]
    assert doc["data"]["d1"]["test"]["path"] != doc["data"]["d3"]["test"]["path"]
    assert "grid:test" in written
    md = (out / "report.md").read_text()
    for point in ("d1", "d3"):  # a row per point in the results table (the model column only with several models)
        assert re.search(rf"^\|(?: tiny \|)? {point} \| none \| \d", md, re.M), md


def test_training_study_with_regime_diagnosis(tmp_path, tiny_model_dir, score_calls):
    cfg = write_config(tmp_path / "tiny.yaml", tiny_model_dir,
                       methods="none: {}\n  cft: {epochs: 1, batch_size: 4, lr: 0.001, drift: false, save_steps: 100}")
    out = tmp_path / "study"
    written = run_study(cfg, out, progress=False)
    doc = json.loads((out / "study.json").read_text())
    cells = {c["name"]: c for c in doc["cells"]}
    assert [c["name"] for c in doc["cells"]] == ["tiny/cft", "tiny/regime", "tiny/none"]
    assert all(c["status"] == "complete" for c in cells.values())
    cft = cells["tiny/cft"]
    assert set(cft["results"]) == {"test", "ood"} and set(cft["before"]) == {"test", "ood"}
    assert cft["training"]["n_train"] + cft["training"]["n_heldout"] == 24
    # the none cell reused the base-model scores the cft run made before training
    assert not [c for c in score_calls if c[0] == "none"]
    assert cells["tiny/none"]["results"]["test"]["accuracy"] == cft["before"]["test"]["accuracy"]
    (d,) = doc["diagnoses"]
    assert d["model"] == "tiny" and "cft" in d["measured"]
    # the diagnosis is recomputed here from the files: the fine-tuned model's scores on the questions it
    # trained on (the regime cell) against its in-domain test predictions (the cft cell)
    trained = load_predictions(out / "runs/tiny/regime/predictions-train.jsonl")
    assert len(trained) == cft["training"]["n_train"]
    assert d["train_accuracy"] == pytest.approx(np.mean([p.correct for p in trained]), abs=1e-12)
    assert d["heldout_accuracy"] == pytest.approx(cft["results"]["test"]["accuracy"], abs=1e-12)
    assert d["gap"] == pytest.approx(d["train_accuracy"] - d["heldout_accuracy"], abs=1e-12)
    assert d["tolerance"] == DEFAULT_TOLERANCE
    # against the base model on the same questions: its test scores from the cft run, its training-question
    # scores from the regime cell
    base_trained = load_predictions(out / "runs/tiny/regime/predictions-base-train.jsonl")
    assert d["base_train_accuracy"] == pytest.approx(np.mean([p.correct for p in base_trained]), abs=1e-12)
    assert d["base_heldout_accuracy"] == pytest.approx(cft["before"]["test"]["accuracy"], abs=1e-12)
    assert d["added_gap"] == pytest.approx(d["gap"] - d["base_gap"], abs=1e-12)
    lo, hi = d["interval"]
    assert d["regime"] == (CALIBRATABLE if hi <= d["tolerance"] else NON_CALIBRATABLE if lo > d["tolerance"]
                           else UNDETERMINED)
    assert d["recommended"] == {CALIBRATABLE: "cft", NON_CALIBRATABLE: "rcft", UNDETERMINED: "auto"}[d["regime"]]
    assert "plane" in written  # one model: the plane of every run carries its boundary
    md = (out / "report.md").read_text()
    assert "regime boundary for tiny" in md and "SFT fixed point" in md and d["regime"] in md
    # rerun: nothing is scored or trained again
    score_calls.clear()
    run_study(cfg, out, progress=False)
    assert score_calls == []
