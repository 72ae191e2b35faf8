"""Reports: reliability diagrams, tables, the per-run report and the comparison (md + self-contained html)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from llmcal.errors import LlmcalError
from llmcal.io import atomic_write_jsonl
from llmcal.report import (accuracy_ece_plane, html_table, markdown_table, reliability_figure, reliability_grid,
                           results_rows, save_reliability, write_comparison, write_run_report)
from llmcal.runs import RunDir, RunResult, load_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fmt(x, ci=None) -> str:
    """A number (and interval) as the reports write it."""
    from llmcal.report.tables import format_value

    return format_value(float(x), ci, sig=3)


def assert_png(path: Path, min_bytes: int = 5_000) -> None:
    data = Path(path).read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    assert len(data) > min_bytes, f"{path} is suspiciously small ({len(data)} bytes)"


def reliability(count, accuracy, confidence) -> dict:
    m = len(count)
    return {"n_bins": m, "edges": [i / m for i in range(m + 1)], "count": list(count),
            "accuracy": list(accuracy), "confidence": list(confidence)}


# An overconfident model: accuracy below confidence in the upper bins; bins 0-2 empty.
REL = reliability(
    [0, 0, 0, 12, 30, 41, 55, 60, 80, 222],
    [None, None, None, 0.25, 0.3, 0.4, 0.45, 0.55, 0.6, 0.7],
    [None, None, None, 0.35, 0.45, 0.55, 0.65, 0.75, 0.85, 0.97],
)


def fake_metrics(accuracy: float, conf_ece: float, *, acc_ci=(0.5912, 0.6531), ece_ci=(0.1801, 0.2133),
                 n_subjects: int = 3, rel: dict = REL) -> dict:
    subjects = {f"subject_{i:02d}": {"n": 10 + i, "accuracy": round(0.2 + 0.6 * i / max(1, n_subjects - 1), 4),
                                     "conf_ece": 0.1} for i in range(n_subjects)}
    return {"n": 500, "accuracy": accuracy, "conf_ece": conf_ece, "cw_ece": 0.0876, "em_ece": 0.19, "mce": 0.3,
            "brier": 0.5432, "nll": 1.2345, "auroc": 0.66, "mean_conf": 0.8181,
            "ci": {"accuracy": list(acc_ci), "conf_ece": list(ece_ci)}, "reliability": rel,
            "per_subject": subjects, "n_bins": rel["n_bins"]}


def make_run(root: Path, name: str, results: list[RunResult], *, finish: bool = True, pngs: bool = True) -> Path:
    rd = RunDir(root / name)
    rd.start({"model": "tiny-model", "kind": "eval", "data": "synthetic", "template": "plain", "split": "test"})
    atomic_write_jsonl(rd.file("predictions.jsonl"),
                       [{"id": "q1", "subject": None, "answer": 0, "probs": [0.7, 0.3], "pred": 0, "conf": 0.7,
                         "logits": [0.85, 0.0]}])
    if pngs:
        for r in results:
            if r.reliability:
                save_reliability(r.metrics["reliability"], rd.file(r.reliability), r.label, r.metrics)
    if finish:
        rd.finish(kind="eval", model="tiny-model", results=results, meta={"device": "cpu"})
    return rd.path


def result(label: str, metrics: dict, *, png: str | None = "reliability.png", extra: dict | None = None) -> RunResult:
    return RunResult(label=label, method=label, dataset="synthetic", split="test", predictions="predictions.jsonl",
                     metrics=metrics, reliability=png, extra=extra or {})


# ---- plots --------------------------------------------------------------------------
def test_save_reliability_writes_a_png(tmp_path):
    p = save_reliability(REL, tmp_path / "sub" / "rel.png", "overconfident", fake_metrics(0.6228, 0.1953))
    assert p == tmp_path / "sub" / "rel.png"
    assert_png(p)
    # without metrics the summary comes from the bins themselves
    assert_png(save_reliability(REL, tmp_path / "bare.png", "bins only"))
    assert not list(tmp_path.rglob("*.tmp"))


def test_reliability_figure_layout():
    fig = reliability_figure(REL, "t", fake_metrics(0.6228, 0.1953))
    assert len(fig.axes) == 2
    w, h = fig.get_size_inches()
    assert (w, h) == (5, 6)
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert any("0.195 [0.18, 0.21]" in t and "0.623 [0.59, 0.65]" in t for t in texts)


def test_reliability_handles_empty_bins(tmp_path):
    only_one = reliability([0, 0, 7, 0], [None, None, 0.5, None], [None, None, 0.6, None])
    assert_png(save_reliability(only_one, tmp_path / "one.png", "one bin"), min_bytes=2_000)
    nothing = reliability([0, 0, 0], [None, None, None], [None, None, None])
    assert_png(save_reliability(nothing, tmp_path / "none.png", "no data"), min_bytes=2_000)


def test_reliability_from_compute_metrics(tmp_path):
    metrics = pytest.importorskip("llmcal.metrics")
    rng = np.random.default_rng(0)
    z = rng.normal(size=(200, 4)) * 3
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    y = rng.integers(0, 4, 200)
    m = metrics.compute_metrics(p, y, n_bootstrap=20, seed=0)
    assert_png(save_reliability(m["reliability"], tmp_path / "r.png", "random", m))


def test_reliability_rejects_malformed_data(tmp_path):
    bad = dict(REL, count=[1, 2])
    with pytest.raises(LlmcalError, match="count"):
        save_reliability(bad, tmp_path / "x.png", "bad")
    with pytest.raises(LlmcalError, match="confidence"):
        reliability_figure({k: v for k, v in REL.items() if k != "confidence"}, "bad")


def test_reliability_grid_with_none_cells(tmp_path):
    m = fake_metrics(0.62, 0.19)
    grid = [[("tulu / none", m), None, ("tulu / cft", m)],
            [None, ("vicuna / ts", REL)]]  # ragged row, bare reliability data
    p = reliability_grid(None, tmp_path / "grid.png", grid=grid, row_labels=["tulu", "vicuna"],
                         col_labels=["none", "ts", "cft"], title="study")
    assert_png(p, min_bytes=10_000)
    flat = reliability_grid([("a", m), None, ("c", m), ("d", m), ("e", m)], tmp_path / "flat.png", ncols=2)
    assert_png(flat, min_bytes=10_000)
    with pytest.raises(LlmcalError, match="nothing to plot"):
        reliability_grid(None, tmp_path / "empty.png", grid=[[None, None]])
    with pytest.raises(LlmcalError, match="row_labels"):
        reliability_grid(None, tmp_path / "x.png", grid=grid, row_labels=["only one"])


def test_accuracy_ece_plane(tmp_path):
    pts = [{"label": "tulu DPO", "accuracy": 0.6228, "conf_ece": 0.1953, "group": "aligned",
            "ci": {"accuracy": [0.6, 0.65], "conf_ece": [0.17, 0.22]}},
           {"label": "tulu CFT", "accuracy": 0.8341, "conf_ece": 0.0239, "group": "CFT"},
           {"label": "no group", "accuracy": 0.5, "conf_ece": 0.05}]
    assert_png(accuracy_ece_plane(pts, tmp_path / "plane.png", boundary=lambda a: max(0.0, a - 0.6)))
    with pytest.raises(LlmcalError):
        accuracy_ece_plane([], tmp_path / "none.png")
    with pytest.raises(LlmcalError, match="conf_ece"):
        accuracy_ece_plane([{"label": "x", "accuracy": 0.5}], tmp_path / "none.png")


# ---- tables ------------------------------------------------------------------------------
def test_results_rows_and_tables(tmp_path):
    run = make_run(tmp_path, "run-a", [result("none", fake_metrics(0.6228, 0.1953)),
                                       result("ts", fake_metrics(0.6228, 0.0412), png="reliability-ts.png",
                                              extra={"temperature": 2.5})], pngs=False)
    rows = results_rows([load_run(run)])
    assert [r["method"] for r in rows] == ["none", "ts"]
    a, b = rows
    assert a["run"] == "run-a" and a["model"] == "tiny-model" and a["split"] == "test" and a["n"] == 500
    assert a["accuracy"] == 0.6228 and a["accuracy_ci"] == [0.5912, 0.6531]
    assert b["temperature"] == 2.5 and "temperature" not in a
    assert b["reliability"] == str(run / "reliability-ts.png")

    md = markdown_table(rows, ["run", "method", "n", "accuracy", "conf_ece", "brier", "temperature"])
    lines = md.strip().splitlines()
    assert lines[0] == "| run | method | N | accuracy | conf-ECE | Brier | temperature |"
    assert lines[1] == "|---|---|---:|---:|---:|---:|---:|"
    assert lines[2] == "| run-a | none | 500 | 0.6228 [0.59, 0.65] | 0.1953 [0.18, 0.21] | 0.5432 | — |"
    assert lines[3] == "| run-a | ts | 500 | 0.6228 [0.59, 0.65] | 0.0412 [0.18, 0.21] | 0.5432 | 2.5000 |"

    nasty = [{"method": "<b>a|b</b>", "accuracy": 0.5, "accuracy_ci": None}]
    assert "&lt;b&gt;a|b&lt;/b&gt;" in html_table(nasty, ["method", "accuracy"])
    assert "<b>" not in html_table(nasty, ["method", "accuracy"])
    assert "a\\|b" in markdown_table(nasty, [("method", "Method"), "accuracy"])
    assert '<td class="num">0.5000</td>' in html_table(nasty, ["method", "accuracy"])

    # the reports' formatting: 3 significant digits, identity columns named once per run of equal values
    md = markdown_table(rows, ["run", "method", "accuracy", "conf_ece", "temperature"], sig=3, group=("run",))
    assert md.strip().splitlines()[2:] == ["| run-a | none | 0.623 [0.59, 0.65] | 0.195 [0.18, 0.21] | — |",
                                           "|  | ts | 0.623 [0.59, 0.65] | 0.0412 [0.18, 0.21] | 2.50 |"]


@pytest.mark.parametrize("value, signed, text", [
    (0.62283, False, "0.623"), (0.08623, False, "0.0862"), (0.5, False, "0.500"), (1.2345, False, "1.23"),
    (12.345, False, "12.3"), (1234.5, False, "1234"), (0.99961, False, "1.00"), (0.0, False, "0"),
    (0.0033333, True, "+0.00333"), (-0.14, True, "-0.140"), (0.0, True, "0"), (1e-12, False, "0.00000000000100"),
])
def test_format_number_keeps_three_significant_digits(value, signed, text):
    from llmcal.report.tables import format_number

    assert format_number(value, 3, signed=signed) == text


def test_format_value_with_sig_and_interval():
    from llmcal.report.tables import format_value

    assert format_value(0.0862, [0.0618, 0.148], sig=3) == "0.0862 [0.06, 0.15]"
    assert format_value(0.00333, [-0.03, 0.0333], signed=True, sig=3) == "+0.00333 [-0.030, 0.033]"
    assert format_value(0.6228, [0.5912, 0.6531]) == "0.6228 [0.59, 0.65]"  # without sig: as before
    assert format_value(500, sig=3) == "500" and format_value(None, sig=3) == "—"


# ---- per-run report -------------------------------------------------------------------
def test_run_report_before_metrics_json(tmp_path):
    rd = RunDir(tmp_path / "run")
    config = {"model": "tiny-model", "kind": "calibrate", "data": "mmlu", "split": "test", "template": "auto",
              "created": "2025-01-01T00:00:00+00:00"}
    rd.start(config)
    m = fake_metrics(0.6228, 0.1953, n_subjects=30)
    results = [result("none", m), result("ts", fake_metrics(0.6228, 0.0412), png="reliability-ts.png",
                                          extra={"temperature": 2.5})]
    p = write_run_report(rd.path, config, results, {"template": "chat", "device": "cpu"})
    assert p == rd.path / "report.md"
    assert not rd.file("metrics.json").exists() and not rd.is_complete
    text = p.read_text(encoding="utf-8")
    assert "tiny-model" in text and "calibrate" in text and "mmlu" in text and "2025-01-01" in text
    assert "auto (resolved: chat)" in text
    assert "| none | synthetic | test | 500 | 0.623 [0.59, 0.65] | 0.195 [0.18, 0.21] | 0.0876 |" in text
    assert "| 2.50 |" in text  # the temperature column
    assert (rd.path / "report.html").is_file()
    # 30 subjects: the ten best and the ten worst only
    assert "30 subjects" in text
    assert "subject_29" in text and "subject_00" in text and "subject_15" not in text
    assert "](reliability.png)" in text and "](reliability-ts.png)" in text
    assert "conf-ECE" in text and "Definitions" in text


def test_run_report_short_per_subject_table(tmp_path):
    results = [result("none", fake_metrics(0.6, 0.2, n_subjects=4), png=None)]
    text = write_run_report(tmp_path, {"model": {"name": "m", "kind": "hf"}}, results).read_text()
    assert all(f"subject_{i:02d}" in text for i in range(4))
    assert "name=m, kind=hf" in text
    # no diagram of the run's own: only the verdict's, drawn from the metrics
    assert re.findall(r"\]\(([^)]+)\)", text) == ["verdict-reliability.png"]
    # a diagram the results name but that is not on disk: linked in report.md, said missing in report.html
    results = [result("none", fake_metrics(0.6, 0.2, n_subjects=4), png="gone.png")]
    write_run_report(tmp_path, {"model": "m"}, results)
    assert "<code>gone.png</code> is missing" in (tmp_path / "report.html").read_text()


# ---- comparison -------------------------------------------------------------------------
def test_comparison_writes_md_grid_and_selfcontained_html(tmp_path):
    a = make_run(tmp_path, "tulu-dpo", [result("none", fake_metrics(0.6228, 0.1953))])
    # the second run has no PNG on disk: the comparison draws it from the metrics
    b = make_run(tmp_path, "tulu-cft", [result("cft", fake_metrics(0.8341, 0.0239, acc_ci=(0.81, 0.86),
                                                                    ece_ci=(0.0151, 0.0342)))], pngs=False)
    out = tmp_path / "cmp"
    paths = write_comparison([a, b], out)
    assert paths["md"] == out / "report.md" and paths["html"] == out / "report.html"
    assert paths["grid"] == out / "reliability_grid.png"
    assert_png(paths["grid"], min_bytes=10_000)
    drawn = [p for k, p in paths.items() if k.startswith("diagram:")]
    assert len(drawn) == 1 and drawn[0].parent == out
    assert_png(drawn[0])

    md = paths["md"].read_text(encoding="utf-8")
    assert "| run | method | dataset | split | N | accuracy | conf-ECE | cw-ECE | Brier | NLL |" in md
    assert "| tulu-dpo | none | synthetic | test | 500 | 0.623 [0.59, 0.65] | 0.195 [0.18, 0.21] | 0.0876 " \
           "| 0.543 | 1.23 |" in md
    assert "| tulu-cft | cft | synthetic | test | 500 | 0.834 [0.81, 0.86] | 0.0239 [0.015, 0.034] |" in md
    assert "](../tulu-dpo/reliability.png)" in md
    assert f"]({drawn[0].name})" in md and "](reliability_grid.png)" in md

    page = paths["html"].read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    assert "<link" not in page and 'src="http' not in page and "url(" not in page and "<script" not in page
    srcs = re.findall(r'src="([^"]*)"', page)
    assert len(srcs) == 3  # the grid and two diagrams
    assert all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "0.623 [0.59, 0.65]" in page and "0.834 [0.81, 0.86]" in page


def test_comparison_duplicate_names_and_extras(tmp_path):
    a = make_run(tmp_path / "x", "run", [result("ts", fake_metrics(0.5, 0.1), extra={"temperature": 1.5})])
    b = make_run(tmp_path / "y", "run", [result("none", fake_metrics(0.5, 0.2))])
    md = write_comparison([a, b], tmp_path / "cmp")["md"].read_text(encoding="utf-8")
    assert "| x/run | ts |" in md and "| y/run | none |" in md
    assert "temperature" in md and "| 1.50 |" in md


def test_comparison_rejects_incomplete_or_missing_runs(tmp_path):
    good = make_run(tmp_path, "good", [result("none", fake_metrics(0.5, 0.1))])
    half = make_run(tmp_path, "half", [result("none", fake_metrics(0.5, 0.1))], finish=False)
    with pytest.raises(LlmcalError, match=re.escape(str(half))):
        write_comparison([good, half], tmp_path / "cmp")
    missing = tmp_path / "nope"
    with pytest.raises(LlmcalError, match=re.escape(str(missing))):
        write_comparison([good, missing], tmp_path / "cmp")
    with pytest.raises(LlmcalError):
        write_comparison([], tmp_path / "cmp")
    assert not (tmp_path / "cmp" / "report.md").exists()


def test_metrics_json_roundtrip_keeps_none_bins(tmp_path):
    run = make_run(tmp_path, "r", [result("none", fake_metrics(0.5, 0.1))], pngs=False)
    doc = json.loads((run / "metrics.json").read_text())
    assert doc["results"][0]["metrics"]["reliability"]["accuracy"][0] is None
    paths = write_comparison([run], tmp_path / "cmp")
    assert_png(paths["grid"])


def test_run_report_takes_created_from_config_json(tmp_path):
    rd = RunDir(tmp_path / "run")
    config = {"model": "m", "kind": "eval", "data": "d"}
    rd.start(config)
    created = json.loads(rd.file("config.json").read_text())["created"]
    text = write_run_report(rd.path, config, [result("none", fake_metrics(0.5, 0.1))]).read_text()
    assert f"**created**: {created}" in text


# ---- selective prediction in the run report ------------------------------------------------
def _preds_file(path: Path, conf_correct: list[tuple[float, bool]]) -> Path:
    """Two-option predictions whose confidence and correctness are given (answer 0; wrong ones predict 1)."""
    rows = []
    for i, (c, ok) in enumerate(conf_correct):
        probs = [c, 1 - c] if ok else [1 - c, c]
        rows.append({"id": f"q{i}", "subject": None, "answer": 0, "probs": probs, "pred": 0 if ok else 1,
                     "conf": c, "logits": [float(np.log(probs[0])), float(np.log(probs[1]))]})
    return atomic_write_jsonl(path, rows)


def test_run_report_risk_coverage_from_predictions_by_hand(tmp_path):
    # confidences 0.9 C, 0.8 C, 0.7 W, 0.6 C, 0.55 W: selective risks of the top k are 0, 0, 1/3, 1/4, 2/5
    _preds_file(tmp_path / "predictions-test.jsonl", [(0.9, True), (0.8, True), (0.7, False), (0.6, True),
                                                      (0.55, False)])
    # a run recorded before llmcal computed AURC: the numbers come from its predictions file
    res = RunResult(label="none", method="none", dataset="synthetic", split="test",
                    predictions="predictions-test.jsonl", metrics=fake_metrics(0.6, 0.2), reliability=None)
    text = write_run_report(tmp_path, {"model": "m", "kind": "eval"}, [res]).read_text(encoding="utf-8")
    aurc = (0 + 0 + 1 / 3 + 1 / 4 + 2 / 5) / 5
    assert "## Selective prediction" in text
    # accuracy at 80% = top 4 (3 right), at 50% = top ceil(2.5) = 3 (2 right)
    assert f"| none | synthetic | 500 | 0.600 [0.59, 0.65] | {fmt(aurc)} | 0.750 | 0.667 |" in text
    assert "](risk-coverage.png)" in text
    assert_png(tmp_path / "risk-coverage.png", min_bytes=3_000)


def test_run_report_risk_coverage_one_curve_per_result(tmp_path, monkeypatch):
    metrics = pytest.importorskip("llmcal.metrics")
    rng = np.random.default_rng(1)
    results, want = [], {}
    for label, role in (("none", "test"), ("none", "ood"), ("ts", "test")):
        conf = rng.uniform(0.3, 1.0, 60)
        ok = rng.uniform(size=60) < conf
        f = _preds_file(tmp_path / f"predictions-{label}-{role}.jsonl", list(zip(conf, ok)))
        from llmcal.predictions import load_predictions, stack_probs

        p, a = stack_probs(load_predictions(f))
        m = metrics.compute_metrics(p, a, n_bootstrap=30, seed=0)
        want[(label, role)] = m
        results.append(RunResult(label=label, method=label, dataset=role, split="test", predictions=f.name,
                                 metrics=m, reliability=None))
    drawn = []
    import llmcal.report.plots as plots

    real = plots.risk_coverage_plot
    monkeypatch.setattr(plots, "risk_coverage_plot", lambda curves, path, **kw: drawn.append(
        [(n, c["aurc"]) for n, c in curves]) or real(curves, path, **kw))
    text = write_run_report(tmp_path, {"model": "m"}, results).read_text(encoding="utf-8")
    # labels that repeat name their dataset; each curve is its own file's
    assert drawn == [[("none (test)", pytest.approx(want[("none", "test")]["aurc"], abs=1e-12)),
                      ("none (ood)", pytest.approx(want[("none", "ood")]["aurc"], abs=1e-12)),
                      ("ts", pytest.approx(want[("ts", "test")]["aurc"], abs=1e-12))]]
    m = want[("none", "ood")]
    lo, hi = m["ci"]["aurc"]
    assert (f"| none (ood) | ood | 60 | {fmt(m['accuracy'], m['ci']['accuracy'])} | {fmt(m['aurc'], [lo, hi])} | "
            f"{fmt(m['acc_at_80'])} | {fmt(m['acc_at_50'])} |") in text
    assert_png(tmp_path / "risk-coverage.png")


def test_run_report_without_predictions_or_selective_numbers(tmp_path):
    # metrics carry AURC but the predictions file is gone: the numbers stay, no curve is drawn
    m = dict(fake_metrics(0.5, 0.1), aurc=0.321, acc_at_80=0.55, acc_at_50=0.6)
    res = RunResult(label="none", method="none", dataset="d", split="test", predictions="predictions.jsonl",
                    metrics=m)
    text = write_run_report(tmp_path, {"model": "m"}, [res]).read_text(encoding="utf-8")
    assert "| none | d | 500 | 0.500 [0.59, 0.65] | 0.321 | 0.550 | 0.600 |" in text
    assert "risk-coverage.png" not in text and not (tmp_path / "risk-coverage.png").exists()
    # neither numbers nor a file: no section at all
    text = write_run_report(tmp_path, {"model": "m"}, [result("none", fake_metrics(0.5, 0.1), png=None)]).read_text()
    assert "Selective prediction" not in text


def test_eval_run_report_shows_risk_coverage(tiny_model_dir, tmp_path):
    from llmcal.evaluate import EvalConfig, run_eval

    cfg = EvalConfig(model=str(tiny_model_dir), data="synthetic:arithmetic?n=12", template="plain", n_bootstrap=20)
    rec = run_eval(cfg, tmp_path / "run", progress=False)
    text = (rec.path / "report.md").read_text(encoding="utf-8")
    m = rec.results[0].metrics
    assert "## Selective prediction" in text and f"| {fmt(m['aurc'])} [" in text
    assert "](risk-coverage.png)" in text
    assert_png(rec.path / "risk-coverage.png")
    # one result, no method: the verdict is the model's confidence alone, beside its reliability diagram
    box = text[text.index("## Verdict"):text.index("## Results")]
    assert re.search(r"^- (Over|Under|Neither)", box.split("\n\n")[1]) and "](verdict-reliability.png)" in box
    assert "verdict-pareto.png" not in box and (rec.path / "report.html").is_file()


# ---- the verdict ---------------------------------------------------------------------------
def test_keeps_accuracy_rule_and_the_pick():
    from llmcal.report.verdict import Option, decide, keeps_accuracy, pareto_front

    def opt(label, ece, change, ci, acc=0.5):
        return Option(label=label, accuracy=acc + change, conf_ece=ece, accuracy_change=change,
                      accuracy_change_ci=ci)

    assert keeps_accuracy(opt("ts", 0.05, 0.0, (0.0, 0.0)))  # keeps every answer
    assert keeps_accuracy(opt("vector", 0.05, 0.0033, (-0.03, 0.03)))  # 0 inside
    assert keeps_accuracy(opt("up", 0.05, 0.05, (0.01, 0.09)))  # better
    assert not keeps_accuracy(opt("matrix", 0.01, -0.14, (-0.30, 0.0)))  # ends at 0: a loss (issue 20)
    assert not keeps_accuracy(opt("down", 0.01, -0.05, (-0.09, -0.01)))
    assert keeps_accuracy(opt("no-ci", 0.05, 0.0, None)) and not keeps_accuracy(opt("no-ci", 0.05, -0.01, None))
    assert not keeps_accuracy(Option(label="unknown", conf_ece=0.01))

    base = Option(label="none", accuracy=0.5, conf_ece=0.2, mean_conf=0.8)
    opts = [opt("ts", 0.05, 0.0, (0.0, 0.0)), opt("matrix", 0.01, -0.14, (-0.30, 0.0)),
            opt("vector", 0.04, 0.0033, (-0.03, 0.03))]
    v = decide("in-domain", base, opts, gap_ci=(0.25, 0.35))
    assert v.pick.label == "vector" and [o.label for o in v.costly] == ["matrix"]
    assert v.gap == pytest.approx(0.3)
    # the front: matrix (lowest conf-ECE) and vector (highest accuracy); ts and none are beaten by vector
    assert [o.label for o in pareto_front([base, *opts])] == ["matrix", "vector"]
    # nothing beats the base without costing accuracy: keep it
    assert decide("x", Option(label="none", accuracy=0.5, conf_ece=0.005, mean_conf=0.5), opts).pick is None


def _three_option_file(path: Path, n_right: int, n: int, conf: float) -> Path:
    rows = []
    for i in range(n):
        ok = i < n_right
        rest = (1 - conf) / 2
        probs = [conf, rest, rest] if ok else [rest, conf, rest]
        rows.append({"id": f"q{i}", "subject": None, "answer": 0, "probs": probs, "pred": 0 if ok else 1,
                     "conf": conf, "logits": [float(np.log(p)) for p in probs]})
    return atomic_write_jsonl(path, rows)


def test_run_report_opens_with_the_verdict_and_never_picks_a_method_that_costs_accuracy(tmp_path):
    from llmcal.metrics import compute_metrics
    from llmcal.predictions import load_predictions, stack_probs

    run = tmp_path / "run"
    run.mkdir()
    # none: accuracy 0.6 at confidence 0.9; ts: the same answers at 0.65; "matrix": 30 right answers lost,
    # confidence 0.45 = its accuracy, so the lowest conf-ECE of all
    results = []
    for label, right, conf in (("none", 120, 0.9), ("ts", 120, 0.65), ("matrix", 90, 0.45)):
        f = _three_option_file(run / f"predictions-{label}.jsonl", right, 200, conf)
        p, a = stack_probs(load_predictions(f))
        m = compute_metrics(p, a, n_bootstrap=100, seed=0)
        save_reliability(m["reliability"], run / f"reliability-{label}.png", label, m)
        results.append(RunResult(label=label, method=label, dataset="synthetic", split="test",
                                 predictions=f.name, metrics=m, reliability=f"reliability-{label}.png"))
    config = {"model": "m", "kind": "calibrate", "method": "ts", "n_bootstrap": 100, "seed": 0}
    md = write_run_report(run, config, results).read_text(encoding="utf-8")
    box = md[md.index("## Verdict"):md.index("## Results")]
    assert md.index("# llmcal run") < md.index("## Verdict") < md.index("- **model**")
    assert box.startswith("## Verdict\n\n- Overconfident by 0.300 [")
    assert "mean confidence 0.900 against accuracy 0.600 on 200 questions" in box
    # what the pick buys: conf-ECE before and after, each with its interval
    assert re.search(r"Use \*\*ts\*\*: conf-ECE 0\.300 \[0\.\d+, 0\.\d+\] → 0\.0500 \[", box), box
    assert "at accuracy change 0 [0.00, 0.00]" in box
    assert "Left out for costing accuracy although their conf-ECE is lower: matrix (" in box
    assert re.search(r"matrix \([0-9.e-]+ at accuracy change -0\.150 \[-0\.\d+, -0\.\d+\]\)", box), box
    assert "](verdict-pareto.png)" in box and "](verdict-reliability.png)" in box
    assert_png(run / "verdict-pareto.png")
    assert_png(run / "verdict-reliability.png")
    page = (run / "report.html").read_text(encoding="utf-8")
    assert page.index('id="verdict"') < page.index("<h2>Results</h2>")
    assert len(re.findall(r'src="data:image/png;base64,', page)) == len(re.findall(r"<img ", page)) >= 5
    assert not re.search(r'src="(?!data:)', page) and "<script" not in page

    # without the predictions: the change comes from the accuracies (no interval), the rule still holds
    for f in run.glob("predictions-*.jsonl"):
        f.unlink()
    box = write_run_report(run, config, results).read_text(encoding="utf-8")
    box = box[box.index("## Verdict"):box.index("## Results")]
    assert "Use **ts**" in box and "Overconfident by 0.300 (" not in box and "Overconfident by 0.300:" in box
