"""llmcal compare-confidence: confidence sources of one model side by side (llmcal.confidence_compare).

The fixtures are run directories written with llmcal's own writers (RunDir, the atomic JSON/JSONL writers) in
the shape ``eval --confidence`` writes them: config.json with ``confidence``, predictions.jsonl whose ``probs``
may hold exact zeros, metrics.json with a top-level ``confidence`` block.  Every number of the comparison is
checked against an independent computation here (loops over bins, pair counts, our own bootstrap draws).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from llmcal.cli import app
from llmcal.confidence_compare import compare_confidence
from llmcal.errors import LlmcalError
from llmcal.io import atomic_write_json, atomic_write_jsonl
from llmcal.metrics import compute_metrics
from llmcal.runs import METRICS, RunDir, RunResult

N = 120
K = 4


def _questions(n=N, seed=0):
    rng = np.random.default_rng(seed)
    return [f"q{i:03d}" for i in range(n)], rng.integers(0, K, size=n)


def logprob_probs(answers, seed=1):
    """Overconfident softmax distributions, right about 60% of the time."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(len(answers), K)) * 2.0
    right = rng.random(len(answers)) < 0.6
    z[np.arange(len(answers)), answers] += np.where(right, 4.0, -1.0)
    p = np.exp(z - z.max(axis=1, keepdims=True))
    return p / p.sum(axis=1, keepdims=True)


def verbalized_probs(answers, seed=2):
    """A stated confidence in steps of 5% on the chosen letter, the rest shared equally: exact zeros at 100%."""
    rng = np.random.default_rng(seed)
    n = len(answers)
    pred = np.where(rng.random(n) < 0.55, answers, (answers + 1) % K)
    conf = rng.choice([0.7, 0.8, 0.9, 0.95, 1.0], size=n)
    p = np.tile(((1 - conf) / (K - 1))[:, None], (1, K))
    p[np.arange(n), pred] = conf
    return p


def consistency_probs(answers, seed=3, samples=10):
    """Vote shares of ``samples`` draws: exact zeros for letters never drawn."""
    rng = np.random.default_rng(seed)
    out = np.zeros((len(answers), K))
    for i, a in enumerate(answers):
        w = np.full(K, 0.1)
        w[a] = 0.7 if rng.random() < 0.6 else 0.1
        w[(a + 1) % K] += 0.3
        votes = rng.choice(K, size=samples, p=w / w.sum())
        out[i] = np.bincount(votes, minlength=K) / samples
    return out


def write_run(path: Path, probs, answers, ids, *, source: str | None, model="served-model", block=None,
              extra_cfg=None, seed=0, n_bootstrap=200, unparseable=()) -> Path:
    """A finished run directory as eval writes it (``source`` None: an old logprobs run without the field)."""
    cfg = {"model": model, "data": "mmlu", "backend": "openai", "seed": seed, "n_bins": 10,
           "n_bootstrap": n_bootstrap, **(extra_cfg or {})}
    if source is not None:
        cfg["confidence"] = source
    rd = RunDir(path)
    rd.start(cfg)
    records = []
    for i, (qid, a, p) in enumerate(zip(ids, answers, probs)):
        p = [float(x) for x in p]
        records.append({"id": qid, "subject": "s", "answer": int(a), "probs": p, "pred": int(np.argmax(p)),
                        "conf": float(max(p)), "logits": [math.log(max(x, 1e-300)) for x in p],
                        "responses": ["B, 90%"],
                        "parse": {"status": "unparseable" if i in unparseable else "ok", "retries": 0}})
    atomic_write_jsonl(path / "predictions.jsonl", records)
    m = compute_metrics(np.asarray(probs), np.asarray(answers), n_bootstrap=n_bootstrap, seed=seed)
    rd.finish(kind="eval", model=model, results=[RunResult(label="none", method="none", dataset="mmlu", split="all",
                                                           predictions="predictions.jsonl", metrics=m)])
    if block is not None:
        doc = json.loads((path / METRICS).read_text())
        doc["confidence"] = block
        atomic_write_json(path / METRICS, doc)
    return path


