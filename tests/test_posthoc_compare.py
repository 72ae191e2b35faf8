"""Tests for llmcal.posthoc.compare: comparing methods on stored predictions and on a finished run."""
from __future__ import annotations

import json
import re
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
    for name in ("posthoc.json", "report.md", "report.html", "reliability-grid.png", "risk-coverage.png",
                 "verdict-pareto.png", "verdict-reliability.png"):
        assert (out / name).exists()
    doc = json.loads((out / "posthoc.json").read_text())
    assert [m["method"] for m in doc["methods"]] == ["none", "ts", "vector", "isotonic"]
    assert doc["source"]["calib_file"] is None and "hash_unit(id, seed) >= 0.8" in doc["source"]["split"]
    assert doc["n_bootstrap"] == 200  # from the run's config
    assert doc["n_calib"] + doc["n_test"] == 400
    md = (out / "report.md").read_text()
    assert "| isotonic |" in md and "docs/posthoc.md" in md
    assert md.index("## Verdict") < md.index("- **model**: fake") < md.index("## Methods")
    assert "src=\"data:image/png;base64," in (out / "report.html").read_text()
    assert rep.comparison.row("ts").params["temperature_"] > 0
    # a run with its own calibration split uses it
    run2 = make_run(tmp_path / "run2", preds[100:], calib=preds[:100])
    calib, test, source = select_predictions(run2)
    assert len(calib) == 100 and len(test) == 300 and source["calib_file"] == "predictions-calib.jsonl"
    rep2 = compare_run(run2, "ts", out_dir=tmp_path / "elsewhere", n_bootstrap=0)
    assert (tmp_path / "elsewhere" / "report.md").exists() and rep2.comparison.n_calib == 100
    # the comparison never lands in a run directory, where its report.md would replace the run's own
    with pytest.raises(LlmcalError, match="a run directory .* would replace the run's own"):
        compare_run(run2, "ts", out_dir=run, n_bootstrap=0)
    assert not (run / "posthoc.json").exists()


def three_option_predictions(n: int, n_right: int, conf: float) -> list[Prediction]:
    """``n`` three-option questions (answer A), the first ``n_right`` answered A, the rest B, all at ``conf``."""
    rest = (1 - conf) / 2
    return [Prediction.from_logits(f"q{i}", "s", 0, np.log([conf, rest, rest] if i < n_right else [rest, conf, rest]))
            for i in range(n)]


def costly_matrix_run(tmp_path, monkeypatch):
    """A run whose post-hoc comparison has a method that costs accuracy and has the lowest conf-ECE.

    The uncalibrated model answers 120 of 200 right at confidence 0.9 (conf-ECE 0.3); "ts" keeps its answers at
    0.65 (conf-ECE 0.05); "matrix" loses 30 right answers at confidence 0.45, its accuracy (conf-ECE 0). The
    methods' outputs are fixed here (``calibrate_predictions`` replaced) so the rule, not a fit, decides.
    """
    from llmcal.posthoc import compare

    outputs = {"ts": three_option_predictions(200, 120, 0.65), "matrix": three_option_predictions(200, 90, 0.45)}

    def fixed(method, calib, test, *, contextual_priors=None):
        return (list(test), {}) if method == "none" else (outputs[method], {})

    monkeypatch.setattr(compare, "calibrate_predictions", fixed)
    return make_run(tmp_path / "run", three_option_predictions(200, 120, 0.9),
                    calib=three_option_predictions(50, 30, 0.9))


def test_the_comparison_report_never_picks_a_method_that_costs_accuracy(tmp_path, monkeypatch):
    from llmcal.report.tables import SIG, format_value

    run = costly_matrix_run(tmp_path, monkeypatch)
    rep = compare_run(run, "ts,matrix", n_bootstrap=200)
    ts, matrix = rep.comparison.row("ts"), rep.comparison.row("matrix")
    assert matrix.conf_ece < ts.conf_ece and matrix.accuracy_change_ci[1] < 0  # lowest conf-ECE, costs accuracy
    assert rep.verdict.pick.label == "ts" and [o.label for o in rep.verdict.costly] == ["matrix"]
    md = (run / "posthoc" / "report.md").read_text(encoding="utf-8")
    box = md[md.index("## Verdict"):md.index("- **model**")]
    assert md.index(f"# Post-hoc calibration of `{tmp_path.name}/run`") < md.index("## Verdict") < md.index("## Methods")
    assert box.startswith("## Verdict\n\n- Overconfident by 0.300 [")
    before = format_value(rep.comparison.row("none").conf_ece, rep.comparison.row("none").ci["conf_ece"], sig=SIG)
    after = format_value(ts.conf_ece, ts.ci["conf_ece"], sig=SIG)
    assert f"Use **ts**: conf-ECE {before} → {after} at accuracy change 0 [0.00, 0.00]." in box
    assert re.search(r"Left out for costing accuracy although their conf-ECE is lower: matrix \([0-9.]+ at accuracy "
                     r"change -0\.150 \[-0\.\d+, -0\.\d+\]\)", box), box
    assert "](verdict-pareto.png)" in box and "](verdict-reliability.png)" in box
    assert md.count("fake") == 1  # the model named once
    # the table's cells: 3 significant digits with their intervals, the reference's change left empty
    assert f"| ts | calibration split | {format_value(ts.accuracy, ts.ci['accuracy'], sig=SIG)} | 0 [0.00, 0.00] | {after} |" in md
    assert "| none | - | 0.600 [" in md and "| — | " + before in md
    page = (run / "posthoc" / "report.html").read_text(encoding="utf-8")
    assert page.index('id="verdict"') < page.index("<h2>Methods</h2>")
    # the four images, each embedded: the two in and beside the verdict, the per-method grid, risk-coverage
    assert len(re.findall(r'src="data:image/png;base64,', page)) == len(re.findall(r"<img ", page)) == 4
    assert not re.search(r'src="(?!data:)', page) and "<script" not in page

    # without a method that keeps accuracy and lowers conf-ECE: keep the predictions as they are
    rep = compare_run(run, "matrix", n_bootstrap=200)
    md = (run / "posthoc" / "report.md").read_text(encoding="utf-8")
    assert rep.verdict.pick is None and "Keep the model as it is" in md and "Use **" not in md
    assert "*The predictions as they are: bars" in md  # the diagram beside the box: "before" alone


def test_calibrate_from_prints_the_pick_and_where_the_report_is(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from llmcal.cli import app

    run = costly_matrix_run(tmp_path, monkeypatch)
    r = CliRunner().invoke(app, ["calibrate", "--from", str(run), "--method", "ts,matrix", "--n-bootstrap", "100",
                                 "--out", str(tmp_path / "cmp")])
    assert r.exit_code == 0, r.output
    said = " ".join(r.output.split())  # rich wraps the lines at the console's width
    assert "Use ts: conf-ECE 0.300 [" in said and "Left out for costing accuracy" in said
    assert "(report.md, report.html, posthoc.json, plots)" in said and (tmp_path / "cmp" / "report.html").is_file()


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
