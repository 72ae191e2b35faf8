"""Conformal sets in studies: the `conformal:` key, the entries computed from every cell's stored predictions, the
report section."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmcal.conformal import conformal_predictions
from llmcal.errors import LlmcalError
from llmcal.posthoc.compare import posthoc_split
from llmcal.predictions import load_predictions
from llmcal.study import load_study, run_study

ARITH = "synthetic:arithmetic?difficulty=1&n=200"


def config(path: Path, model: str, extra: str = "") -> Path:
    path.write_text(f"""
name: tiny
seed: 0
defaults: {{dtype: float32, device: cpu, template: plain, n_bootstrap: 20}}
models:
  tiny: {{model: "{model}"}}
data:
  train: {{spec: "{ARITH}", split: train, limit: 30}}
  test: {{spec: "{ARITH}", split: test, limit: 40}}
methods:
  none: {{}}
  ts: {{}}
posthoc: false
{extra}""", encoding="utf-8")
    return path


@pytest.mark.parametrize("value, expected", [
    ("", None), ("conformal: false", None), ("conformal: true", {"alpha": 0.1, "score": "lac"}),
    ("conformal: {alpha: 0.2, score: aps}", {"alpha": 0.2, "score": "aps"}),
])
def test_the_conformal_key(tmp_path, value, expected):
    assert load_study(config(tmp_path / "s.yaml", "m", value)).conformal == expected


@pytest.mark.parametrize("value, message", [
    ("{alpha: 1.5}", "strictly between 0 and 1"), ("{score: thr}", "unknown score 'thr': choose one of lac, aps, raps"),
    ("{alpha: 0.1, colour: red}", "colour"),
])
def test_bad_conformal_values_are_refused_with_the_key(tmp_path, value, message):
    with pytest.raises(LlmcalError, match=rf"conformal.*{message}"):
        load_study(config(tmp_path / "s.yaml", "m", f"conformal: {value}"))


@pytest.fixture(scope="module")
def study(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("conformal")
    out = root / "study"
    run_study(config(root / "tiny.yaml", str(tiny_model_dir), "conformal: {alpha: 0.2}"), out, progress=False)
    return out


def test_entries_are_each_cells_predictions_split_by_the_heldout_rule(study):
    doc = json.loads((study / "study.json").read_text())
    cf = doc["conformal"]
    assert (cf["alpha"], cf["score"], cf["calib_fraction"]) == (0.2, "lac", 0.2)
    assert {(e["method"], e["role"]) for e in cf["entries"]} == {("none", "test"), ("ts", "test")}
    for e in cf["entries"]:
        cell = next(c for c in doc["cells"] if c["model"] == "tiny" and c["method"] == e["method"])
        calib, test = posthoc_split(load_predictions(study / cell["results"]["test"]["predictions"]), 0, 0.2)
        ref = conformal_predictions(calib, test, alpha=0.2)
        assert e["n_calib"] == len(calib) and e["n"] == len(test) and len(calib) > 0
        assert e["coverage"] == pytest.approx(ref.summary["coverage"])
        assert e["mean_size"] == pytest.approx(ref.summary["mean_size"])
    # none and ts are measured on the same questions
    assert len({e["n"] for e in cf["entries"]}) == 1
    md = (study / "report.md").read_text()
    assert "## Conformal prediction sets" in md and "score `lac`, alpha 0.2" in md
