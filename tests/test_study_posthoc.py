"""Post-hoc calibrators in studies: the `posthoc:` config key, the rows fitted on a ts cell's stored predictions,
the selective-prediction numbers of every result, and what the report and RESULTS.md show of them."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from llmcal.errors import LlmcalError
from llmcal.metrics import accuracy, aurc, brier, conf_ece, selective_accuracy
from llmcal.posthoc import BatchCalibrator, VectorScaler
from llmcal.predictions import Prediction, load_predictions, stack_probs
from llmcal.study import load_study, report_from_dir, run_study, write_results_md
from llmcal.study.posthoc import available

ARITH = "synthetic:arithmetic?difficulty=1&n=120"
DEFAULT = ("vector", "matrix", "bias", "batch", "platt", "isotonic", "histogram")


def config(path: Path, model: str, *, methods: str = "none: {}\n  ts: {}", extra: str = "",
           ood: str = '{spec: "synthetic:compare?difficulty=1&n=40", limit: 12}') -> Path:
    path.write_text(f"""
name: tiny
seed: 0
defaults: {{dtype: float32, device: cpu, template: plain, n_bootstrap: 40}}
models:
  tiny: {{model: "{model}"}}
data:
  train: {{spec: "{ARITH}", split: train, limit: 30}}
  test: {{spec: "{ARITH}", split: test, limit: 20}}
  ood: {ood}