def block(source, n=N, **kw):
    return {"source": source, "template": kw.pop("template", None), "n": n, "unparseable": kw.pop("unparseable", 0),
            "retries": kw.pop("retries", 0), "requests": kw.pop("requests", n), "prompt_tokens": 150 * n,
            "completion_tokens": kw.pop("completion_tokens", 8 * n), "seconds": kw.pop("seconds", 0.5 * n)}


@pytest.fixture
def three_runs(tmp_path):
    ids, answers = _questions()
    lp = write_run(tmp_path / "logprobs", logprob_probs(answers), answers, ids, source=None)
    vb = write_run(tmp_path / "verbalized", verbalized_probs(answers), answers, ids, source="verbalized",
                   extra_cfg={"verbalized_template": "1stage-percent"},
                   block={**block("verbalized", template="1stage-percent", unparseable=7, retries=11, requests=131),
                          "questions_timed": 40})  # resumed: the last process scored (and timed) 40 questions
    cs = write_run(tmp_path / "consistency", consistency_probs(answers), answers, ids, source="consistency",
                   extra_cfg={"samples": 10, "sample_temperature": 1.0},
                   block={**block("consistency", requests=10 * N, completion_tokens=30 * N, seconds=4.0 * N),
                          "questions_costed": N // 2})  # a resumed run's counters cover the last attempt only
    return [lp, vb, cs], ids, answers


# ---- independent computations --------------------------------------------------------------------------
def ece_by_loop(probs, answers, m=10):
    conf, right = probs.max(axis=1), probs.argmax(axis=1) == answers
    total = 0.0
    for b in range(m):
        lo, hi = b / m, (b + 1) / m
        members = (conf >= lo) & ((conf < hi) if b < m - 1 else (conf <= 1.0))
        if members.any():
            total += members.mean() * abs(right[members].mean() - conf[members].mean())
    return total


def auroc_by_pairs(probs, answers):
    conf = probs.max(axis=1)
    right = probs.argmax(axis=1) == answers
    pos, neg = conf[right], conf[~right]
    if not len(pos) or not len(neg):
        return float("nan")
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return wins / (len(pos) * len(neg))


def bootstrap_by_hand(fn, probs, answers, b, seed):
    idx = np.random.default_rng(seed).integers(0, len(answers), size=(b, len(answers)))
    vals = np.array([fn(probs[r], answers[r]) for r in idx])
    vals = vals[~np.isnan(vals)]
    return np.percentile(vals, [2.5, 97.5])


# ---- tests ------------------------------------------------------------------------------------------------
def test_every_number_matches_an_independent_computation(three_runs, tmp_path):
    runs, ids, answers = three_runs
    comp = compare_confidence(runs, tmp_path / "cmp", n_bootstrap=200)
    labels = [s["label"] for s in comp.sources]
    assert labels == ["logprobs", "verbalized (1stage-percent)", "consistency"]
    probs = {"logprobs": logprob_probs(answers), "verbalized (1stage-percent)": verbalized_probs(answers),
             "consistency": consistency_probs(answers)}
    for s in comp.sources:
        p = probs[s["label"]]
        assert s["n"] == N
        assert s["accuracy"] == pytest.approx(np.mean(p.argmax(1) == answers), abs=1e-12)
        assert s["conf_ece"] == pytest.approx(ece_by_loop(p, answers), abs=1e-12)
        assert s["auroc"] == pytest.approx(auroc_by_pairs(p, answers), abs=1e-12)
        lo, hi = bootstrap_by_hand(auroc_by_pairs, p, answers, 200, 0)
        assert s["auroc_ci"] == pytest.approx([lo, hi], abs=1e-12)
        lo, hi = bootstrap_by_hand(ece_by_loop, p, answers, 200, 0)
        assert s["conf_ece_ci"] == pytest.approx([lo, hi], abs=1e-12)
    # a paired difference: the same resamples for both sources
    d = next(x for x in comp.differences if (x["a"], x["b"]) == ("logprobs", "consistency"))
    pa, pb = probs["logprobs"], probs["consistency"]
    assert d["conf_ece"]["diff"] == pytest.approx(ece_by_loop(pb, answers) - ece_by_loop(pa, answers), abs=1e-12)
    idx = np.random.default_rng(0).integers(0, N, size=(200, N))
    diffs = [ece_by_loop(pb[r], answers[r]) - ece_by_loop(pa[r], answers[r]) for r in idx]
    assert d["conf_ece"]["ci"] == pytest.approx(list(np.percentile(diffs, [2.5, 97.5])), abs=1e-12)
    # parse rate and cost from the confidence blocks; none recorded for the old logprobs run
    vb = comp.source("verbalized (1stage-percent)")
    assert vb["parse"] == {"n": N, "unparseable": 7, "retries": 11, "parse_rate": (N - 7) / N,
                           "unparseable_correct": 0}  # the fixture's records are all parsed
    assert vb["cost"]["requests"] == 131 and vb["cost"]["per_question"]["requests"] == pytest.approx(131 / N)
    assert comp.source("consistency")["cost"]["per_question"]["seconds"] == pytest.approx(4.0 * N / (N // 2))
    assert vb["cost"]["per_question"]["seconds"] == pytest.approx(vb["cost"]["seconds"] / 40)  # questions_timed
    assert comp.source("logprobs")["parse"] is None and comp.source("logprobs")["cost"] is None


def test_posthoc_uses_the_held_out_rule_and_refits_independently(three_runs, tmp_path):
    from llmcal.data.splits import hash_unit
    from llmcal.posthoc import IsotonicCalibrator

    runs, ids, answers = three_runs
    comp = compare_confidence(runs, tmp_path / "cmp", n_bootstrap=100, calib_fraction=0.25)
    calib = [q for q in ids if hash_unit(q, 0) >= 0.75]
    assert comp.split["calib_ids"] == calib and comp.split["n_test"] == N - len(calib)
    test = np.array([hash_unit(q, 0) < 0.75 for q in ids])
    p = logprob_probs(answers)
    iso = IsotonicCalibrator().fit(np.log(p[~test]), answers[~test])
    after = iso.predict_proba(np.log(p[test]))
    row = next(r for r in comp.source("logprobs")["posthoc"] if r["method"] == "isotonic")
    assert row["applied"] and row["conf_ece"] == pytest.approx(ece_by_loop(after, answers[test]), abs=1e-9)
    assert row["accuracy"] == pytest.approx(np.mean(p[test].argmax(1) == answers[test]))
    none = comp.source("logprobs")["posthoc"][0]
    assert none["method"] == "none" and none["conf_ece"] == pytest.approx(ece_by_loop(p[test], answers[test]))


def test_the_verdict_chooses_each_calibrator_by_cross_validation_on_the_calibration_part(three_runs, tmp_path):
    """cv_conf_ece: each of 5 folds of the calibration questions (a seeded permutation dealt round) is calibrated
    by a fit on the other four, the pooled out-of-fold probabilities scored; the verdict's "after" is the row
    with the lowest of these, never a pick by the held-out questions' own conf-ECE."""
    from llmcal.data.splits import hash_unit
    from llmcal.posthoc import IsotonicCalibrator

    runs, ids, answers = three_runs
    comp = compare_confidence(runs, tmp_path / "cmp", n_bootstrap=50, calib_fraction=0.5)
    calib = np.array([hash_unit(q, 0) >= 0.5 for q in ids])
    p, a = logprob_probs(answers)[calib], answers[calib]
    fold = np.random.default_rng(0).permutation(len(a)) % 5
    pooled = np.zeros_like(p)
    for f in range(5):
        iso = IsotonicCalibrator().fit(np.log(p[fold != f]), a[fold != f])
        pooled[fold == f] = iso.predict_proba(np.log(p[fold == f]))
    rows = {r["method"]: r for r in comp.source("logprobs")["posthoc"]}
    assert rows["isotonic"]["cv_conf_ece"] == pytest.approx(ece_by_loop(pooled, a), abs=1e-9)
    assert rows["none"]["cv_conf_ece"] == pytest.approx(ece_by_loop(p, a), abs=1e-9)
    for s in comp.sources:
        after = comp.verdict["posthoc"]["after"][s["label"]]
        cv = {r["method"]: r["cv_conf_ece"] for r in s["posthoc"] if r["applied"] and r["cv_conf_ece"] is not None}
        assert after["method"] == min(cv, key=cv.get) and after["cv_conf_ece"] == min(cv.values())
        chosen = next(r for r in s["posthoc"] if r["method"] == after["method"])
        assert after["conf_ece"] == chosen["conf_ece"]  # measured on the held-out part
    report = (tmp_path / "cmp" / "report.md").read_text()
    assert "CV conf-ECE" in report and "optimistic" not in report


def test_temperature_scaling_is_not_applied_to_probabilities_with_zeros(three_runs, tmp_path):
    runs, _, answers = three_runs
    comp = compare_confidence(runs, tmp_path / "cmp", n_bootstrap=50)
    cons = {r["method"]: r for r in comp.source("consistency")["posthoc"]}
    zeros = int(np.sum(np.any(consistency_probs(answers) == 0, axis=1)))
    assert zeros > 0 and comp.source("consistency")["zero_rows"] == zeros
    assert not cons["ts"]["applied"] and f"{zeros} of {N} questions" in cons["ts"]["reason"]
    assert "log 0" in cons["ts"]["reason"]
    for name in ("platt", "isotonic", "histogram"):  # they change only the top confidence: defined for zeros
        assert cons[name]["applied"] and cons[name]["conf_ece"] is not None
    assert {r["method"]: r["applied"] for r in comp.source("logprobs")["posthoc"]}["ts"]
    report = (tmp_path / "cmp" / "report.md").read_text()
    assert "consistency · ts: not applied" in report


def test_report_json_and_figures_are_written_without_machine_paths(three_runs, tmp_path):
    runs, _, _ = three_runs
    out = tmp_path / "cmp"
    comp = compare_confidence(runs, out, n_bootstrap=50)
    doc = json.loads((out / "comparison.json").read_text())
    assert [s["label"] for s in doc["sources"]] == [s["label"] for s in comp.sources]
    assert doc["sources"][1]["conf_ece"] == comp.sources[1]["conf_ece"]
    assert doc["sources"][0]["run"] == "../logprobs"
    for f in doc["files"].values():
        png = out / f
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in ("comparison.json", "report.md", "report.html"):
        assert str(tmp_path) not in (out / name).read_text()
    md = (out / "report.md").read_text()
    assert md.index("Which confidence to trust") < md.index("## Sources")
    assert "Best calibrated:" in md and "Best at ranking" in md
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and 'src="reliability' not in html
    assert comp.verdict["best_calibrated"]["label"] == min(comp.sources, key=lambda s: s["conf_ece"])["label"]


def _cost_table(md: str) -> list[str]:
    part = md[md.index("## Cost"):].split("\n## ")[0]
    return [line for line in part.splitlines()[1:] if line.startswith("|") and not line.startswith("|--")]


def test_the_cost_table_says_what_a_resumed_runs_numbers_cover(three_runs, tmp_path):
    runs, _, _ = three_runs
    compare_confidence(runs, tmp_path / "cmp", n_bootstrap=0)
    rows = {r.split("|")[1].strip(): r for r in _cost_table((tmp_path / "cmp" / "report.md").read_text())}
    assert rows["source"].rstrip(" |").endswith("note")
    assert f"seconds over the last 40 of {N} questions (resumed run)" in rows["verbalized (1stage-percent)"]
    assert "requests and tokens" not in rows["verbalized (1stage-percent)"]
    assert f"requests and tokens over the last {N // 2} of {N} questions" in rows["consistency"]
    assert "not recorded by the run" in rows["logprobs"]


def test_a_resume_that_asked_nothing_reports_no_cost_per_question(tmp_path):
    ids, answers = _questions()
    runs = [write_run(tmp_path / "a", logprob_probs(answers), answers, ids, source="logprobs",
                      block={**block("logprobs", requests=0, completion_tokens=0, seconds=0.0),
                             "prompt_tokens": 0, "questions_costed": 0, "questions_timed": 0}),
            write_run(tmp_path / "b", verbalized_probs(answers), answers, ids, source="verbalized",
                      extra_cfg={"verbalized_template": "1stage-percent"},
                      block=block("verbalized", template="1stage-percent"))]
    comp = compare_confidence(runs, tmp_path / "cmp", n_bootstrap=0)
    cost = comp.source("logprobs")["cost"]
    assert cost["requests"] == 0 and set(cost["per_question"].values()) == {None}  # not "0 requests a question"
    md = (tmp_path / "cmp" / "report.md").read_text()
    assert "logprobs: not known (the process that finished the run asked nothing)" in md
    assert "asked nothing: per question not known" in md


def test_the_cost_table_has_no_note_column_when_no_row_needs_one(tmp_path):
    ids, answers = _questions()
    runs = [write_run(tmp_path / "verbalized", verbalized_probs(answers), answers, ids, source="verbalized",
                      extra_cfg={"verbalized_template": "1stage-percent"},
                      block=block("verbalized", template="1stage-percent")),
            write_run(tmp_path / "consistency", consistency_probs(answers), answers, ids, source="consistency",
                      extra_cfg={"samples": 10, "sample_temperature": 1.0}, block=block("consistency"))]
    compare_confidence(runs, tmp_path / "cmp", n_bootstrap=0)
    table = _cost_table((tmp_path / "cmp" / "report.md").read_text())
    assert table[0].rstrip(" |").endswith("s / q") and "note" not in table[0]
    assert all(r.count("|") == table[0].count("|") for r in table)


def test_runs_named_relative_to_the_working_directory_are_recorded_relative_to_the_output(three_runs, tmp_path,
                                                                                          monkeypatch):
    monkeypatch.chdir(tmp_path)
    compare_confidence([Path("logprobs"), Path("verbalized")], Path("out") / "cmp", n_bootstrap=0)
    doc = json.loads((tmp_path / "out" / "cmp" / "comparison.json").read_text())
    assert [s["run"] for s in doc["sources"]] == ["../../logprobs", "../../verbalized"]


def test_verdict_warns_when_the_best_source_holds_unparseable_questions(tmp_path):
    """Uniform (unparseable) questions are calibrated at chance accuracy by construction: the verdict says so."""
    ids, answers = _questions()
    a = write_run(tmp_path / "a", logprob_probs(answers), answers, ids, source="logprobs")
    uniform = np.full((N, K), 1.0 / K)
    b = write_run(tmp_path / "b", uniform, answers, ids, source="verbalized", extra_cfg={"verbalized_template": "2stage"},
                  block=block("verbalized", template="2stage", unparseable=N), unparseable=range(N))
    comp = compare_confidence([a, b], tmp_path / "cmp", n_bootstrap=30)
    line = comp.verdict["lines"][0]
    assert line.startswith("**Best calibrated: verbalized (2stage)**")
    assert f"{N} of its {N} questions were unparseable" in line
    # the uniform distribution predicts A: accuracy counts the questions whose answer is A as right
    lucky = int(np.sum(np.asarray(answers) == 0))
    assert 0 < lucky < N and comp.source("verbalized (2stage)")["parse"]["unparseable_correct"] == lucky
    assert f"{lucky} of the {N} unparseable count as right by the tie rule (option A)" in line
    assert f"{lucky} of the {N} unparseable count as right" in (tmp_path / "cmp" / "report.md").read_text()


def test_verdict_says_when_the_best_is_not_ahead(tmp_path):
    """Two runs with the same probabilities but one: no paired interval can exclude 0 on all the others."""
    ids, answers = _questions()
    p = logprob_probs(answers)
    a = write_run(tmp_path / "a", p, answers, ids, source="logprobs")
    b = write_run(tmp_path / "b", p, answers, ids, source="ptrue", block=block("ptrue"))
    comp = compare_confidence([a, b], tmp_path / "cmp", n_bootstrap=50)
    assert "not distinguishable on these questions" in comp.verdict["lines"][0]


def _cli(*args):
    return CliRunner().invoke(app, [str(x) for x in args], catch_exceptions=False)


def test_cli_compares_and_prints_the_table(three_runs, tmp_path):
    runs, _, _ = three_runs
    r = _cli("compare-confidence", *runs, "--out", tmp_path / "cmp", "--n-bootstrap", 30)
    assert r.exit_code == 0, r.output
    assert "verbalized (1stage-percent)" in r.output and "94.2%" in r.output  # 113/120 parsed
    assert (tmp_path / "cmp" / "report.html").is_file()


def test_cli_refuses_another_model_naming_the_run(three_runs, tmp_path):
    runs, ids, answers = three_runs
    other = write_run(tmp_path / "other-model", logprob_probs(answers), answers, ids, source="ptrue",
                      model="another-model")
    r = _cli("compare-confidence", runs[0], other, "--out", tmp_path / "cmp")
    assert r.exit_code == 2
    assert "other-model" in r.output and "'another-model' differs" in r.output
    assert not (tmp_path / "cmp").exists()  # refused before any work


def test_cli_refuses_other_questions_naming_the_run(three_runs, tmp_path):
    runs, ids, answers = three_runs
    fewer = write_run(tmp_path / "fewer", logprob_probs(answers)[:-2], answers[:-2], ids[:-2], source="ptrue")
    r = _cli("compare-confidence", runs[0], fewer, "--out", tmp_path / "cmp")
    assert r.exit_code == 2 and "fewer" in r.output and "lacks 2 of" in r.output and "q119" in r.output
    moved = answers.copy()
    moved[5] = (moved[5] + 1) % K
    changed = write_run(tmp_path / "changed", logprob_probs(answers), moved, ids, source="ptrue")
    r = _cli("compare-confidence", runs[0], changed, "--out", tmp_path / "cmp")
    assert r.exit_code == 2 and "changed" in r.output and "'q005'" in r.output and "not the same questions" in r.output


def test_refuses_incomplete_runs_and_bad_options(three_runs, tmp_path):
    runs, _, _ = three_runs
    (runs[1] / "INCOMPLETE").write_text("x")
    with pytest.raises(LlmcalError, match="verbalized: the run is not complete"):
        compare_confidence(runs, tmp_path / "cmp")
    (runs[1] / "INCOMPLETE").unlink()
    with pytest.raises(LlmcalError, match="contextual"):
        compare_confidence(runs, tmp_path / "cmp", methods="ts,contextual")
    with pytest.raises(LlmcalError, match="calib-fraction"):
        compare_confidence(runs, tmp_path / "cmp", calib_fraction=1.5)
    with pytest.raises(LlmcalError, match="is one of the runs"):
        compare_confidence(runs, runs[0])


def test_report_in_headless_chromium(three_runs, tmp_path):
    """Every image of report.html loads and the verdict box, with the sources' diagrams beside it, opens the page."""
    from test_report_browser import HEIGHT, probe

    runs, _, _ = three_runs
    compare_confidence(runs, tmp_path / "cmp", n_bootstrap=30)
    found = probe(tmp_path / "cmp" / "report.html", tmp_path)
    # a diagram per source, all sources in one, the risk-coverage curves, the calibrators per source
    assert len(found["images"]) == 3 + 1 + 1 + 3
    for im in found["images"]:
        assert im["complete"] and im["width"] > 0 and im["height"] > 0, im
    v, side = found["verdict"], found["side"]
    assert 0 <= v["top"] < HEIGHT / 3 and v["visibility"] == "visible"
    assert "Best calibrated:" in v["text"] and "Cost per question" in v["text"]
    assert side["alt"] == "reliability diagram per confidence source" and side["left"] >= v["right"]
