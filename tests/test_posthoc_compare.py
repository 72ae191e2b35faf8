"""Tests for llmcal.posthoc.compare: comparing methods on stored predictions and on a finished run."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest

from llmcal.errors import LlmcalError
from llmcal.posthoc import METHODS, compare_methods, compare_run, resolve_methods
from llmcal.posthoc.compare import posthoc_split, select_predictions
from llmcal.predictions import Prediction, softmax, write_predictions


def synthetic(n, seed=0, k=4, bias=1.0):
    """Overconfident predictions with a preference for "A"."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        kk = k if isinstance(k, int) else k[i % len(k)]
        z = rng.normal(size=kk) * 3.0
        y = int(rng.choice(kk, p=softmax(z / 2.5)))
        z[0] += bias
        out.append(Prediction.from_logits(f"q{i}", "s", y, z))
    return out


def test_resolve_methods():
    assert resolve_methods("ts,isotonic") == (["none", "ts", "isotonic"], False)
    names, everything = resolve_methods(["all"])
    assert everything and names == list(METHODS)
    with pytest.raises(LlmcalError, match="unknown post-hoc method bogus; known: none, ts"):
        resolve_methods("ts,bogus")
    with pytest.raises(LlmcalError):
        resolve_methods("")


def test_compare_methods_on_1000_predictions_in_seconds():
    preds = synthetic(1000)
    calib, test = preds[:200], preds[200:]
    t = time.perf_counter()
    comp = compare_methods(calib, test, "all", n_bootstrap=1000)
    elapsed = time.perf_counter() - t
    assert elapsed < 30.0  # a few seconds on an idle core; generous for shared CI machines
    names = [r.method for r in comp.rows]
    assert names[0] == "none" and "contextual" not in names and "contextual" in comp.skipped
    assert set(names) == set(METHODS) - {"contextual"}
    none, ts = comp.row("none"), comp.row("ts")
    assert none.accuracy_change == 0.0 and ts.accuracy_change == 0.0
    assert ts.conf_ece < none.conf_ece  # overconfident input: TS helps
    for r in comp.rows:
        assert set(r.ci) == {"accuracy", "conf_ece", "cw_ece", "brier", "nll", "aurc"}
        assert all(v[0] <= v[1] for v in r.ci.values())
        lo, hi = r.ci["accuracy"]  # (an ECE's percentile interval need not hold the ECE: it is biased upwards)
        assert lo <= r.accuracy <= hi
        assert len(r.predictions) == 800
    for name in ("platt", "isotonic", "histogram"):
        assert comp.row(name).accuracy_change == 0.0
    assert comp.row("bias").accuracy_change_ci is not None
    json.dumps(comp.to_dict())
    assert "| ts | calibration split |" in comp.table_markdown()


def test_fixed_k_methods_on_mixed_k():
    preds = synthetic(300, k=(3, 4))
    comp = compare_methods(preds[:100], preds[100:], "all", n_bootstrap=0)
    assert "matrix" in comp.skipped and "mix K = 3, 4" in comp.skipped["matrix"]
    assert comp.row("vector").n_test == 200
    with pytest.raises(LlmcalError, match="mix K = 3, 4"):
        compare_methods(preds[:100], preds[100:], "matrix", n_bootstrap=0)
    with pytest.raises(LlmcalError, match="content-free prior"):
        compare_methods(preds[:100], preds[100:], "contextual", n_bootstrap=0)
    comp = compare_methods(preds[:100], preds[100:], "contextual", n_bootstrap=0,
                           contextual_priors={3: [0.5, 0.25, 0.25], 4: [0.4, 0.2, 0.2, 0.2]})
    assert [r.method for r in comp.rows] == ["none", "contextual"]