methods:
  {methods}
{extra}""", encoding="utf-8")
    return path


# ---- the config key ---------------------------------------------------------------------------
def test_default_is_every_method_that_runs_without_the_model(tmp_path):
    assert available() == DEFAULT
    assert load_study(config(tmp_path / "s.yaml", "m")).posthoc == DEFAULT
    assert load_study(config(tmp_path / "s.yaml", "m", extra="posthoc: all")).posthoc == DEFAULT
    assert load_study(config(tmp_path / "s.yaml", "m", extra="posthoc: false")).posthoc == ()
    # a list comes back in registry order; one name alone is a list of one
    assert load_study(config(tmp_path / "s.yaml", "m", extra="posthoc: [isotonic, Vector]")).posthoc == \
        ("vector", "isotonic")
    assert load_study(config(tmp_path / "s.yaml", "m", extra="posthoc: batch")).posthoc == ("batch",)


@pytest.mark.parametrize("value, message", [
    ("[vectr]", r"unknown post-hoc method 'vectr' \(did you mean 'vector'\?\); choose from vector, matrix"),
    ("[contextual]", r"'contextual': contextual calibration needs the model"),
    ("[ts, vector]", r"'ts': temperature scaling is the study's ts method"),
    ("[none]", r"'none': the uncalibrated model"),
    ("[all, vector]", r"all stands alone"),
    ("3", r"must be all, false or a list of post-hoc methods .*got 3"),
])
def test_bad_posthoc_values_name_the_key_and_line(tmp_path, value, message):
    cfg = config(tmp_path / "s.yaml", "m", extra=f"posthoc: {value}")
    line = cfg.read_text().splitlines().index(f"posthoc: {value}") + 1
    with pytest.raises(LlmcalError, match=rf"s\.yaml: posthoc \(line {line}\): {message}"):
        load_study(cfg)


def test_a_method_key_may_not_shadow_a_posthoc_row(tmp_path):
    cfg = config(tmp_path / "s.yaml", "m", methods="none: {}\n  vector: {method: ts}")
    with pytest.raises(LlmcalError, match=r"methods\.vector \(line \d+\): 'vector' names a post-hoc method"):
        load_study(cfg)
    # without vector among the post-hoc methods the key is free
    cfg = config(tmp_path / "s.yaml", "m", methods="none: {}\n  vector: {method: ts}", extra="posthoc: [platt]")
    assert load_study(cfg).posthoc == ("platt",)


# ---- a study on the tiny model --------------------------------------------------------------
@pytest.fixture(scope="module")
def study(tmp_path_factory, tiny_model_dir):
    """A none + ts study of the tiny model, its ood role a file of questions with 2 to 4 options."""
    root = tmp_path_factory.mktemp("posthoc")
    recs = [{"id": f"q{i}", "question": f"What is {i} + {i % 7}?", "choices": [str(i + i % 7 + d) for d in
                                                                               range(2 + i % 3)],
             "answer": i % (2 + i % 3), "subject": "sums"} for i in range(24)]
    mixed = root / "mixed.jsonl"
    mixed.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    out = root / "study"
    run_study(config(root / "tiny.yaml", str(tiny_model_dir), ood=f'{{spec: "{mixed}"}}'), out, progress=False)
    return out


def _probs(preds: list[Prediction]):
    return stack_probs(preds)


def _no_constant(name):
    raise AssertionError(f"study.json holds {name}: not strict JSON")


def test_posthoc_rows_are_the_methods_fitted_on_the_ts_cell(study):
    doc = json.loads((study / "study.json").read_text(), parse_constant=_no_constant)
    ph = doc["posthoc"]
    assert ph["methods"] == list(DEFAULT)
    [entry] = ph["entries"]
    assert (entry["model"], entry["point"], entry["source"]) == ("tiny", "", "runs/tiny/ts")
    run = study / "runs/tiny/ts"
    calib = load_predictions(run / "predictions-calib.jsonl")
    assert entry["calib_n"] == len(calib) == doc["data"][""]["train"]["n"]
    assert list(entry["methods"]) == list(DEFAULT)
    # matrix scaling needs one K: the ood questions mix 2-4 options, so it has in-domain results only
    assert set(entry["methods"]["matrix"]["results"]) == {"test"}
    assert "matrix" in entry["skipped"] and entry["skipped"]["matrix"].startswith("ood: ")
    assert "mix K = 2, 3, 4" in entry["skipped"]["matrix"] and set(entry["skipped"]) == {"matrix"}

    none = next(c for c in doc["cells"] if c["name"] == "tiny/none")
    for role in ("test", "ood"):
        test = load_predictions(run / f"predictions-{role}.jsonl")
        p0, y = _probs(test)
        # vector scaling, refitted here on the calibration predictions and applied to the role's predictions
        vs = VectorScaler().fit([p.logits for p in calib], [p.answer for p in calib])
        p_vec, _ = _probs([Prediction.from_logits(p.id, p.subject, p.answer, z)
                           for p, z in zip(test, vs.transform([np.asarray(p.logits) for p in test]))])
        got = entry["methods"]["vector"]["results"][role]
        assert got["n"] == len(test)
        assert got["accuracy"] == pytest.approx(accuracy(p_vec, y), abs=1e-12)
        assert got["conf_ece"] == pytest.approx(conf_ece(p_vec, y, 10), abs=1e-12)
        assert got["brier"] == pytest.approx(brier(p_vec, y), abs=1e-12)
        assert got["aurc"] == pytest.approx(aurc(p_vec, y), abs=1e-12)
        assert got["accuracy_change"] == pytest.approx(accuracy(p_vec, y) - accuracy(p0, y), abs=1e-12)
        assert got["accuracy_change"] == pytest.approx(got["accuracy"] - none["results"][role]["accuracy"],
                                                       abs=1e-12)
        lo, hi = got["ci"]["accuracy_change"]
        assert lo <= got["accuracy_change"] <= hi
        assert set(got["ci"]) >= {"accuracy", "conf_ece", "cw_ece", "brier", "nll", "aurc"}
        # batch calibration is fitted on the role's own predictions, without their answers
        bc = BatchCalibrator().fit([np.asarray(p.logits) for p in test])
        p_b, _ = _probs([Prediction.from_logits(p.id, p.subject, p.answer, z)
                         for p, z in zip(test, bc.transform([np.asarray(p.logits) for p in test]))])
        assert entry["methods"]["batch"]["results"][role]["conf_ece"] == pytest.approx(conf_ece(p_b, y, 10),
                                                                                        abs=1e-12)
        # the top-confidence methods never change an answer
        for name in ("platt", "isotonic", "histogram"):
            assert entry["methods"][name]["results"][role]["accuracy_change"] == 0.0
        # the fitted parameters are recorded, the same as a fresh fit's
        assert entry["methods"]["vector"]["params"][role] == json.loads(json.dumps(vs.params()))


def test_every_result_carries_its_selective_numbers(study):
    doc = json.loads((study / "study.json").read_text())
    cells = {c["name"]: c for c in doc["cells"]}
    for name, label in (("tiny/none", "none"), ("tiny/ts", "ts")):
        for role in ("test", "ood"):
            res = cells[name]["results"][role]
            p, y = _probs(load_predictions(study / res["predictions"]))
            assert res["aurc"] == pytest.approx(aurc(p, y), abs=1e-12)
            assert res["acc_at_80"] == pytest.approx(selective_accuracy(p, y, 0.8), abs=1e-12)
            assert res["acc_at_50"] == pytest.approx(selective_accuracy(p, y, 0.5), abs=1e-12)
            assert res["ci"]["aurc"][0] <= res["aurc"] <= res["ci"]["aurc"][1]
            curve = res["risk_coverage"]
            assert len(curve["coverage"]) == len(curve["risk"]) == 101 and curve["coverage"][-1] == 1.0
            assert curve["risk"][-1] == pytest.approx(1 - res["accuracy"], abs=1e-4)
            # temperature scaling keeps every answer; the none cell is its own reference
            assert res["accuracy_change"] == 0.0 and res["ci"]["accuracy_change"] == [0.0, 0.0]


def test_report_and_results_show_the_posthoc_rows(study, tmp_path):
    md = (study / "report.md").read_text()
    doc = json.loads((study / "study.json").read_text())
    vec = doc["posthoc"]["entries"][0]["methods"]["vector"]["results"]["test"]
    assert "## Post-hoc calibrators" in md and "## Selective prediction (risk-coverage)" in md
    assert "| vector | vector scaling | Guo et al. 2017 | calibration split |" in md
    assert "| batch | batch calibration | Zhou et al. 2024 | test (no labels) |" in md
    assert "tiny**: matrix left out (ood: " in md
    assert "Δ acc" in md and "AURC" in md
    # the in-domain table: the post-hoc rows follow none and ts, with their interval and signed change
    table = md[md.index("### In-domain (test): all metrics"):md.index("### Out-of-domain")]
    methods = re.findall(r"^\| (\w+) \| \d+ \|", table, re.M)
    assert methods == ["none", "ts", *DEFAULT], table
    row = next(line for line in table.splitlines() if line.startswith("| vector |"))
    acc_ci = vec["ci"]["accuracy"]
    from llmcal.report.tables import format_number, format_value

    change = format_number(vec["accuracy_change"], 3, signed=True)
    assert f"| {format_value(vec['accuracy'], acc_ci, sig=3)} | {change} [" in row, row
    ood = md[md.index("### Out-of-domain (ood): all metrics"):md.index("## Post-hoc calibrators")]
    assert "| matrix |" not in ood and "| vector |" in ood
    assert "Lowest conf-ECE per model and domain" in md and "**tiny, in-domain**:" in md
    for png in ("risk-coverage-in-domain.png", "risk-coverage-out-of-domain.png"):
        assert f"]({png})" in md and (study / png).stat().st_size > 5_000
    assert "risk-coverage-in-domain.png" in (doc["figures"]["risk:test:tiny:"])
    page = (study / "report.html").read_text()
    assert "Post-hoc calibrators" in page and not re.search(r'src="(?!data:)', page)

    text = write_results_md([study], tmp_path / "RESULTS.md").read_text()
    assert "Post-hoc calibrators, fitted on the ts cell's stored calibration predictions" in text
    assert re.search(r"^\| tiny \| vector \| " + re.escape(f"{vec['accuracy']:.4f}"), text, re.M)
    assert "| tiny | cft |" not in text
    # the study's main table and its observations keep the study's own methods only
    main = text[text.index("## Study `tiny`"):text.index("Post-hoc calibrators, fitted")]
    assert "| tiny | vector |" not in main and "tiny, vector:" not in main


def test_posthoc_off_and_without_a_ts_cell(study, tmp_path):
    import shutil

    copy = tmp_path / "study"
    shutil.copytree(study, copy)
    yaml = copy / "study.yaml"
    yaml.write_text(yaml.read_text() + "\nposthoc: false\n")
    report_from_dir(copy)
    doc = json.loads((copy / "study.json").read_text())
    assert doc["posthoc"] == {"methods": [], "entries": []}
    md = (copy / "report.md").read_text()
    assert "Off (`posthoc: false` in the study config)." in md and "| tiny | vector |" not in md
    # risk-coverage plots of the study's own methods stay
    assert (copy / "risk-coverage-in-domain.png").is_file()

    # the ts cell's calibration predictions gone: no post-hoc rows, and the report says why
    yaml.write_text(yaml.read_text().replace("posthoc: false", "posthoc: [vector]"))
    (copy / "runs/tiny/ts/predictions-calib.jsonl").unlink()
    report_from_dir(copy)
    entry = json.loads((copy / "study.json").read_text())["posthoc"]["entries"][0]
    assert entry["methods"] == {} and "predictions-calib.jsonl is missing" in entry["error"]
    assert "predictions-calib.jsonl is missing: nothing to fit on" in (copy / "report.md").read_text()


def test_no_ts_cell_means_no_posthoc_rows(tmp_path, tiny_model_dir):
    out = tmp_path / "study"
    run_study(config(tmp_path / "s.yaml", str(tiny_model_dir), methods="none: {}"), out, progress=False)
    doc = json.loads((out / "study.json").read_text())
    assert doc["posthoc"] == {"methods": list(DEFAULT), "entries": []}
    md = (out / "report.md").read_text()
    assert "None: the post-hoc calibrators are fitted on a ts cell's calibration predictions" in md
    assert "Post-hoc calibrators, fitted" not in write_results_md([out], tmp_path / "R.md").read_text()
