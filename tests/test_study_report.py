"""The study report: the engine's templates (Markdown and self-contained HTML), the verdict box, and the
three defects of issue 20 on a tiny study (the diagnosis that said "no fine-tuning cell" with two, the drift
column of dashes, a pick that cost accuracy); the paper's numbers from their data file, and RESULTS.md."""
from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path

import pytest

from llmcal.report.engine import Document
from llmcal.study import paper_numbers, run_study, write_report, write_results_md

ARITH = "synthetic:arithmetic?difficulty=1&n=120"


def test_blocks_render_as_markdown_and_html(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1, 1))
    ax.plot([0, 1], [0, 1])
    fig.savefig(tmp_path / "fig.png")
    plt.close(fig)

    d = Document(tmp_path, "study <x>")
    d.h(1, "llmcal study `x`")
    d.p("A **bold** claim, an *aside* and 3 * 4 < 5 & 'quotes'.")
    d.ul(["**one**: `a`", "two"])
    d.ul([])  # nothing to list: no block
    d.table([{"model": "m", "accuracy": 0.5}, {"model": "m", "accuracy": 0.123456}],
            [("model", "model"), ("accuracy", "accuracy")], group=("model",))
    d.img("fig.png", 'a "figure"', "Its *caption*.")
    d.markdown_section("Some *text*.\n\n| a | b |\n|---|---|\n| 1 | <i>2</i> |\n")
    md = d.markdown()
    assert md == ("# llmcal study `x`\n\n"
                  "A **bold** claim, an *aside* and 3 * 4 < 5 & 'quotes'.\n\n"
                  "- **one**: `a`\n- two\n\n"
                  "| model | accuracy |\n|---|---:|\n| m | 0.500 |\n|  | 0.123 |\n\n"
                  "![a \"figure\"](fig.png)\n\n*Its *caption*.*\n\n"
                  "Some *text*.\n\n| a | b |\n|---|---|\n| 1 | <i>2</i> |\n"), md
    page = d.html()
    assert page.startswith("<!DOCTYPE html>") and page.endswith("</html>\n")
    assert "<title>study &lt;x&gt;</title>" in page and "<style>" in page and "border-collapse" in page
    assert "<h1>llmcal study <code>x</code></h1>" in page
    assert "<p>A <strong>bold</strong> claim, an <em>aside</em> and 3 * 4 &lt; 5 &amp; 'quotes'.</p>" in page
    assert "<ul><li><strong>one</strong>: <code>a</code></li><li>two</li></ul>" in page
    # the model named once: its cell spans both rows
    assert '<td rowspan="2">m</td><td class="num">0.500</td></tr>\n<tr><td class="num">0.123</td>' in page
    assert 'alt="a &#34;figure&#34;" src="data:image/png;base64,' in page
    assert "<figcaption>Its <em>caption</em>.</figcaption>" in page
    # a Markdown section: its table rendered, raw HTML in it shown as text
    assert "<td>1</td>" in page and "&lt;i&gt;2&lt;/i&gt;" in page and "<i>2</i>" not in page
    # self-contained: every image inline, nothing linked
    assert not re.search(r'src="(?!data:)', page) and "<link" not in page


# ---- a tiny study: none, ts, cft and the post-hoc calibrators, regime off, drift off -----------------------
@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory, tiny_model_dir) -> Path:
    root = tmp_path_factory.mktemp("study-report")
    cfg = root / "tiny.yaml"
    cfg.write_text(f"""
name: tiny
seed: 0
defaults: {{dtype: float32, device: cpu, template: plain, n_bootstrap: 50}}
models:
  tiny: {{model: "{tiny_model_dir}"}}
data:
  train: {{spec: "{ARITH}", split: train, limit: 24}}
  test: {{spec: "{ARITH}", split: test, limit: 20}}
methods:
  none: {{}}
  ts: {{}}
  cft: {{epochs: 1, batch_size: 4, lr: 0.001, drift: false, save_steps: 100}}
regime: false
""", encoding="utf-8")
    out = root / "study"
    run_study(cfg, out, progress=False)
    return out


def _copy(study: Path, tmp_path: Path) -> tuple[Path, dict]:
    dst = tmp_path / "study"
    shutil.copytree(study, dst)
    return dst, json.loads((dst / "study.json").read_text())


def _verdict_md(md: str) -> str:
    return md[md.index("## Verdict"):md.index("## Results")]


