"""report.html in a real headless browser (Debian's chromium, `make chromium`): every image loads and the
verdict box, with the before/after reliability diagram beside it, is in the first screen; for a run, a study
and a post-hoc comparison (``llmcal calibrate --from RUN``).

The report itself holds no script; the test opens a copy with a small script appended that measures the
page once it has loaded (images decoded, layout done) and writes what it found into the DOM, which
``chromium --headless --dump-dom`` prints.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from llmcal.runs import RunResult
from test_posthoc_compare import costly_matrix_run  # the comparison whose lowest conf-ECE costs accuracy
from test_report import _three_option_file  # the same three-method run the report tests build

# The first screen: a common laptop screen (the page gets it less the window's frame).
WIDTH, HEIGHT = 1366, 768

PROBE = """
<script>
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var box = document.getElementById("verdict");
  var out = {images: imgs.map(function (im) {
               return {alt: im.alt, complete: im.complete, width: im.naturalWidth, height: im.naturalHeight,
                       top: im.getBoundingClientRect().top}; }),
             viewport: [window.innerWidth, window.innerHeight]};
  if (box) {
    var r = box.getBoundingClientRect(), st = getComputedStyle(box);
    out.verdict = {top: r.top, bottom: r.bottom, left: r.left, right: r.right, display: st.display,
                   visibility: st.visibility, text: box.innerText};
    var side = document.querySelector("section.top .side img");
    if (side) { var s = side.getBoundingClientRect(); out.side = {top: s.top, left: s.left, alt: side.alt}; }
  }
  var pre = document.createElement("pre");
  pre.id = "llmcal-probe";
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>
"""

# Flags that keep chromium from waiting on a desktop session (D-Bus, keyring, first-run, updates).
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-zygote", "--no-first-run", "--hide-scrollbars",
         "--disable-background-networking", "--disable-extensions", "--disable-component-update", "--disable-sync",
         "--password-store=basic", "--use-mock-keychain", "--disable-features=MediaRouter,DialMediaRouteProvider",
         f"--window-size={WIDTH},{HEIGHT}"]


def chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    pytest.fail("chromium is not installed: run `make chromium` (Debian's chromium package, which the browser "
                "test of report.html needs)", pytrace=False)


def probe(page: Path, tmp_path: Path) -> dict:
    """Open a copy of ``page`` with the probe appended in headless chromium; the probe's findings."""
    html = page.read_text(encoding="utf-8")
    assert "<script" not in html  # the report itself runs nothing
    copy = page.with_name("probe-" + page.name)
    copy.write_text(html.replace("</body>", PROBE + "</body>"), encoding="utf-8")
    cmd = [chromium(), *FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}", "--dump-dom", copy.as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**os.environ, "LANG": "C.UTF-8"})
    m = re.search(r'<pre id="llmcal-probe">(.*?)</pre>', proc.stdout, re.S)
    assert m, f"chromium printed no probe (exit {proc.returncode}): {proc.stderr[-2000:]}"
    import html as _html

    return json.loads(_html.unescape(m.group(1)))


def check_first_screen(found: dict) -> None:
    # the window's own frame takes part of --window-size: the first screen is what the page gets
    width, height = found["viewport"]
    assert width == WIDTH and 0.75 * HEIGHT <= height <= HEIGHT, found["viewport"]
    assert found["images"], "no images"
    for im in found["images"]:
        assert im["complete"] and im["width"] > 0 and im["height"] > 0, f"image did not load: {im}"
    v = found.get("verdict")
    assert v, "no verdict box"
    assert v["display"] != "none" and v["visibility"] == "visible"
    assert 0 <= v["top"] < height / 3 and v["bottom"] > v["top"], v  # it opens the page
    assert re.search(r"(Overconfident|Underconfident|Neither over- nor underconfident)", v["text"])
    side = found.get("side")
    assert side and side["top"] < height / 3 and side["left"] >= v["right"], side  # beside the box, on screen


def test_run_report_in_headless_chromium(tmp_path):
    from llmcal.metrics import compute_metrics
    from llmcal.predictions import load_predictions, stack_probs
    from llmcal.report import save_reliability, write_run_report

    run = tmp_path / "run"
    run.mkdir()
    results = []
    for label, right, conf in (("none", 120, 0.9), ("ts", 120, 0.65), ("matrix", 90, 0.45)):
        f = _three_option_file(run / f"predictions-{label}.jsonl", right, 200, conf)
        p, a = stack_probs(load_predictions(f))
        m = compute_metrics(p, a, n_bootstrap=50, seed=0)
        save_reliability(m["reliability"], run / f"reliability-{label}.png", label, m)
        results.append(RunResult(label=label, method=label, dataset="synthetic", split="test",
                                 predictions=f.name, metrics=m, reliability=f"reliability-{label}.png"))
    write_run_report(run, {"model": "m", "kind": "calibrate", "method": "ts", "n_bootstrap": 50}, results)
    found = probe(run / "report.html", tmp_path)
    check_first_screen(found)
    assert "Use ts" in found["verdict"]["text"]
    # the diagrams, the Pareto plot and the risk-coverage curves: every image of the page
    assert len(found["images"]) == 3 + 2 + 1


def test_study_report_in_headless_chromium(tmp_path, tiny_model_dir):
    from llmcal.study import run_study

    cfg = tmp_path / "s.yaml"
    cfg.write_text(f"""
name: tiny
seed: 0
defaults: {{dtype: float32, device: cpu, template: plain, n_bootstrap: 30}}
models:
  tiny: {{model: "{tiny_model_dir}"}}
data:
  train: {{spec: "synthetic:arithmetic?difficulty=1&n=120", split: train, limit: 24}}
  test: {{spec: "synthetic:arithmetic?difficulty=1&n=120", split: test, limit: 20}}
methods:
  none: {{}}
  ts: {{}}
""", encoding="utf-8")
    paths = run_study(cfg, tmp_path / "study", progress=False)
    found = probe(paths["html"], tmp_path)
    check_first_screen(found)
    alts = [im["alt"] for im in found["images"]]
    assert "reliability diagram before and after" in alts and "accuracy against conf-ECE: the Pareto front" in alts


def test_posthoc_comparison_report_in_headless_chromium(tmp_path, monkeypatch):
    from llmcal.posthoc import compare_run

    run = costly_matrix_run(tmp_path, monkeypatch)
    rep = compare_run(run, "ts,matrix", n_bootstrap=100)
    found = probe(rep.files["html"], tmp_path)
    check_first_screen(found)
    text = found["verdict"]["text"]
    assert "Use ts" in text and "Left out for costing accuracy although their conf-ECE is lower: matrix" in text
    alts = [im["alt"] for im in found["images"]]
    assert alts == ["accuracy against conf-ECE: the Pareto front", "reliability diagram before and after",
                    "reliability per method", "risk-coverage curves"]
    assert found["side"]["alt"] == "reliability diagram before and after"