def test_posthoc_split_is_deterministic_and_independent_of_the_data_split():
    from llmcal.data.splits import hash_unit

    preds = synthetic(500)
    calib, test = posthoc_split(preds, seed=0)
    assert len(calib) + len(test) == 500 and 60 < len(calib) < 140
    again, _ = posthoc_split(list(reversed(preds)), seed=0)
    assert {p.id for p in again} == {p.id for p in calib}
    # a run on the data's test split (hash_unit(id, 0) >= 0.2) still gets a calibration slice
    test_split = [p for p in preds if hash_unit(p.id, 0) >= 0.2]
    c2, _ = posthoc_split(test_split, seed=0)
    assert len(c2) > 40
    with pytest.raises(LlmcalError):
        posthoc_split(preds, 0, calib_fraction=1.0)


def make_run(path, preds, *, calib=None, seed=0):
    from llmcal.runs import RunDir, RunResult

    rd = RunDir(path)
    rd.start({"model": "fake", "seed": seed, "n_bins": 10, "n_bootstrap": 200, "template": "plain"})
    write_predictions(rd.file("predictions.jsonl"), preds)
    if calib is not None:
        write_predictions(rd.file("predictions-calib.jsonl"), calib)
    rd.finish(kind="eval", model="fake", results=[RunResult(label="none", method="none", dataset="mcq", split="all",
                                                            predictions="predictions.jsonl", metrics={})],
              meta={"template": "plain"})
    return path


def test_compare_run_writes_the_comparison(tmp_path):
    preds = synthetic(400, seed=1)
    run = make_run(tmp_path / "run", preds)
    rep = compare_run(run, "ts,vector,isotonic")
    out = run / "posthoc"
    for name in ("posthoc.json", "posthoc.md", "reliability-grid.png", "risk-coverage.png"):
        assert (out / name).exists()
    doc = json.loads((out / "posthoc.json").read_text())
    assert [m["method"] for m in doc["methods"]] == ["none", "ts", "vector", "isotonic"]
    assert doc["source"]["calib_file"] is None and "hash_unit(id, seed) >= 0.8" in doc["source"]["split"]
    assert doc["n_bootstrap"] == 200  # from the run's config
    assert doc["n_calib"] + doc["n_test"] == 400
    md = (out / "posthoc.md").read_text()
    assert "| isotonic |" in md and "docs/posthoc.md" in md
    assert rep.comparison.row("ts").params["temperature_"] > 0
    # a run with its own calibration split uses it
    run2 = make_run(tmp_path / "run2", preds[100:], calib=preds[:100])
    calib, test, source = select_predictions(run2)
    assert len(calib) == 100 and len(test) == 300 and source["calib_file"] == "predictions-calib.jsonl"
    rep2 = compare_run(run2, "ts", out_dir=tmp_path / "elsewhere", n_bootstrap=0)
    assert (tmp_path / "elsewhere" / "posthoc.md").exists() and rep2.comparison.n_calib == 100


def test_compare_run_refuses_an_incomplete_run(tmp_path):
    from llmcal.runs import RunDir

    RunDir(tmp_path / "r").start({"model": "fake"})
    with pytest.raises(LlmcalError, match="not complete"):
        compare_run(tmp_path / "r", "ts")


def test_contextual_calibration_refuses_a_served_models_run(tmp_path):
    """A served run records an API 'model' (a base URL, not weights): contextual calibration cannot load it."""
    from typer.testing import CliRunner

    from llmcal.cli import app

    run = make_run(tmp_path / "r", synthetic(60))
    cfg = json.loads((run / "config.json").read_text())
    cfg["model_spec"] = {"name": "served", "kind": "api", "path": "http://127.0.0.1:9/v1"}
    (run / "config.json").write_text(json.dumps(cfg))
    r = CliRunner().invoke(app, ["calibrate", "--from", str(run), "--method", "ts,contextual",
                                 "--out", str(tmp_path / "cmp")])
    assert r.exit_code == 2 and "contextual calibration scores content-free prompts" in r.output
    assert not (tmp_path / "cmp").exists()