def test_the_report_opens_with_the_verdict(tiny_study):
    md = (tiny_study / "report.md").read_text()
    doc = json.loads((tiny_study / "study.json").read_text())
    # the title, then the verdict box, then the header and the tables
    assert md.index("# llmcal study `tiny`") < md.index("## Verdict") < md.index("- **config**") \
        < md.index("## Results")
    box = _verdict_md(md)
    none = next(c for c in doc["cells"] if c["name"] == "tiny/none")["results"]["test"]
    assert re.search(r"\*\*in-domain\*\*: (Over|Under|Neither)", box), box
    assert "Use **" in box or "Keep the model as it is" in box
    assert "](verdict-pareto.png)" in box and "](verdict-reliability.png)" in box
    for png in ("verdict-pareto.png", "verdict-reliability.png"):
        assert (tiny_study / png).stat().st_size > 5_000
    assert doc["figures"]["verdict:pareto"] == "verdict-pareto.png"
    # 3 significant digits, and one model: named in the header, not in every row
    acc = none["accuracy"]
    assert f"| none | {_sig3(acc)} [" in md and "| tiny | none |" not in md
    assert "- **model**: tiny = `" in md
    page = (tiny_study / "report.html").read_text()
    assert page.index('id="verdict"') < page.index("<h2>Results")
    assert not re.search(r'src="(?!data:)', page) and "<script" not in page


def _sig3(x: float) -> str:
    from llmcal.report.tables import format_number

    return format_number(x, 3)


def test_regime_off_is_said_and_not_called_a_missing_fine_tuning_cell(tiny_study):
    # issue 20: "No diagnosis: the study has no fine-tuning cell" in a study with two (the demo, regime: false)
    md = (tiny_study / "report.md").read_text()
    section = md[md.index("## Regime diagnosis"):md.index("## Sizes and time")]
    assert "no fine-tuning cell" not in section
    assert "Off (`regime: false` in the study config): the fine-tuning cells (cft) were not diagnosed" in section
    assert "`regime: {from: cft}`" in section


def test_no_drift_column_without_drift_data(tiny_study, tmp_path):
    # issue 20: the header described a drift column that showed only dashes (drift: false everywhere)
    md = (tiny_study / "report.md").read_text()
    results = md[md.index("## Results"):md.index("### In-domain")]
    assert "drift (KL)" not in results and "alignment drift" not in results
    # with a measured drift the column and its description are back
    dst, doc = _copy(tiny_study, tmp_path)
    next(c for c in doc["cells"] if c["name"] == "tiny/cft")["alignment_drift"] = 0.00181
    write_report(doc, dst)
    results = (dst / "report.md").read_text()
    results = results[results.index("## Results"):results.index("### In-domain")]
    assert "drift (KL)" in results and "alignment drift" in results
    assert re.search(r"^\| cft \|.*\| 0\.00181 \|$", results, re.M), results
    assert re.search(r"^\| none \|.*\| — \|$", results, re.M), results


def test_a_method_that_costs_accuracy_is_never_the_pick(tiny_study, tmp_path):
    # issue 20: the "lowest conf-ECE" pick was matrix scaling at an accuracy change of -0.140 [-0.30, 0.00]
    dst, doc = _copy(tiny_study, tmp_path)
    entry = doc["posthoc"]["entries"][0]
    matrix = entry["methods"]["matrix"]["results"]["test"]
    lowest = min(c["results"]["test"]["conf_ece"] for c in doc["cells"] if c.get("results", {}).get("test"))
    matrix.update(conf_ece=lowest / 10, accuracy_change=-0.14)
    matrix["ci"] = {**matrix["ci"], "accuracy_change": [-0.30, 0.0], "conf_ece": [0.0, lowest / 5]}
    write_report(doc, dst)
    md = (dst / "report.md").read_text()
    box = _verdict_md(md)
    assert "Use **matrix**" not in box
    assert "Left out for costing accuracy although their conf-ECE is lower: matrix" in box
    assert "-0.140 [-0.30, 0.00]" in box
    picks = md[md.index("Lowest conf-ECE per model and domain"):md.index("## Selective prediction")]
    assert "**tiny, in-domain**:" in picks and "Use **matrix**" not in picks
    # and studies/RESULTS.md's pick (study.posthoc.best_rows) follows the same rule
    from llmcal.study.posthoc import best_rows

    rows = [r for r in best_rows(doc) if r.startswith("**tiny, in-domain**")]
    assert len(rows) == 1 and ": matrix, conf-ECE" not in rows[0], rows
    assert "left out for costing accuracy: matrix" in rows[0] and "-0.140 [-0.300, 0.000]" in rows[0], rows

    # the same change with an interval that has 0 inside keeps accuracy: then matrix is the pick
    matrix["ci"]["accuracy_change"] = [-0.30, 0.05]
    write_report(doc, dst)
    assert "Use **matrix**" in _verdict_md((dst / "report.md").read_text())
    assert any(r.startswith("**tiny, in-domain**: matrix, conf-ECE") for r in best_rows(doc))


