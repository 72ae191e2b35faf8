"""The study report's templates (Markdown and self-contained HTML), the paper's numbers from their data file,
and RESULTS.md from a study.json."""
from __future__ import annotations

import json
import re

from llmcal.study import paper_numbers, write_results_md
from llmcal.study.report import _Doc


def test_blocks_render_as_markdown_and_html(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1, 1))
    ax.plot([0, 1], [0, 1])
    fig.savefig(tmp_path / "fig.png")
    plt.close(fig)

    d = _Doc(tmp_path)
    d.h(1, "llmcal study `x`")
    d.p("A **bold** claim, an *aside* and 3 * 4 < 5 & 'quotes'.")
    d.ul(["**one**: `a`", "two"])
    d.ul([])  # nothing to list: no block
    d.table([{"model": "m", "accuracy": 0.5}], [("model", "model"), ("accuracy", "accuracy")])
    d.img("fig.png", 'a "figure"', "Its *caption*.")
    md = d.markdown()
    assert md == ("# llmcal study `x`\n\n"
                  "A **bold** claim, an *aside* and 3 * 4 < 5 & 'quotes'.\n\n"
                  "- **one**: `a`\n- two\n\n"
                  "| model | accuracy |\n|---|---:|\n| m | 0.5000 |\n\n"
                  "![a \"figure\"](fig.png)\n\n*Its *caption*.*\n"), md
    page = d.html("study <x>")
    assert page.startswith("<!DOCTYPE html>") and page.endswith("</html>\n")
    assert "<title>study &lt;x&gt;</title>" in page and "<style>" in page and "border-collapse" in page
    assert "<h1>llmcal study <code>x</code></h1>" in page
    assert "<p>A <b>bold</b> claim, an <i>aside</i> and 3 * 4 &lt; 5 &amp; &#39;quotes&#39;.</p>" in page
    assert "<ul><li><b>one</b>: <code>a</code></li><li>two</li></ul>" in page
    assert "<table" in page and "0.5000" in page
    assert 'alt="a &#34;figure&#34;" src="data:image/png;base64,' in page
    assert "<figcaption>Its <i>caption</i>.</figcaption>" in page
    # self-contained: every image inline, nothing linked
    assert not re.search(r'src="(?!data:)', page) and "<link" not in page


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