def test_a_study_without_any_fine_tuning_or_with_a_failed_regime_cell_says_so(tiny_study, tmp_path):
    from llmcal.study.report import _no_diagnosis

    doc = json.loads((tiny_study / "study.json").read_text())
    only_posthoc = copy.deepcopy(doc)
    only_posthoc["cells"] = [c for c in doc["cells"] if c["kind"] not in ("cft", "rcft", "auto")]
    assert "has no fine-tuning cell" in _no_diagnosis(only_posthoc)
    on = copy.deepcopy(doc)
    on["config"]["regime"] = {"from": "cft"}
    on["cells"].append({"name": "tiny/regime", "kind": "regime", "status": "failed", "error": "boom"})
    assert _no_diagnosis(on) == "No diagnosis yet: tiny/regime is failed (boom)."
    del on["config"]["regime"]
    on["cells"].pop()
    assert "`regime.from` names none of the study's fine-tuning methods" in _no_diagnosis(on)


def test_paper_numbers_come_from_the_data_file():
    paper = paper_numbers()
    assert set(paper) == {"Llama-3.1-8B-Tulu (DPO)", "Vicuna-7B", "Mistral-7B (DPO)", "OLMo2-7B (DPO)"}
    assert paper["Llama-3.1-8B-Tulu (DPO)"]["none"] == {"conf_ece": 0.1953, "accuracy": 0.6228}
    assert paper["OLMo2-7B (DPO)"]["rcft"] == {"accuracy": 0.851}
    paper["Vicuna-7B"]["none"]["conf_ece"] = 1.0  # a caller's copy: the next call is unchanged
    assert paper_numbers()["Vicuna-7B"]["none"]["conf_ece"] == 0.1422


def _result(acc: float, ece: float, mean_conf: float) -> dict:
    return {"n": 100, "accuracy": acc, "conf_ece": ece, "cw_ece": ece / 2, "mean_conf": mean_conf,
            "ci": {"accuracy": [acc - 0.1, acc + 0.1]}}


def test_results_md_from_a_study_json(tmp_path):
    study = tmp_path / "s"
    study.mkdir()
    cells = [{"name": "m/none", "model": "m", "method": "none", "kind": "none", "point": "", "run": "runs/m/none",
              "status": "complete", "results": {"test": _result(0.4, 0.2, 0.6)}},
             {"name": "m/ts", "model": "m", "method": "ts", "kind": "ts", "point": "", "run": "runs/m/ts",
              "status": "complete", "results": {"test": _result(0.4, 0.05, 0.42)}}]
    doc = {"name": "s", "description": "", "models": {"m": {"model": "some/model"}}, "points": [""],
           "methods": {"none": {"method": "none"}, "ts": {"method": "ts"}}, "cells": cells, "diagnoses": [],
           "data": {"": {"test": {"n": 100, "options": [4]}}}, "wall_s_total": 75.0, "figures": {}}
    (study / "study.json").write_text(json.dumps(doc))
    text = write_results_md([study], tmp_path / "RESULTS.md", paper_numbers={"P": {"none": {"conf_ece": 0.3}}}
                            ).read_text()
    assert "## The paper's numbers" in text and "| paper: P | 0.3000 |" in text
    assert "## Study `s`" in text and "total wall time 1m15s" in text and "test 100" in text
    assert "m: in-domain accuracy 0.400; chance is 0.25 with 4 options; conf-ECE 0.200, mean confidence 0.600 " \
           "(overconfident); the paper's aligned models start at conf-ECE 0.30–0.30." in text
    assert "m, ts: in-domain conf-ECE 0.200 → 0.050, accuracy unchanged." in text
    assert "<!-- prose:study:s -->" in text
